"""Captioning speed on synthetic, realistic Danbooru posts: posts/s for 1 process and --workers N.

Posts are drawn from the tag database by post count per category (~25-40 general tags, 0-2
characters, 1-2 copyrights, 1 artist, 1-3 meta tags, ratings, scores and dates), written as a
Danbooru JSON-lines file, then captioned twice by `animagine-lora caption` (1 worker, N workers)
with the real CLIP tokenizer and the 225-token budget. The in-memory captioner alone is timed too.
Target (issue 2): 8.4M posts in 5 minutes on 2 cores, about 28,000 posts/s.

    python bench/caption_speed.py                      # 200,000 posts, workers 1 and 2
    python bench/caption_speed.py --posts 2000         # tiny mode (tests)

Writes bench/results/caption_speed.json (or --json PATH) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from itertools import accumulate
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from captioning import Captioner, Category, TagDatabase, TokenCounter, load_profile
from captioning.readers import parse_danbooru_line

SHARED = REPO.parent / "shared" / "data"
TARGET_POSTS_PER_S = 8_400_000 / 300
RATING_WEIGHTS = {"g": 0.35, "s": 0.35, "q": 0.15, "e": 0.15}


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


def time_captioner(captioner: Captioner, lines: list[bytes]) -> dict:
    """The captioner alone on parsed posts, and parse + caption, in this process."""
    posts = [item for i, line in enumerate(lines) for item in parse_danbooru_line(line, f"bench:{i}")]
    started = time.perf_counter()
    for post in posts:
        captioner.caption(post)
    caption_s = time.perf_counter() - started
    started = time.perf_counter()
    for post in posts:  # again: every tag now cached, the steady state of a long run
        captioner.caption(post)
    warm_s = time.perf_counter() - started
    started = time.perf_counter()
    for i, line in enumerate(lines):
        for item in parse_danbooru_line(line, f"bench:{i}"):
            pass
    parse_s = time.perf_counter() - started
    return {"caption_only_posts_per_s": len(posts) / caption_s, "caption_warm_posts_per_s": len(posts) / warm_s,
            "parse_only_posts_per_s": len(lines) / parse_s}


def time_cli(source: Path, out: Path, workers: int, tags_db: Path, clip_bpe: Path) -> float:
    from captioning import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args([str(source), "-o", str(out), "--tags-db", str(tags_db), "--clip-bpe", str(clip_bpe),
                              "--workers", str(workers)])
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    status = cli.run(args)
    elapsed, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_started
    if status != 0:
        raise SystemExit(f"caption run failed with status {status}")
    return elapsed, cpu


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the workers): the machine is shared,
    so posts per CPU-second is the number that does not depend on what else runs."""
    usage = os.times()
    return usage.user + usage.system + usage.children_user + usage.children_system


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--tags-db", type=Path, default=SHARED / "danbooru_tags.csv")
    parser.add_argument("--clip-bpe", type=Path, default=SHARED / "clip_bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "caption_speed.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    db = TagDatabase.load(args.tags_db)
    counter = TokenCounter.from_bpe(args.clip_bpe)
    started = time.perf_counter()
    lines = [json.dumps(p).encode() for p in synthetic_posts(db, args.posts)]
    generate_s = time.perf_counter() - started

    results: dict = {"posts": args.posts, "workers": args.workers, "cpus": os.cpu_count(),
                     "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
                     "generate_s": round(generate_s, 2), "target_posts_per_s": round(TARGET_POSTS_PER_S)}
    results["load_average_before"] = os.getloadavg()[0]
    results.update({k: round(v) for k, v in time_captioner(Captioner(load_profile(), db, counter), lines).items()})
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "posts.jsonl"
        source.write_bytes(b"\n".join(lines) + b"\n")
        runs = {}
        for workers in sorted({1, args.workers}):
            elapsed, cpu = time_cli(source, Path(tmp) / f"out{workers}.jsonl", workers, args.tags_db, args.clip_bpe)
            runs[workers] = {"seconds": round(elapsed, 2), "posts_per_s": round(args.posts / elapsed),
                             "cpu_seconds": round(cpu, 2), "posts_per_cpu_s": round(args.posts / cpu)}
        results["cli"] = runs
        best = max(r["posts_per_s"] for r in runs.values())
        results["hours_for_8_4M_posts"] = round(8_400_000 / best / 3600, 2)
        results["meets_target"] = best >= TARGET_POSTS_PER_S

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    return 0


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"caption speed, {results['posts']:,} synthetic posts, {results['cpus']} CPUs, "
                        f"load average {results['load_average_before']:.1f} before the run")
    table.add_column("what")
    table.add_column("posts/s (wall)", justify="right")
    table.add_column("posts per CPU-s", justify="right")
    table.add_row("captioner only (parsed posts, 1 process)", f"{results['caption_only_posts_per_s']:,}", "")
    table.add_row("captioner only, second pass (tag caches warm)", f"{results['caption_warm_posts_per_s']:,}", "")
    table.add_row("JSON parsing only (1 process)", f"{results['parse_only_posts_per_s']:,}", "")
    for workers, run in results["cli"].items():
        table.add_row(f"animagine-lora caption --workers {workers} (read, caption, write)", f"{run['posts_per_s']:,}",
                      f"{run['posts_per_cpu_s']:,}")
    table.add_row("target (8.4M posts in 5 min)", f"{results['target_posts_per_s']:,}", "")
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
