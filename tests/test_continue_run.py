"""Continuing a finished run: training it longer, resuming past a damaged newest checkpoint, and
exporting again into folders an earlier export wrote; every file keeps the umask's mode."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from train_helpers import train_in_process, write_config

from captioning.outputs import normal_mode
from train.runtime import checkpoint
from train.runtime.run_dir import LOCK_NAME

pytestmark = pytest.mark.heavy  # trains tiny models: left out of `make test-fast`

# The settings of the session's `trained_run` (conftest): a resumed run must keep them.
TRAINED_RUN = {"sample": {"every_n_steps": 6, "sample_model": "train", "size": "64x64", "steps": 2, "seeds": [0]}}


def _copy(trained_run: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    (run_dir / LOCK_NAME).unlink(missing_ok=True)
    return run_dir


def _modes(run_dir: Path) -> dict[str, int]:
    """Permission bits of every file and folder the run wrote (the lock file is its own)."""
    return {str(p.relative_to(run_dir)): stat.S_IMODE(p.stat().st_mode) for p in run_dir.rglob("*")
            if p.name != LOCK_NAME and "wandb" not in p.parts}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_a_finished_run_trains_longer_and_exports_again(trained_run, tiny_model, train_dataset, tmp_path):
    """max_steps 6 -> 8 and `--resume latest`: steps 7 and 8 train from checkpoint 6, and the final
    export replaces the step-6 LoRA files in the folders the first export created."""
    run_dir = _copy(trained_run, tmp_path)
    config = write_config(tmp_path / "c.toml", model_dir=tiny_model.diffusers_dir, dataset=train_dataset,
                          run_dir=run_dir, train={"max_steps": 8}, **TRAINED_RUN)
    result = train_in_process(config, "--resume", "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoint-000006'} at step 6" in result.stderr
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["checkpoint-000006", "checkpoint-000008"]
    with safe_open(str(run_dir / "test_lora.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_steps"] == "8"
    for name in ("test_lora.safetensors", "diffusers/pytorch_lora_weights.safetensors"):
        final, step8 = _tensors(run_dir / name), _tensors(run_dir / "checkpoint-000008" / name)
        before = _tensors(trained_run / name)
        assert all(torch.equal(final[k], step8[k]) for k in final), name
        assert any(not torch.equal(final[k], before[k]) for k in final), f"{name} still holds the step-6 weights"
    steps = [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]
    wrong = {path: oct(mode) for path, mode in _modes(run_dir).items()
             if mode != normal_mode(folder=(run_dir / path).is_dir())}
    assert not wrong, f"outputs not following the umask ({oct(normal_mode())}): {wrong}"


def test_resume_skips_a_damaged_newest_checkpoint_of_a_finished_run(trained_run, tiny_model, train_dataset,
                                                                    tmp_path):
    """The newest checkpoint (step 6) of a finished run is truncated: `--resume latest` falls back to
    step 4, trains steps 5 and 6 again, bit for bit as before, and exports over the earlier files."""
    run_dir = _copy(trained_run, tmp_path)
    damaged = run_dir / "checkpoint-000006" / "adapter_0.safetensors"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    config = write_config(tmp_path / "c.toml", model_dir=tiny_model.diffusers_dir, dataset=train_dataset,
                          run_dir=run_dir, **TRAINED_RUN)
    result = train_in_process(config, "--resume", "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{damaged}" in result.stderr and "falling back to the previous checkpoint" in result.stderr
    assert f"resumed from {run_dir / 'checkpoint-000004'} at step 4" in result.stderr
    for name in ("ranks/lora_rank0.safetensors", "test_lora.safetensors", "checkpoint-000006/adapter_0.safetensors",
                 "diffusers/pytorch_lora_weights.safetensors"):
        expected, again = _tensors(trained_run / name), _tensors(run_dir / name)
        assert expected.keys() == again.keys()
        assert all(torch.equal(expected[k], again[k]) for k in expected), name


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_export_into_a_folder_an_earlier_export_wrote(lora_pipeline, tmp_path, umask):
    """Both LoRA files written twice into the same place: the second replaces the first (new
    weights), files beside them are left alone, and both get the umask's mode."""
    from train.lora.export import save_diffusers_lora, save_webui_lora, webui_metadata

    metadata = webui_metadata(rank=4, alpha=2.0, output_name="x", resolution=64, tag_frequency={}, comment="test")
    (tmp_path / "diffusers").mkdir()
    (tmp_path / "diffusers" / "notes.txt").write_text("mine")
    old_mask = os.umask(umask)
    try:
        for seed in (0, 1):
            pipe = lora_pipeline(seed=seed)
            save_webui_lora(tmp_path / "x.safetensors", unet=pipe.unet, metadata=metadata)
            save_diffusers_lora(tmp_path / "diffusers", unet=pipe.unet)
    finally:
        os.umask(old_mask)
    fresh = tmp_path / "fresh"
    save_diffusers_lora(fresh, unet=pipe.unet)  # the second export alone, into a new folder
    written, expected = (_tensors(folder / "pytorch_lora_weights.safetensors") for folder in (tmp_path / "diffusers", fresh))
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in written)
    assert (tmp_path / "diffusers" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "diffusers").iterdir()) == ["notes.txt", "pytorch_lora_weights.safetensors"]
    for path in (tmp_path / "x.safetensors", tmp_path / "diffusers" / "pytorch_lora_weights.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
