"""Captioning speed on synthetic, realistic Danbooru posts: posts/s for 1 process and --workers N.

Posts are drawn from the tag database by post count per category (~25-40 general tags, 0-2
characters, 1-2 copyrights, 1 artist, 1-3 meta tags, ratings, scores and dates), written as a
Danbooru JSON-lines file, then captioned by `animagine-lora caption` (1 worker, N workers) with
the shipped tag database, the real CLIP tokenizer and the 225-token budget, start-up included
(a fresh process per run: imports, loading the database and the tokenizer). The parts (parsing, the
captioner, a whole chunk) are timed in this process on the first 50,000 posts.
Target: 8.4M posts (a Danbooru-sized dump) in 5 minutes on 2 cores, about 28,000 posts/s.

    python bench/caption_speed.py                          # 1,000,000 posts, workers 1 and N
    python bench/caption_speed.py --cli-workers 2          # 1M posts, --workers 2 only
    python bench/caption_speed.py --posts 8400000 --cli-workers 2 --keep /tmp/posts.jsonl
                                                           # the full target, as one run
    python bench/caption_speed.py --posts 2000             # tiny mode (tests)

Writes bench/results/caption_speed.json (or --json PATH) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from itertools import accumulate, islice
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import orjson

from captioning import Captioner, Category, Post, TagDatabase, TokenCounter, chunks, load_profile
from captioning.readers import parse_danbooru_line
from captioning.tag_db import load_tag_database
from captioning.tokens import SHIPPED_CLIP_BPE

TARGET_POSTS_PER_S = 8_400_000 / 300
RATING_WEIGHTS = {"g": 0.35, "s": 0.35, "q": 0.15, "e": 0.15}
GENERATE_BLOCK = 50_000


class TagSampler:
    """Draws tags of one category with probability proportional to their post count."""

    def __init__(self, db: TagDatabase, category: Category) -> None:
        entries = db.tags_of(category)
        self.names = [n for n, _ in entries]
        self.cumulative = list(accumulate(c for _, c in entries))

    def draw(self, rng: random.Random, k: int) -> list[str]:
        return list(dict.fromkeys(rng.choices(self.names, cum_weights=self.cumulative, k=k)))


def synthetic_posts(db: TagDatabase, count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    samplers = {c: TagSampler(db, c) for c in (Category.GENERAL, Category.CHARACTER, Category.COPYRIGHT,
                                                Category.ARTIST, Category.META)}
    ratings, weights = list(RATING_WEIGHTS), list(RATING_WEIGHTS.values())
    start = datetime(2005, 1, 1, tzinfo=timezone.utc)
    span = (datetime(2025, 1, 7, tzinfo=timezone.utc) - start).total_seconds()
    posts = []
    for i in range(count):
        created = start + timedelta(seconds=rng.random() * span)
        posts.append({
            "id": i + 1,
            "rating": rng.choices(ratings, weights)[0],
            "score": int(rng.lognormvariate(2.5, 1.2)) - 2,
            "created_at": created.isoformat(timespec="milliseconds"),
            "media_asset": {"created_at": created.isoformat(timespec="milliseconds")},
            "tag_string_general": " ".join(samplers[Category.GENERAL].draw(rng, rng.randint(25, 40))),
            "tag_string_character": " ".join(samplers[Category.CHARACTER].draw(rng, rng.randint(0, 2))),
            "tag_string_copyright": " ".join(samplers[Category.COPYRIGHT].draw(rng, rng.randint(1, 2))),
            "tag_string_artist": " ".join(samplers[Category.ARTIST].draw(rng, 1)),
            "tag_string_meta": " ".join(samplers[Category.META].draw(rng, rng.randint(1, 3))),
        })
    return posts


_GENERATOR_DB: TagDatabase | None = None  # set before forking the generator pool


def _posts_block(task: tuple[int, int, int]) -> bytes:
    """Posts [start, start + count) as JSON lines; block `start` has its own seed, so the file
    is the same whatever the number of processes."""
    start, count, seed = task
    posts = synthetic_posts(_GENERATOR_DB, count, seed=seed * 1_000_003 + start)
    for i, post in enumerate(posts):
        post["id"] = start + i + 1
    return b"".join(orjson.dumps(p) + b"\n" for p in posts)


def write_synthetic_posts(db: TagDatabase, count: int, path: Path, seed: int = 0, workers: int = 1) -> None:
    """`count` synthetic posts as a Danbooru JSON-lines file, generated in blocks of 50,000."""
    global _GENERATOR_DB
    _GENERATOR_DB = db
    tasks = [(start, min(GENERATE_BLOCK, count - start), seed) for start in range(0, count, GENERATE_BLOCK)]
    with path.open("wb") as f:
        if workers <= 1 or len(tasks) == 1:
            f.writelines(map(_posts_block, tasks))
            return
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            f.writelines(pool.imap(_posts_block, tasks))


def time_parts(captioner: Captioner, source: Path, sample: int) -> dict:
    """Per-post microseconds of each part, in this process, on the first `sample` posts (best of 3)."""
    with source.open("rb") as f:
        lines = list(islice(f, sample))
    size = sum(map(len, lines))
    posts = [item for i, line in enumerate(lines) for item in parse_danbooru_line(line, f"bench:{i}")
             if isinstance(item, Post)]
    for post in posts:  # the first pass fills the tag caches: a long run's steady state is warm
        captioner.caption(post)

    def best(work) -> float:
        times = []
        for _ in range(3):
            started = time.perf_counter()
            work()
            times.append(time.perf_counter() - started)
        return min(times) / len(lines) * 1e6

    chunks._CAPTIONER, chunks._PREPARE = captioner, False
    with source.open("rb") as f:
        chunks._SOURCE = (str(source), f.fileno())
        chunk = chunks.LineRange(0, size, 1)
        whole_us = best(lambda: chunks.caption_chunk(chunk))
    return {
        "parse_us_per_post": best(lambda: [parse_danbooru_line(line, "bench") for line in lines]),
        "caption_us_per_post": best(lambda: [captioner.caption(post) for post in posts]),
        "output_us_per_post": best(lambda: [chunks.output_record(post, captioner) for post in posts]),
        "chunk_us_per_post": whole_us,
    }


def time_cli(source: Path, out: Path, workers: int, tags_db: Path | None, clip_bpe: Path | None) -> tuple[float, float]:
    """Wall and CPU seconds (the process and its workers) of one `animagine-lora caption` run, in a
    fresh process: imports, loading the database and the tokenizer count, as they do for a user
    (the shipped data unless --tags-db/--clip-bpe are given)."""
    command = [sys.executable, "-m", "train.cli", "caption", str(source), "-o", str(out), "--workers", str(workers)]
    for flag, path in (("--tags-db", tags_db), ("--clip-bpe", clip_bpe)):
        if path is not None:
            command += [flag, str(path)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"caption run failed with status {done.returncode}: {done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="N of the --workers N run")
    parser.add_argument("--cli-workers", help="comma-separated worker counts to run (default: 1 and N)")
    parser.add_argument("--keep", type=Path, help="keep the generated posts here; reused when it exists")
    parser.add_argument("--tags-db", type=Path, help="tag database (default: the one shipped with captioning)")
    parser.add_argument("--clip-bpe", type=Path, help="CLIP BPE merges (default: the shipped copy)")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "caption_speed.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    worker_counts = sorted({int(w) for w in args.cli_workers.split(",")} if args.cli_workers else {1, args.workers})

    db = load_tag_database(args.tags_db)
    counter = TokenCounter.from_bpe(args.clip_bpe or SHIPPED_CLIP_BPE)
    results: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "posts": args.posts,
                     "workers": args.workers, "cpus": os.cpu_count(),
                     "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
                     "target_posts_per_s": round(TARGET_POSTS_PER_S)}
    with tempfile.TemporaryDirectory() as tmp:
        source = args.keep or Path(tmp) / "posts.jsonl"
        if not (args.keep and args.keep.exists()):
            started = time.perf_counter()
            write_synthetic_posts(db, args.posts, source, workers=args.workers)
            results["generate_s"] = round(time.perf_counter() - started, 1)
        results["input_mb"] = round(source.stat().st_size / 2**20, 1)
        parts = time_parts(Captioner(load_profile(), db, counter), source, min(args.posts, 50_000))
        results.update({k: round(v, 1) for k, v in parts.items()})
        results["load_average_before"] = os.getloadavg()[0]
        runs = {}
        for workers in worker_counts:
            out = Path(tmp) / f"out{workers}.jsonl"
            elapsed, cpu = time_cli(source, out, workers, args.tags_db, args.clip_bpe)
            runs[workers] = {"seconds": round(elapsed, 2), "posts_per_s": round(args.posts / elapsed),
                             "cpu_seconds": round(cpu, 2), "posts_per_cpu_s": round(args.posts / cpu),
                             "output_mb": round(out.stat().st_size / 2**20, 1)}
            out.unlink()
        results["cli"] = runs
        best = max(r["posts_per_s"] for r in runs.values())
        results["minutes_for_8_4M_posts"] = round(8_400_000 / best / 60, 2)
        results["meets_target"] = best >= TARGET_POSTS_PER_S

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    return 0


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"caption speed, {results['posts']:,} synthetic posts ({results['input_mb']:,} MB), "
                        f"{results['cpus']} CPUs, load average {results['load_average_before']:.1f} before the runs")
    table.add_column("what")
    table.add_column("seconds", justify="right")
    table.add_column("posts/s (wall)", justify="right")
    table.add_column("CPU µs per post", justify="right")
    for key, what in (("parse_us_per_post", "JSON line -> Post"), ("caption_us_per_post", "Post -> caption"),
                      ("output_us_per_post", "Post -> caption -> output object"),
                      ("chunk_us_per_post", "a whole chunk: bytes -> JSON lines")):
        table.add_row(f"{what} (1 process, warm)", "", f"{1e6 / results[key]:,.0f}", f"{results[key]}")
    for workers, run in results["cli"].items():
        table.add_row(f"animagine-lora caption --workers {workers} (start-up, read, caption, write)",
                      f"{run['seconds']:,}", f"{run['posts_per_s']:,}", f"{1e6 / run['posts_per_cpu_s']:.1f}")
    table.add_row("target: 8.4M posts in 5 min", "300", f"{results['target_posts_per_s']:,}", "")
    Console(width=140).print(table)
    verdict = "meets" if results["meets_target"] else "does NOT meet"
    Console().print(f"8.4M posts at the best rate: {results['minutes_for_8_4M_posts']} min: {verdict} the target")


if __name__ == "__main__":
    sys.exit(main())
