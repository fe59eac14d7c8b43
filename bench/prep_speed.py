"""Dataset prep throughput: is prep dominated by image decoding?

Builds a synthetic folder of JPEG and PNG files of mixed sizes (noise + gradients, so the codecs
do real work), then times, in images/s:
  decode   `captioning.images.load_rgb` alone, one process: the floor prep cannot beat per core
  validate the parallel validation stage (decode + sha256 + checks) with 1 and N workers
  prep     the whole `prepare()` (listing, validation, captions with the tag database and CLIP
           token counter shipped with captioning, buckets, Arrow write, report)
Prints a table and writes bench/results/prep_speed.json.

    python bench/prep_speed.py                 # 400 images, workers 1 and all cores
    python bench/prep_speed.py --tiny          # 16 small images: a smoke run for CI
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from captioning.images import load_rgb
from train.prep.pipeline import RunOptions, load_caption_tools, prepare
from train.prep.recipe import parse_recipe
from train.prep.validate import ValidateOptions, validate_many

SIZES = [
    (832, 1216),
    (1024, 1024),
    (1216, 832),
    (1536, 640),
    (896, 1152),
    (2048, 1536),
    (1344, 768),
]
TINY_SIZES = [(512, 640), (640, 512), (512, 512)]


def make_images(
    folder: Path, count: int, sizes: list[tuple[int, int]], seed: int = 0
) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        width, height = sizes[index % len(sizes)]
        gradient = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
        noise = rng.normal(0, 40, (height, width, 3)).astype(np.float32)
        pixels = np.clip(gradient + noise, 0, 255).astype(np.uint8)
        path = folder / f"{index:05d}.{'jpg' if index % 2 else 'png'}"
        Image.fromarray(pixels).save(path, quality=90) if index % 2 else Image.fromarray(
            pixels
        ).save(path, compress_level=1)
        path.with_suffix(".txt").write_text("1girl, solo, smile, long hair", encoding="utf-8")
        paths.append(path)
    return paths


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tiny", action="store_true", help="16 small images (smoke run)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "prep_speed.json"))
    args = parser.parse_args()
    count, sizes = (16, TINY_SIZES) if args.tiny else (args.images, SIZES)
    results: dict = {
        "images": count,
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp) / "images"
        folder.mkdir()
        paths = make_images(folder, count, sizes)
        results["megabytes"] = round(sum(p.stat().st_size for p in paths) / 2**20, 1)
        random.seed(0)
        start = time.perf_counter()
        for path in paths:
            load_rgb(path)
        results["runs"].append(
            {
                "stage": "decode",
                "workers": 1,
                "images_per_s": rate(count, time.perf_counter() - start),
            }
        )
        for workers in sorted({1, args.workers}):
            start = time.perf_counter()
            for _ in validate_many(
                map(str, paths), str, ValidateOptions(min_side=512), workers=workers
            ):
                pass
            results["runs"].append(
                {
                    "stage": "validate",
                    "workers": workers,
                    "images_per_s": rate(count, time.perf_counter() - start),
                }
            )
        caption = {}  # the shipped tag database and CLIP token counter, as users run it
        results["captioning"] = "tag db + CLIP tokens"
        recipe = parse_recipe(
            {"sources": [{"name": "bench", "path": str(folder)}], "caption": caption}, "bench"
        )
        # One-off set-up (tag database, tokenizer): seconds per run, not per image.
        start = time.perf_counter()
        load_caption_tools(recipe.caption, recipe.sources)
        results["setup_s"] = round(time.perf_counter() - start, 2)
        for workers in sorted({1, args.workers}):
            start = time.perf_counter()
            prepare(
                recipe,
                Path(temp) / f"out{workers}",
                RunOptions(workers=workers, force=True, show_summary=False),
            )
            elapsed = time.perf_counter() - start
            results["runs"].append(
                {
                    "stage": "prep",
                    "workers": workers,
                    "images_per_s": rate(count, elapsed),
                }
            )
            results["runs"].append(
                {
                    "stage": "prep - setup",
                    "workers": workers,
                    "images_per_s": rate(count, elapsed - results["setup_s"]),
                }
            )
    decode = results["runs"][0]["images_per_s"]
    for run in results["runs"]:
        run["images_per_s"] = round(run["images_per_s"], 1)
        # Per-worker throughput relative to decoding alone: ~1.0 means decoding dominates.
        run["per_worker_vs_decode"] = round(run["images_per_s"] / run["workers"] / decode, 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")

    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"prep speed: {count} images, {results['megabytes']} MB, {os.cpu_count()} CPUs, "
        f"set-up {results['setup_s']} s ({results['captioning']})"
    )
    for column in ("stage", "workers", "images/s", "per worker / decode"):
        table.add_column(column, justify="right")
    for run in results["runs"]:
        table.add_row(
            run["stage"],
            str(run["workers"]),
            f"{run['images_per_s']:.1f}",
            f"{run['per_worker_vs_decode']:.2f}",
        )
    Console().print(table)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
