"""What a run records besides checkpoints: metrics, the samples each rank drew, sample grids.

- `RUN/log.jsonl` (main process): the logged metrics as JSON lines, readable without TensorBoard;
- `RUN/draws/rank<R>.jsonl` (every rank): step, epoch, batch, entry numbers and image ids of each
  micro-batch, so "which images were in step N" and "did the ranks share samples" are answerable;
- the accelerate trackers (TensorBoard, wandb): metrics and sample grids.

A fresh run truncates its logs; a resumed run appends to them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class DrawLog:
    """One JSON line per micro-batch drawn by this rank."""

    def __init__(self, path: Path, append: bool):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115 (open for the run)

    def write(self, step: int, batch, ids: list[str]) -> None:
        record = {"step": step, "epoch": batch.epoch, "batch": batch.index, "entries": list(batch.entries), "ids": ids}
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()


class MetricsLog:
    """`RUN/log.jsonl` (only where `enabled`: the main process)."""

    def __init__(self, path: Path, enabled: bool, append: bool):
        self.path, self.enabled = path, enabled
        if enabled and not append:
            path.unlink(missing_ok=True)

    def write(self, step: int, metrics: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": step, **metrics}) + "\n")


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="training", disable=not enabled, dynamic_ncols=True)


def flat_config(tree: dict, prefix: str = "") -> dict:
    """Nested config -> {"section.key": scalar} for trackers (lists and None as strings)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def log_image(trackers, name: str, image, step: int) -> None:
    """Send a PIL image / (H, W, 3) uint8 array to every TensorBoard and wandb tracker."""
    array = np.asarray(image)
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(name, array, step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: wandb.Image(array)}, step=step)
