"""The whole path on the exact SDXL architecture (`make check-sdxl`): every other test uses the tiny
model, so this is where module names, counts, shapes and memory of the real model are checked.

Seeded random weights of the shipped SDXL configs (train.model.random_sdxl) saved as an SGM single
file, then prep -> cache -> train (2 steps, attn-mlp with text-encoder LoRA) -> export -> convert
-> sample (2 steps), each through the command line in this process. Kept lean to fit 10 minutes
and 20 GB on 2 CPU cores: bf16 weights (the VAE too), the smallest training size the config allows
for the card's buckets (data.resolution_scale 0.125: 128-pixel sides), three images, batch 1,
gradient checkpointing, one 75-token chunk per caption, latents cached once, 128x128 samples.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from train_helpers import run_in_process, write_config

from train.model.random_sdxl import build_random_sdxl

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
IMAGES = 3
# What a LoRA covers on SDXL 1.0's architecture (tests/test_random_sdxl.py counts them on meta).
UNET_MODULES = {"attn-mlp": 722}
TEXT_ENCODER_MODULES = 264


def _sample_images(folder: Path) -> Path:
    """The first IMAGES of the shipped sample dataset, with their Danbooru sidecars."""
    folder.mkdir()
    for image in sorted(p for p in (REPO / "datasets" / "sample").iterdir() if p.suffix in (".png", ".jpg"))[:IMAGES]:
        shutil.copy(image, folder / image.name)
        shutil.copy(image.with_name(image.name + ".json"), folder / (image.name + ".json"))
    return folder


def _modules(tensors: dict, prefix: str) -> set[str]:
    return {key.split(".")[0] for key in tensors if key.startswith(prefix)}


def _flat(tensors: dict) -> dict:
    """Keys without `text_model.`: recent transformers flatten CLIPTextModel, and diffusers loads
    either spelling."""
    return {key.replace(".text_model.", "."): value for key, value in tensors.items()}


def _ok(argv: list[str]) -> str:
    started = time.perf_counter()
    result = run_in_process(argv)
    assert result.returncode == 0, f"{argv[0]} failed:\n{result.stderr[-3000:]}"
    print(f"check-sdxl: {argv[0]} {time.perf_counter() - started:.1f} s")  # pytest -s shows where the time goes
    return result.stderr


@pytest.fixture
def sdxl_file(tmp_path):
    """The exact SDXL with seeded random weights (6.9 GB), removed afterwards: pytest keeps the
    last three runs' temporary folders."""
    started = time.perf_counter()
    model = build_random_sdxl(tmp_path / "random_sdxl.safetensors", seed=0)
    print(f"check-sdxl: build {time.perf_counter() - started:.1f} s")
    yield model
    model.unlink()


def test_prep_train_export_convert_sample_on_the_exact_sdxl(tmp_path, sdxl_file):
    model = sdxl_file
    _ok(["prep", str(_sample_images(tmp_path / "images")), "-o", str(tmp_path / "prep"), "--workers", "1"])

    run_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "sdxl.toml", model_dir=model, dataset=tmp_path / "prep", run_dir=run_dir,
        model={"weight_dtype": "bf16", "vae_dtype": "bf16"},
        data={"resolution_scale": 0.125, "flip": False, "tag_dropout": 0.0, "caption_dropout": 0.0,
              "max_chunks": 1},
        lora={"preset": "attn-mlp", "rank": 4, "alpha": 4, "train_text_encoder": True},
        train={"max_steps": 2, "batch_size": 1, "gradient_accumulation_steps": 1, "mixed_precision": "bf16",
               "gradient_checkpointing": True},
        output={"save_every_n_steps": 2, "checkpoints_total_limit": 1, "log_with": []},
    )
    _ok(["cache", str(config)])
    assert len([p for p in (tmp_path / "prep" / "latents").rglob("*") if p.is_file()]) >= IMAGES
    _ok(["train", str(config)])

    # The WebUI (kohya) file: a LoRA for every module the preset covers on the real architecture.
    kohya = load_file(run_dir / "test_lora.safetensors")
    assert len(_modules(kohya, "lora_unet_")) == UNET_MODULES["attn-mlp"]
    assert len(_modules(kohya, "lora_te1_")) + len(_modules(kohya, "lora_te2_")) == TEXT_ENCODER_MODULES
    assert all(t.isfinite().all() for t in kohya.values())

    # convert: the WebUI file becomes the diffusers file the run exported, tensor for tensor.
    exported = load_file(run_dir / "diffusers" / "pytorch_lora_weights.safetensors")
    _ok(["convert", str(run_dir / "test_lora.safetensors"), str(tmp_path / "converted")])
    converted = _flat(load_file(tmp_path / "converted" / "pytorch_lora_weights.safetensors"))
    exported = _flat(exported)
    assert converted.keys() == exported.keys()
    for key, tensor in exported.items():  # the WebUI file holds fp16
        assert converted[key].float().allclose(tensor.float(), rtol=1e-2, atol=1e-4), key

    # sample: the diffusers folder loads back onto the exact SDXL (every module matched) and generates.
    samples = tmp_path / "samples"
    _ok(["sample", "1girl, solo", "--model", str(model), "--lora", str(run_dir / "diffusers" / "pytorch_lora_weights.safetensors"),
         "--size", "128x128", "--steps", "2", "--seed", "0", "--batch-size", "1", "--dtype", "bf16",
         "--no-reorder", "-o", str(samples)])
    assert (samples / "p00-s0.png").is_file() and (samples / "grid.png").is_file()
    logged = [json.loads(line) for line in (run_dir / "log.jsonl").read_text("utf-8").splitlines()]
    assert any("loss" in entry for entry in logged)
