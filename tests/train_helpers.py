"""Helpers for the trainer tests: a small prepped dataset and configs for the tiny model."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

import datasets
from train.names import DATASET_COLUMNS

REPO = Path(__file__).resolve().parents[1]

# (id, bucket (w, h), repeats, split)
ROWS = [
    ("a.png", (64, 64), 2, "train"),
    ("b.png", (64, 64), 2, "train"),
    ("c.png", (64, 64), 2, "train"),
    ("d.png", (64, 96), 2, "train"),
    ("e.png", (64, 96), 2, "train"),
    ("f.png", (64, 64), 1, "val"),
]


def make_dataset(out: Path, seed: int = 0, masks: bool = False) -> Path:
    """A prepped dataset (the columns of `train.names.DATASET_COLUMNS`) of small generated images at `out/dataset`.

    `masks`: a `mask_path` column as prep writes it: a.png gets an alpha channel (its left half
    transparent), b.png a `b.mask.png` beside it, the others none.
    """
    rng = np.random.default_rng(seed)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    columns: dict[str, list] = {name: [] for name in DATASET_COLUMNS if masks or name != "mask_path"}
    for i, (name, (bw, bh), repeats, split) in enumerate(ROWS):
        # Originals a bit larger than the bucket, so resize and crop are exercised.
        width, height = bw + 16, bh + 8 * (i % 2)
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        path = images / name
        mask_path = None
        if masks and name == "a.png":
            alpha = np.full((height, width, 1), 255, dtype=np.uint8)
            alpha[:, : width // 2] = 0
            Image.fromarray(np.concatenate([pixels, alpha], axis=2), "RGBA").save(path)
            mask_path = str(path)
        else:
            Image.fromarray(pixels).save(path)
        if masks and name == "b.png":
            mask_path = str(images / "b.mask.png")
            Image.fromarray(np.tri(height, width, dtype=np.uint8) * 255).save(mask_path)
        row = {
            "id": name, "image_path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "width": width, "height": height, "bucket_width": bw, "bucket_height": bh,
            "resize_width": round(width * bh / height) if width / height > bw / bh else bw,
            "resize_height": bh if width / height > bw / bh else round(height * bw / width),
            "crop_left": 0, "crop_top": 0,
            "caption_head": ["1girl", "mira"], "caption_body": ["blue hair", "smile", f"tag{i}"],
            "caption_tail": ["safe", "masterpiece"], "repeats": repeats, "rating": "g", "score": None,
            "year": 2024, "source": "test", "split": split, "metadata": "{}",
            **({"mask_path": mask_path} if masks else {}),
        }
        row["crop_left"] = (row["resize_width"] - bw) // 2
        row["crop_top"] = (row["resize_height"] - bh) // 2
        for key, value in row.items():
            columns[key].append(value)
    datasets.Dataset.from_dict(columns).save_to_disk(str(out / "dataset"))
    return out


def write_config(path: Path, *, model_dir: Path, dataset: Path, run_dir: Path, **sections) -> Path:
    """A training config for the tiny model; `sections` override tables, e.g. train={"max_steps": 4}."""
    tables = {
        "model": {"source": str(model_dir), "weight_dtype": "fp32"},
        "data": {"dataset": str(dataset), "tag_dropout": 0.2, "caption_dropout": 0.1, "flip": True},
        "lora": {"rank": 2, "alpha": 2},
        "optimizer": {"lr": 1e-2, "warmup_steps": 2, "scheduler": "cosine"},
        "train": {"max_steps": 6, "batch_size": 1, "gradient_accumulation_steps": 2, "mixed_precision": "no",
                  "noise_offset": 0.05, "min_snr_gamma": 5.0, "seed": 3},
        "output": {"dir": str(run_dir), "name": "test_lora", "save_every_n_steps": 2,
                   "checkpoints_total_limit": 2, "log_every_n_steps": 1,
                   "log_with": ["tensorboard"]},
    }
    for name, values in sections.items():
        tables[name] = {**tables.get(name, {}), **values}
    lines = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train_command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "train", str(config), *extra]


def run(command: list[str], timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def popen(command: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@dataclass
class InProcessResult:
    returncode: int
    stderr: str  # the log lines, as the command line prints them


def run_in_process(argv: list[str]) -> InProcessResult:
    """`animagine-lora ARGV` in this process, like `run` but without a new interpreter's start-up
    and imports (most of a tiny training run's time).

    One torch thread, as the subprocesses run (OMP_NUM_THREADS=1), so a run gives the same bits here
    as there; accelerate's process-wide state is reset afterwards. An exception propagates.
    """
    import torch
    from accelerate.state import AcceleratorState

    from train.cli import main

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    level, threads = root.level, torch.get_num_threads()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    torch.set_num_threads(1)
    try:
        code = main(argv)
    finally:
        torch.set_num_threads(threads)
        root.removeHandler(handler)
        root.setLevel(level)
        AcceleratorState._reset_state(reset_partial_state=True)
    return InProcessResult(code, stream.getvalue())


def train_in_process(config: Path, *extra: str) -> InProcessResult:
    """`animagine-lora train CONFIG EXTRA...` in this process (see `run_in_process`)."""
    return run_in_process(["train", str(config), *extra])
