"""The caption speed benchmark runs in tiny mode and writes its JSON report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.heavy  # runs the caption benchmark end to end: left out of `make test-fast`

REPO = Path(__file__).resolve().parents[1]


def test_bench_tiny_mode(tmp_path):
    """The shipped data by default, as a user's run."""
    out = tmp_path / "speed.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "caption_speed.py"), "--posts", "2000",
                           "--workers", "2", "--json", str(out)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["posts"] == 2000 and set(report["cli"]) == {"1", "2"}
    assert all(run["posts_per_s"] > 0 for run in report["cli"].values())
    assert report["chunk_us_per_post"] > 0 and report["caption_us_per_post"] > 0
    assert "posts/s" in done.stdout


def test_synthetic_posts_look_like_danbooru():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from caption_speed import synthetic_posts
    finally:
        sys.path.remove(str(REPO / "bench"))
    from captioning.tag_db import load_tag_database

    posts = synthetic_posts(load_tag_database(), 300, seed=1)
    general = [len(p["tag_string_general"].split()) for p in posts]
    assert 20 <= min(general) and max(general) <= 40
    assert all(1 <= len(p["tag_string_copyright"].split()) <= 2 for p in posts)
    assert all(len(p["tag_string_artist"].split()) == 1 for p in posts)
    assert {p["rating"] for p in posts} == {"g", "s", "q", "e"}
    assert sum("1girl" in p["tag_string_general"].split() for p in posts) > 100  # drawn by post count
