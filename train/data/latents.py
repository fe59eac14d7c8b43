"""The latent cache: each image encoded once by the VAE, at its bucket, stored beside the dataset.

A latent is a function of the image bytes, the resize and crop that fit it into its bucket, the
training resolution scale, the flip, and the VAE (weights and scaling factor). The cache file name
carries all of them (`sha256`, bucket, a hash of the geometry, the VAE fingerprint as a folder),
so an edited image, a changed bucket or crop, or another VAE simply misses the cache and is
re-encoded; nothing stale can be served. Files are written atomically (temp + `os.replace`), so
a crash never leaves a half-written latent that a later run would trust.

Layout: `OUT/latents/<vae_fingerprint>/<sha256>_<W>x<H>_<geometry>[_flip].safetensors`, one
tensor "latents" of shape (4, H/8, W/8), float32, already multiplied by the VAE scaling factor.

We store the mean of the VAE posterior rather than a sample: deterministic, and the posterior's
std for the SDXL VAE is tiny next to the diffusion noise added on top.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from captioning.images import load_rgb
from train.names import scale_bucket
from train.tensor_files import save_tensors

logger = logging.getLogger(__name__)

VAE_DOWNSCALE = 8  # SDXL VAE: 3 downsampling stages


@dataclass(frozen=True)
class Geometry:
    """How one row's image becomes the model's input, in (scaled) pixels."""

    resize_width: int
    resize_height: int
    crop_left: int
    crop_top: int
    width: int  # bucket width at the training scale
    height: int

    def digest(self, scale: float, scaling_factor: float) -> str:
        text = f"{self.resize_width},{self.resize_height},{self.crop_left},{self.crop_top},{scale},{scaling_factor}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _snap(value: float) -> int:
    """Round to the nearest multiple of the VAE's downscale factor (at least one latent pixel)."""
    return max(VAE_DOWNSCALE, round(value / VAE_DOWNSCALE) * VAE_DOWNSCALE)


def row_geometry(row: dict, scale: float = 1.0) -> Geometry:
    """The row's recorded resize/crop/bucket, multiplied by `scale` (1.0 = exactly as prepped).

    At scale < 1 the bucket is snapped to multiples of 8 and the resize and crop scaled to match,
    with the crop clamped inside the resized image. Above 1 the bucket keeps the card's grid of
    64 (`_upscaled_geometry`). Either way the size/crop conditioning (`rows.time_ids`) is computed
    from this geometry, the one the cached latents were cut with.
    """
    if scale == 1.0:
        return Geometry(row["resize_width"], row["resize_height"], row["crop_left"], row["crop_top"],
                        row["bucket_width"], row["bucket_height"])
    if scale > 1.0:
        return _upscaled_geometry(row, scale)
    width, height = _snap(row["bucket_width"] * scale), _snap(row["bucket_height"] * scale)
    resize_w = max(width, round(row["resize_width"] * scale))
    resize_h = max(height, round(row["resize_height"] * scale))
    left = min(round(row["crop_left"] * scale), resize_w - width)
    top = min(round(row["crop_top"] * scale), resize_h - height)
    return Geometry(resize_w, resize_h, left, top, width, height)


def _upscaled_geometry(row: dict, scale: float) -> Geometry:
    """A row's geometry above its prepped area: the bucket scaled onto the 64-pixel grid with the
    card's aspect kept (`names.scale_bucket`, as prep's `--max-area` cuts it), the image resized
    from its original to cover it, and the crop centred where the prepped crop was centred."""
    width, height = scale_bucket(row["bucket_width"], row["bucket_height"], scale)
    factor = max(width / row["bucket_width"], height / row["bucket_height"])
    resize_w = max(width, round(row["resize_width"] * factor))
    resize_h = max(height, round(row["resize_height"] * factor))
    left = round((row["crop_left"] + row["bucket_width"] / 2) * factor - width / 2)
    top = round((row["crop_top"] + row["bucket_height"] / 2) * factor - height / 2)
    return Geometry(resize_w, resize_h, min(max(left, 0), resize_w - width), min(max(top, 0), resize_h - height),
                    width, height)


def load_pixels(path: str, geometry: Geometry, flip: bool = False) -> torch.Tensor:
    """The image resized and cropped into its bucket, as a (3, H, W) float32 tensor in [-1, 1].

    Flipping happens after the crop, mirroring exactly what the model sees unflipped.
    """
    image = load_rgb(path).resize((geometry.resize_width, geometry.resize_height), Image.Resampling.LANCZOS)
    image = image.crop((geometry.crop_left, geometry.crop_top,
                        geometry.crop_left + geometry.width, geometry.crop_top + geometry.height))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_latent_mask(path: str, geometry: Geometry, flip: bool = False) -> torch.Tensor:
    """A loss mask on the latent grid, (1, H/8, W/8) float32 in [0, 1].

    The mask (alpha channel or mask image, `captioning.images.load_mask`) is resized and cropped
    with the image's own geometry (bilinear), flipped like it, then each 8x8 block is averaged
    onto its latent pixel, as sd-scripts' `apply_masked_loss` does with `F.interpolate(mode="area")`.
    """
    from captioning.images import load_mask

    mask = load_mask(path).resize((geometry.resize_width, geometry.resize_height), Image.Resampling.BILINEAR)
    mask = mask.crop((geometry.crop_left, geometry.crop_top,
                      geometry.crop_left + geometry.width, geometry.crop_top + geometry.height))
    if flip:
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]  # (1, 1, H, W)
    return torch.nn.functional.avg_pool2d(pixels, VAE_DOWNSCALE)[0]  # (1, H/8, W/8)


class LatentCache:
    """Where each row's latents live, and reading them back.

    Args:
        dataset_dir: the prep OUT folder (the cache goes into `OUT/latents/`).
        vae_fingerprint: `SdxlComponents.vae_fingerprint`.
        scaling_factor: the VAE config's `scaling_factor`.
        scale: training resolution scale (`data.resolution_scale`).
    """

    def __init__(self, dataset_dir: str | Path, vae_fingerprint: str, scaling_factor: float, scale: float = 1.0):
        self.root = Path(dataset_dir) / "latents" / vae_fingerprint
        self.scaling_factor = scaling_factor
        self.scale = scale

    def path(self, row: dict, flip: bool = False) -> Path:
        geometry = row_geometry(row, self.scale)
        name = f"{row['sha256']}_{geometry.width}x{geometry.height}_{geometry.digest(self.scale, self.scaling_factor)}"
        return self.root / f"{name}{'_flip' if flip else ''}.safetensors"

    def load(self, row: dict, flip: bool = False) -> torch.Tensor:
        """Latents (4, H/8, W/8) of `row`.

        Raises:
            FileNotFoundError: not cached yet (run `animagine-lora cache`), naming the image.
        """
        path = self.path(row, flip)
        if not path.is_file():
            raise FileNotFoundError(f"{row['image_path']}: latents not cached ({path}); run `animagine-lora cache`")
        return load_file(str(path))["latents"]

    def missing(self, rows: Sequence[dict], flip: bool, rank: int = 0, world_size: int = 1) -> list[tuple[dict, bool]]:
        """(row, flipped) pairs without a cache file, in row order, of process `rank`'s share.

        Shared out before looking at the cache: were each process to split its own list of missing
        pairs, one that looked after another had stored some would get a shifted share, and some
        latents would be encoded by nobody.
        """
        variants = (False, True) if flip else (False,)
        share = [(row, f) for row in rows for f in variants][rank::world_size]
        return [(row, f) for row, f in share if not self.path(row, f).is_file()]

    def store(self, row: dict, flip: bool, latents: torch.Tensor) -> None:
        save_tensors(self.path(row, flip), {"latents": latents.detach().to("cpu", torch.float32).contiguous()},
                     clean=False)


@torch.no_grad()
def encode(vae, pixels: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """VAE posterior mean times `scaling_factor`: (B, 3, H, W) in [-1, 1] -> (B, 4, H/8, W/8)."""
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    return vae.encode(pixels).latent_dist.mode().float() * scaling_factor


def cache_latents(
    rows: Sequence[dict],
    vae,
    cache: LatentCache,
    *,
    flip: bool = False,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> int:
    """Encode every (row, flip) not yet cached; this process takes every `world_size`-th one.

    The caller synchronises the processes afterwards (`accelerator.wait_for_everyone()`).
    Returns how many latents this process encoded.

    Raises:
        OSError: an image that cannot be read, with its path.
    """
    from tqdm.auto import tqdm

    todo = cache.missing(rows, flip, rank, world_size)
    for row, flipped in tqdm(todo, desc="caching latents", disable=not progress or not todo):
        geometry = row_geometry(row, cache.scale)
        try:
            pixels = load_pixels(row["image_path"], geometry, flipped)
        except OSError as err:
            raise OSError(f"{row['image_path']} (dataset row {row['id']!r}): cannot read image for caching: "
                          f"{err.strerror or err}") from None
        cache.store(row, flipped, encode(vae, pixels[None], cache.scaling_factor)[0])
    if todo:
        logger.info("encoded %d latents into %s", len(todo), cache.root)
    return len(todo)
