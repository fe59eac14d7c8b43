"""Training progress, checkpoints that are never half-written, and `latest` resolution.

A checkpoint is `RUN/checkpoint-000123/`: accelerate's `save_state` output (trainable weights via
the hooks in `train.loop`, optimizer, RNG states of every process, the LR scheduler and the
`TrainState` registered for checkpointing) plus the exported LoRA files. It is written into
`RUN/.tmp-checkpoint-000123/`, completed with `train_state.json` last, then renamed into place:
a rename is atomic, so a crash leaves either no checkpoint or a complete one, and `latest` only
considers names matching `checkpoint-NNNNNN` that hold `train_state.json`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
