"""train.data.latents: geometry at a resolution scale, pixels, cache keys that never serve stale latents."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train.data.latents import LatentCache, cache_latents, load_pixels, row_geometry

ROW = {"id": "x.png", "image_path": "", "sha256": "ab" * 32, "width": 1200, "height": 900,
       "bucket_width": 1152, "bucket_height": 896, "resize_width": 1195, "resize_height": 896,
       "crop_left": 21, "crop_top": 0}


def test_geometry_is_the_recorded_one_at_scale_1():
    g = row_geometry(ROW)
    assert (g.resize_width, g.resize_height, g.crop_left, g.crop_top, g.width, g.height) == (1195, 896, 21, 0, 1152, 896)


def test_geometry_at_a_scale_snaps_to_the_vae_grid_and_keeps_the_crop_inside():
    g = row_geometry(ROW, 0.125)
    assert (g.width, g.height) == (144, 112)
    assert g.width % 8 == 0 and g.height % 8 == 0
    assert g.crop_left + g.width <= g.resize_width and g.crop_top + g.height <= g.resize_height


def test_pixels_are_the_crop_and_flip_mirrors_it(tmp_path):
    ramp = np.tile(np.arange(32, dtype=np.uint8)[None, :, None] * 8, (16, 1, 3))  # (16, 32, 3)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    row = {**ROW, "image_path": str(tmp_path / "ramp.png"), "width": 32, "height": 16, "bucket_width": 16,
           "bucket_height": 16, "resize_width": 32, "resize_height": 16, "crop_left": 8, "crop_top": 0}
    g = row_geometry(row)
    pixels = load_pixels(row["image_path"], g)
    assert pixels.shape == (3, 16, 16)
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert pixels[0, 0, 0].item() == pytest.approx(8 * 8 / 127.5 - 1)  # column 8 of the ramp
    assert torch.equal(load_pixels(row["image_path"], g, flip=True), pixels.flip(-1))


def test_cache_key_covers_image_bucket_crop_vae_and_flip(tmp_path):
    cache = LatentCache(tmp_path, "vae1", 0.13025)
    base = cache.path(ROW)
    variants = [
        cache.path({**ROW, "sha256": "cd" * 32}),
        cache.path({**ROW, "bucket_width": 1216}),
        cache.path({**ROW, "crop_left": 20}),
        cache.path(ROW, flip=True),
        LatentCache(tmp_path, "vae2", 0.13025).path(ROW),
        LatentCache(tmp_path, "vae1", 0.13025, scale=0.5).path(ROW),
    ]
    assert len({base, *variants}) == len(variants) + 1
    assert base.is_relative_to(tmp_path / "latents" / "vae1")


def test_cache_encodes_once_splits_by_rank_and_reencodes_an_edited_image(tiny_model, tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(tiny_model.diffusers_dir / "vae"))
    rows = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(path)
        import hashlib

        rows.append({**ROW, "id": path.name, "image_path": str(path), "width": 40, "height": 40,
                     "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bucket_width": 32, "bucket_height": 32,
                     "resize_width": 40, "resize_height": 40, "crop_left": 4, "crop_top": 4})
    cache = LatentCache(tmp_path / "out", "tinyvae", vae.config.scaling_factor)
    assert cache_latents(rows, vae, cache, flip=True, rank=1, world_size=2, progress=False) == 3  # of 6
    assert cache_latents(rows, vae, cache, flip=True, progress=False) == 3
    assert cache_latents(rows, vae, cache, flip=True, progress=False) == 0
    latents = cache.load(rows[0])
    assert latents.shape == (4, 4, 4) and latents.dtype == torch.float32
    assert not torch.equal(latents, cache.load(rows[1]))
    # An edited image has a new hash: its old latents are not served.
    edited = {**rows[0], "sha256": "ff" * 32}
    with pytest.raises(FileNotFoundError, match="0.png: latents not cached"):
        cache.load(edited)
    assert cache.missing([edited], flip=False) == [(edited, False)]
    assert not list(Path(cache.root).glob(".*tmp*"))
