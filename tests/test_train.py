"""End-to-end training of the tiny model: losses, export, exact resume after SIGKILL, NaN stop,
atomic checkpoints, and two processes under `accelerate launch` (gloo on CPU)."""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from train_helpers import (
    make_dataset,
    popen,
    run,
    run_in_process,
    train_command,
    train_in_process,
    write_config,
)

from train.runtime import checkpoint

pytestmark = pytest.mark.heavy  # trains tiny models: left out of `make test-fast`


@pytest.fixture(scope="module")
def dataset(train_dataset) -> Path:
    return train_dataset


@pytest.fixture(scope="module")
def uninterrupted(trained_run) -> Path:
    """The session's complete 6-step run (conftest `trained_run`), shared with test_resume_safety."""
    return trained_run


def _lora(run_dir: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "ranks" / f"lora_rank{rank}.safetensors"))


def test_losses_are_finite_and_logged(uninterrupted):
    records = [json.loads(line) for line in (uninterrupted / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    assert all(math.isfinite(r["grad_norm"]) for r in records)
    assert records[0]["lr"] < records[1]["lr"]  # warm-up, then the cosine decay
    assert list((uninterrupted / "logs").rglob("events.out.tfevents.*")), "no TensorBoard log"
    assert (uninterrupted / "samples" / "step-000006.png").is_file()
    assert list((uninterrupted / "wandb").glob("offline-run-*")), "no offline wandb run"


def test_lora_b_changed_and_exports_load(uninterrupted, tiny_model):
    weights = _lora(uninterrupted)
    b = [v for k, v in weights.items() if "lora_B" in k]
    assert b and all(torch.isfinite(v).all() for v in b)
    assert any(v.abs().max() > 0 for v in b), "LoRA B is still zero: nothing trained"
    webui = uninterrupted / "test_lora.safetensors"
    assert webui.is_file() and (uninterrupted / "diffusers" / "pytorch_lora_weights.safetensors").is_file()
    for ckpt in checkpoint.list_checkpoints(uninterrupted):
        assert (ckpt / "test_lora.safetensors").is_file()
    assert [p.name for p in checkpoint.list_checkpoints(uninterrupted)] == ["checkpoint-000004", "checkpoint-000006"]

    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model.diffusers_dir))
    pipe.load_lora_weights(str(webui), adapter_name="webui")
    pipe.load_lora_weights(str(uninterrupted / "diffusers"), adapter_name="peft")
    assert set(pipe.get_list_adapters()["unet"]) == {"webui", "peft"}


def test_resume_after_sigkill_is_bitwise_exact(uninterrupted, tiny_model, dataset, tmp_path):
    config = write_config(tmp_path / "c.toml", model_dir=tiny_model.diffusers_dir, dataset=dataset,
                          run_dir=tmp_path / "run")
    process = popen(train_command(config))
    first = tmp_path / "run" / "checkpoint-000002" / checkpoint.CHECKPOINT_COMPLETE
    deadline = time.monotonic() + 150
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "run" / "test_lora.safetensors").exists()
    killed_at = checkpoint.list_checkpoints(tmp_path / "run")[-1].name

    result = train_in_process(config, "--resume", "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {tmp_path / 'run' / killed_at}" in result.stderr
    expected, resumed = _lora(uninterrupted), _lora(tmp_path / "run")
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    assert load_file(str(tmp_path / "run" / "test_lora.safetensors")).keys() == \
        load_file(str(uninterrupted / "test_lora.safetensors")).keys()


def test_prefetching_changes_nothing(uninterrupted, tiny_model, dataset, tmp_path):
    """data.prefetch_batches = 0 builds each micro-batch in the loop: the same run, bit for bit."""
    config = write_config(tmp_path / "c.toml", model_dir=tiny_model.diffusers_dir, dataset=dataset,
                          run_dir=tmp_path / "run", data={"prefetch_batches": 0})
    result = train_in_process(config)
    assert result.returncode == 0, result.stderr[-3000:]
    expected, plain = _lora(uninterrupted), _lora(tmp_path / "run")
    assert expected.keys() == plain.keys()
    assert all(torch.equal(expected[k], plain[k]) for k in expected)
    draws = [(tmp_path / "run" / "draws" / "rank0.jsonl").read_text(),
             (uninterrupted / "draws" / "rank0.jsonl").read_text()]
    assert draws[0] == draws[1]


def test_cached_text_outputs_train_the_same_lora(tiny_model, dataset, tmp_path):
    """data.cache_text_outputs: captions encoded once up front (encoders then off the GPU) give
    the LoRA that encoding every step gives."""
    fixed = {"shuffle_captions": False, "tag_dropout": 0.0, "caption_dropout": 0.0}
    runs = []
    for cached in (False, True):
        root = tmp_path / f"cached{cached}"
        root.mkdir()
        config = write_config(root / "c.toml", model_dir=tiny_model.diffusers_dir, dataset=dataset,
                              run_dir=root / "run", data={**fixed, "cache_text_outputs": cached},
                              train={"max_steps": 3}, output={"save_every_n_steps": 3})
        result = train_in_process(config)
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("captions encoded" in result.stderr) is cached
        runs.append(_lora(root / "run"))
    assert runs[0].keys() == runs[1].keys()
    for key in runs[0]:
        torch.testing.assert_close(runs[1][key], runs[0][key], rtol=1e-5, atol=1e-7, msg=key)


def test_latest_ignores_incomplete_checkpoints(tmp_path):
    state = checkpoint.TrainState(step=2)
    complete = checkpoint.temp_dir(tmp_path, 2)
    complete.mkdir()
    checkpoint.publish(complete, tmp_path, 2, state)
    (tmp_path / "checkpoint-000004").mkdir()  # crashed before completion (no marker)
    checkpoint.temp_dir(tmp_path, 6).mkdir()  # crashed mid-write
    assert checkpoint.resolve_resume("latest", tmp_path) == tmp_path / "checkpoint-000002"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoint.resolve_resume(str(tmp_path / "checkpoint-000004"), tmp_path)
    assert checkpoint.resolve_resume("latest", tmp_path / "empty") is None
    for step in (8, 10):
        temp = checkpoint.temp_dir(tmp_path, step)
        temp.mkdir()
        checkpoint.publish(temp, tmp_path, step, checkpoint.TrainState(step=step))
    checkpoint.rotate(tmp_path, 2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-000008", "checkpoint-000010"]


def test_nan_loss_stops_with_step_images_and_checkpoint(tiny_model, tmp_path):
    prep = make_dataset(tmp_path / "prep", seed=1)
    config = write_config(tmp_path / "c.toml", model_dir=tiny_model.diffusers_dir, dataset=prep,
                          run_dir=tmp_path / "run", data={"flip": False},
                          train={"max_steps": 20, "gradient_accumulation_steps": 1}, output={"save_every_n_steps": 50})
    result = run_in_process(["cache", str(config)])
    assert result.returncode == 0, result.stderr[-3000:]
    poisoned = sorted((prep / "latents").rglob(f"{_sha(prep, 'd.png')}_*.safetensors"))
    assert len(poisoned) == 1
    latents = load_file(str(poisoned[0]))["latents"]
    save_file({"latents": torch.full_like(latents, float("nan"))}, str(poisoned[0]))

    result = train_in_process(config)
    assert result.returncode == 1, result.stderr[-3000:]
    message = next(line for line in result.stderr.splitlines() if "loss is nan" in line)
    assert "images: d.png" in message and "at step " in message and "last checkpoint:" in message
    step = int(message.split("at step ")[1].split()[0])
    if step > 1:  # the weights from before the failing step are kept
        assert checkpoint.list_checkpoints(tmp_path / "run")[-1].name == checkpoint.checkpoint_name(step - 1)
    assert not (tmp_path / "run" / "test_lora.safetensors").exists()


def _sha(prep: Path, image_id: str) -> str:
    import datasets

    table = datasets.load_from_disk(str(prep / "dataset"))
    return next(r["sha256"] for r in table if r["id"] == image_id)


def test_two_processes_draw_disjoint_samples_and_agree(tiny_model, dataset, tmp_path):
    if shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None:
        pytest.fail("accelerate CLI missing from the venv")
    # With regularization rows (the dataset as its own class set) and the validation loss: one
    # rank holds the only val image, the other none, and the loss is reduced over both.
    config = write_config(tmp_path / "c.toml", model_dir=tiny_model.diffusers_dir, dataset=dataset,
                          run_dir=tmp_path / "run", train={"max_steps": 4, "gradient_accumulation_steps": 1},
                          data={"regularization": str(dataset)}, validation={"every_n_steps": 4, "timesteps": [500]},
                          output={"save_every_n_steps": 4})
    accelerate = str(Path(sys.executable).parent / "accelerate")
    # `accelerate launch --cpu` starts one process unless MPI is set up; torchrun's multi-process
    # launcher plus ACCELERATE_USE_CPU gives DDP over gloo on CPU.
    result = run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
                  "-m", "train", str(config)], timeout=240, env={"ACCELERATE_USE_CPU": "true"})
    assert result.returncode == 0, result.stderr[-4000:]
    draws = [[json.loads(line) for line in (tmp_path / "run" / "draws" / f"rank{r}.jsonl").read_text().splitlines()]
             for r in range(2)]
    assert len(draws[0]) == len(draws[1]) == 4
    val = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in val if "val_loss" in r] == [4]
    for epoch in {d["epoch"] for d in draws[0]}:
        entries = [{e for d in rank if d["epoch"] == epoch for e in d["entries"]} for rank in draws]
        assert not entries[0] & entries[1], f"ranks drew the same samples in epoch {epoch}"
    lora = [_lora(tmp_path / "run", r) for r in range(2)]
    assert lora[0].keys() == lora[1].keys()
    assert all(torch.equal(lora[0][k], lora[1][k]) for k in lora[0])
    assert any(v.abs().max() > 0 for k, v in lora[0].items() if "lora_B" in k)


def test_bf16_weights_autocast_and_gradient_checkpointing(tiny_model, dataset, tmp_path):
    """The GPU settings (bf16 frozen weights, bf16 autocast, checkpointing) on CPU: LoRA stays fp32."""
    config = write_config(tmp_path / "c.toml", model_dir=tiny_model.diffusers_dir, dataset=dataset,
                          run_dir=tmp_path / "run", model={"weight_dtype": "bf16"},
                          train={"max_steps": 2, "gradient_accumulation_steps": 1, "mixed_precision": "bf16",
                                 "gradient_checkpointing": True}, output={"save_every_n_steps": 2})
    result = train_in_process(config)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
    weights = _lora(tmp_path / "run")
    assert all(v.dtype == torch.float32 for v in weights.values())
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)


@pytest.mark.parametrize("mode", ["fp8", "nf4"])
def test_quantized_base_trains_and_exports(tiny_model, dataset, tmp_path, mode):
    """model.quantize: the frozen UNet is compressed after the adapters exist; the run trains the
    LoRA (fp32) and exports files that load into an ordinary pipeline."""
    config = write_config(tmp_path / "c.toml", model_dir=tiny_model.diffusers_dir, dataset=dataset,
                          run_dir=tmp_path / "run", model={"weight_dtype": "bf16", "quantize": mode},
                          train={"max_steps": 2, "gradient_accumulation_steps": 1, "mixed_precision": "bf16",
                                 "gradient_checkpointing": True}, output={"save_every_n_steps": 2})
    result = train_in_process(config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"model.quantize = {mode}: frozen UNet weights" in result.stderr
    weights = _lora(tmp_path / "run")
    assert all(v.dtype == torch.float32 for v in weights.values())
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model.diffusers_dir))
    pipe.load_lora_weights(str(tmp_path / "run" / "test_lora.safetensors"))


def test_dora_run_exports_the_diffusers_folder_only(tiny_model, dataset, tmp_path):
    """The WebUI writer refuses DoRA (loaders disagree on it); the run must still finish and export."""
    config = write_config(tmp_path / "c.toml", model_dir=tiny_model.diffusers_dir, dataset=dataset,
                          run_dir=tmp_path / "run", lora={"dora": True},
                          train={"max_steps": 1, "gradient_accumulation_steps": 1}, output={"save_every_n_steps": 1})
    result = train_in_process(config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "only the diffusers-format LoRA is exported" in result.stderr
    assert not (tmp_path / "run" / "test_lora.safetensors").exists()
    weights = load_file(str(tmp_path / "run" / "diffusers" / "pytorch_lora_weights.safetensors"))
    assert any("lora_magnitude_vector" in key for key in weights)


def test_regularization_masks_validation_and_ema_run_and_resume_exactly(tiny_model, tmp_path):
    """Regularization, masked loss, validation and EMA at once (the dataset is its own class set): the validation loss
    is logged and the best step kept, the EMA is the run's LoRA with the raw weights beside it,
    and a run resumed from its step-2 checkpoint ends bit for bit where the full run ended."""
    prep = make_dataset(tmp_path / "prep", masks=True)
    sections = {"data": {"regularization": str(prep), "prior_loss_weight": 0.5, "flip": False},
                "train": {"masked_loss": True, "ema_decay": 0.9, "max_steps": 4, "gradient_accumulation_steps": 1},
                "validation": {"every_n_steps": 2, "timesteps": [300, 700]}, "output": {"keep_best": True}}
    runs = {name: tmp_path / name for name in ("full", "resumed")}
    configs = {name: write_config(tmp_path / f"{name}.toml", model_dir=tiny_model.diffusers_dir, dataset=prep,
                                  run_dir=folder, **sections) for name, folder in runs.items()}
    result = train_in_process(configs["full"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data.regularization: 5 class images" in result.stderr
    assert "train.masked_loss: 4 of 10 images have a mask" in result.stderr

    records = [json.loads(line) for line in (runs["full"] / "log.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert list(val) == [2, 4] and all(math.isfinite(v) and v > 0 for v in val.values())
    best = json.loads((runs["full"] / "best" / "best.json").read_text())
    assert best == {"step": min(val, key=val.get), "val_loss": min(val.values())}
    assert (runs["full"] / "best" / "test_lora.safetensors").is_file()

    from safetensors import safe_open

    ema, raw = (load_file(str(runs["full"] / f"test_lora{s}.safetensors")) for s in ("", "-raw"))
    assert ema.keys() == raw.keys() and any(not torch.equal(ema[k], raw[k]) for k in ema)
    with safe_open(str(runs["full"] / "test_lora.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_ema_decay"] == "0.9" and handle.metadata()["ss_num_reg_images"] == "5"
    assert (runs["full"] / "diffusers-raw" / "pytorch_lora_weights.safetensors").is_file()

    shutil.copytree(runs["full"] / "checkpoint-000002", runs["resumed"] / "checkpoint-000002")
    result = train_in_process(configs["resumed"], "--resume", "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("ranks/lora_rank0.safetensors", "checkpoint-000004/ema.safetensors", "test_lora.safetensors"):
        expected, resumed = (load_file(str(folder / name)) for folder in runs.values())
        assert expected.keys() == resumed.keys()
        assert all(torch.equal(expected[k], resumed[k]) for k in expected), name


def test_lokr_with_schedule_free_trains_samples_and_exports_lycoris(tiny_model, dataset, tmp_path):
    """lora.type = "lokr" with schedule-free AdamW: the run samples on the "opt" pipeline (the adapter
    copied through PEFT), writes a LyCORIS WebUI file, and its diffusers folder reloads."""
    config = write_config(tmp_path / "c.toml", model_dir=tiny_model.diffusers_dir, dataset=dataset,
                          run_dir=tmp_path / "run", lora={"type": "lokr", "preset": "attn-mlp-conv", "factor": 4},
                          optimizer={"name": "adamw_schedulefree", "scheduler": "constant", "warmup_steps": 0},
                          train={"max_steps": 1, "gradient_accumulation_steps": 1},
                          sample={"every_n_steps": 1, "sample_model": "opt", "opt_model": str(tiny_model.diffusers_dir),
                                  "size": "64x64", "steps": 2, "seeds": [0]})
    result = train_in_process(config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "samples" / "step-000001.png").is_file()
    with safe_open(str(tmp_path / "run" / "test_lora.safetensors"), "pt") as f:
        metadata, keys = f.metadata(), list(f.keys())
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"])["algo"] == "lokr"
    assert any(key.endswith(".lokr_w1") for key in keys) and not any("lora_down" in key for key in keys)
    # pipe.load_lora_weights refuses keys without "lora"; the UNet's own loader reads LoKr (diffusers 0.42).
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model.diffusers_dir))
    pipe.unet.load_lora_adapter(str(tmp_path / "run" / "diffusers"), weight_name="pytorch_lora_weights.safetensors",
                                prefix="unet", adapter_name="lokr")
    assert type(pipe.unet.peft_config["lokr"]).__name__ == "LoKrConfig"
