"""Shared fixtures: the data shipped in `captioning/data/`, and GPU skipping."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from captioning.tag_db import SHIPPED_DB_CSV
from captioning.tokens import SHIPPED_CLIP_BPE

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tag_db_path() -> Path:
    """The shipped Danbooru tag database as a file users could pass (tagcomplete CSV, gzipped)."""
    return SHIPPED_DB_CSV


@pytest.fixture(scope="session")
def clip_bpe_path() -> Path:
    """The shipped CLIP BPE merges."""
    return SHIPPED_CLIP_BPE


# Test files that share the session's trained run (`trained_run`): one xdist group, so the run is
# trained once per suite rather than once per worker.
TRAINED_RUN_GROUP = "trained_run"


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs `-n auto`: a worker per core), each worker gets one
    torch thread: two workers of two threads on two cores would spend the difference waiting."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        try:
            import torch
        except ImportError:
            return
        torch.set_num_threads(1)


def _file(item) -> str:
    return item.nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(config, items):
    """Group tests for `--dist loadgroup`: a whole file goes to one worker (its module fixtures are
    built once), and every file that uses `trained_run` to the same one. Skip `slow`-marked tests
    unless asked for (`-m slow`: `make check-sdxl`), and `gpu`-marked tests cleanly without CUDA."""
    shares_run = {_file(item) for item in items if TRAINED_RUN_GROUP in getattr(item, "fixturenames", ())}
    for item in items:
        group = TRAINED_RUN_GROUP if _file(item) in shares_run else _file(item)
        item.add_marker(pytest.mark.xdist_group(group))
        if TRAINED_RUN_GROUP in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.heavy)
    if "slow" not in (config.getoption("markexpr", "") or ""):
        skip_slow = pytest.mark.skip(reason="slow: run with -m slow (make check-sdxl)")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip_slow)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, clip_bpe_path: Path):
    """The tiny SDXL (train.model.tiny), built once per session: diffusers folder + SGM single file."""
    from train.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", clip_bpe_path)


@pytest.fixture(scope="session")
def train_dataset(tmp_path_factory) -> Path:
    """A small prepped dataset (tests/train_helpers.py `make_dataset`), built once per session."""
    from train_helpers import make_dataset

    return make_dataset(tmp_path_factory.mktemp("prep") / "out")


@pytest.fixture(scope="session")
def trained_run(tiny_model, train_dataset, tmp_path_factory) -> Path:
    """One complete 6-step tiny run (batch 1 x accumulation 2, checkpoints every 2 steps, the
    last two kept, sample grid and TensorBoard/wandb logs): read-only, tests copy what they change."""
    from train_helpers import run, train_command, write_config

    root = tmp_path_factory.mktemp("full")
    config = write_config(root / "c.toml", model_dir=tiny_model.diffusers_dir, dataset=train_dataset,
                          run_dir=root / "run",
                          sample={"every_n_steps": 6, "sample_model": "train", "size": "64x64", "steps": 2,
                                  "seeds": [0]}, output={"log_with": ["tensorboard", "wandb"]})
    result = run(train_command(config), env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


@pytest.fixture
def lora_pipeline(tiny_model):
    """Factory: a fresh tiny SDXL pipeline with LoRA adapters whose B weights are random.

    Random B (instead of the zero init) makes the LoRA change the outputs, so a round trip that
    drops or mis-scales any tensor fails.
    """
    import torch
    from diffusers import StableDiffusionXLPipeline

    from train.lora.adapters import add_text_encoder_lora, add_unet_lora, lora_modules

    def make(preset="attn-mlp", rank=4, alpha=2.0, text_encoders=True, dora=False, seed=0):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model.diffusers_dir)
        models = [pipe.unet]
        add_unet_lora(pipe.unet, preset=preset, rank=rank, alpha=alpha, dora=dora)
        if text_encoders:
            add_text_encoder_lora(pipe.text_encoder, rank=rank, alpha=alpha, dora=dora)
            add_text_encoder_lora(pipe.text_encoder_2, rank=rank, alpha=alpha, dora=dora)
            models += [pipe.text_encoder, pipe.text_encoder_2]
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for model in models:
                for module in lora_modules(model).values():
                    weight = module.lora_B["default"].weight
                    weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1)
        return pipe

    return make


@pytest.fixture
def sdxl_output():
    """Function: the UNet prediction for a fixed prompt and latent, through both text encoders."""
    import torch

    @torch.no_grad()
    def run(pipe, prompt="1girl, solo, smile"):
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
        return pipe.unet(
            latents, 500, encoder_hidden_states=embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample

    return run
