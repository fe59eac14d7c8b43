"""Training progress, checkpoints that are never half-written, and `latest` resolution.

A checkpoint is `RUN/checkpoint-000123/`: accelerate's `save_state` output (only the trainable
weights, via `register_lora_checkpointing`, optimizer, RNG states of every process, the LR scheduler and the
`TrainState` registered for checkpointing) plus the exported LoRA files. It is written into
`RUN/.tmp-checkpoint-000123/`, completed with `train_state.json` last, then renamed into place:
a rename is atomic, so a crash leaves either no checkpoint or a complete one, and `latest` only
considers names matching `checkpoint-NNNNNN` that hold `train_state.json`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d{6,})$")
COMPLETE_MARKER = "train_state.json"


@dataclass
class TrainState:
    """Everything about progress that is not a tensor: restored exactly on resume.

    `sampler` is `BucketBatchSampler.state_dict()` at the last optimizer step.
    """

    step: int = 0  # optimizer steps done
    epoch: int = 0
    sampler: dict = field(default_factory=lambda: {"epoch": 0, "position": 0})
    seed: int = 0
    images_seen: int = 0  # global, all processes
    best_val_loss: float | None = None  # lowest validation loss so far (output.keep_best)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `run_dir`, oldest first (by step)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for child in run_dir.iterdir():
        match = CHECKPOINT_RE.match(child.name)
        if match and child.is_dir() and (child / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def resolve_resume(value: str, run_dir: str | Path) -> Path | None:
    """`--resume` argument to a checkpoint folder.

    "latest": the newest complete checkpoint in `run_dir`, or None when there is none (a fresh
    start). Anything else is a path that must be a complete checkpoint.

    Raises:
        FileNotFoundError: the path is not a complete checkpoint.
    """
    if value == "latest":
        checkpoints = list_checkpoints(run_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(value)
    if not (path / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {COMPLETE_MARKER})")
    return path


def temp_dir(run_dir: Path, step: int) -> Path:
    """The folder a checkpoint is written into before `publish` (same on every process)."""
    return run_dir / f".tmp-{checkpoint_name(step)}"


def publish(temp: Path, run_dir: Path, step: int, state: TrainState) -> Path:
    """Mark `temp` complete and rename it to `checkpoint-NNNNNN` (main process only)."""
    marker = temp / COMPLETE_MARKER
    marker.with_suffix(".tmp").write_text(json.dumps(state.state_dict(), indent=2), "utf-8")
    os.replace(marker.with_suffix(".tmp"), marker)
    final = run_dir / checkpoint_name(step)
    if final.exists():  # re-saving the same step after a resume: replace it
        shutil.rmtree(final)
    os.replace(temp, final)
    return final


def rotate(run_dir: Path, keep: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `keep` (None keeps all); returns them."""
    if keep is None:
        return []
    old = list_checkpoints(run_dir)[:-keep] if keep else list_checkpoints(run_dir)
    for path in old:
        shutil.rmtree(path)
    return old


# ---------------------------------------------------------------- with accelerate


def register_lora_checkpointing(accelerator) -> None:
    """Make `save_state`/`load_state` store only the trainable (LoRA) weights of each model.

    Without this a checkpoint would hold the whole frozen UNet (5 GB for SDXL) every time.
    """

    def save_hook(models, weights, output_dir):
        for i, model in enumerate(models):
            if accelerator.is_main_process:
                save_file(trainable_state(accelerator.unwrap_model(model)), str(Path(output_dir) / f"adapter_{i}.safetensors"))
        weights.clear()

    def load_hook(models, input_dir):
        for i, model in enumerate(models):
            path = Path(input_dir) / f"adapter_{i}.safetensors"
            state = load_file(str(path))
            unwrapped = accelerator.unwrap_model(model)
            expected = set(trainable_state(unwrapped))
            if set(state) != expected:
                raise ValueError(f"{path}: LoRA weights do not match this config's adapters "
                                 f"({len(set(state) ^ expected)} keys differ); same lora.* settings needed to resume")
            unwrapped.load_state_dict(state, strict=False)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(accelerator, run_dir: Path, state: TrainState, export, keep: int | None) -> None:
    """accelerate state + LoRA files (`export(folder, step)`) into a temp folder, then an atomic rename.

    Called on every process: `save_state` writes each rank's RNG state; the main process writes the rest.
    """
    temp = temp_dir(run_dir, state.step)
    if accelerator.is_main_process and temp.exists():
        shutil.rmtree(temp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        export(temp, state.step)
        final = publish(temp, run_dir, state.step, state)
        rotate(run_dir, keep)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()


BEST_DIR = "best"
BEST_INFO = "best.json"


def save_best(run_dir: Path, step: int, val_loss: float, export) -> Path:
    """`RUN/best/`: the LoRA files (`export(folder, step)`) and `best.json` with the step and the
    validation loss, written beside it and swapped in by renames (main process only)."""
    temp, final = run_dir / f".tmp-{BEST_DIR}", run_dir / BEST_DIR
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir(parents=True)
    export(temp, step)
    (temp / BEST_INFO).write_text(json.dumps({"step": step, "val_loss": val_loss}, indent=2), "utf-8")
    old = run_dir / f".old-{BEST_DIR}"
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(temp, final)
    shutil.rmtree(old, ignore_errors=True)
    logger.info("best validation loss %.6f at step %d: kept in %s", val_loss, step, final)
    return final


def write_rank_weights(run_dir: Path, accelerator, unet) -> None:
    """Each rank's final LoRA weights, so a multi-process run can show they agree."""
    path = run_dir / "ranks" / f"lora_rank{accelerator.process_index}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state(accelerator.unwrap_model(unet)), str(path))
