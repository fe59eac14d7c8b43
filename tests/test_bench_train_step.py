"""bench/train_step.py runs end to end on CPU (tiny UNet, --quick) and writes a complete report."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIELDS = {"images_per_s", "step_s_median", "first_step_s", "tflop_per_step", "achieved_tflops",
          "share_of_peak", "speedup_vs_reference", "peak_memory_gib", "path", "preset", "rank", "batch",
          "gradient_checkpointing", "channels_last", "compile", "name"}


def test_quick_tiny_bench_writes_positive_numbers(tmp_path):
    out = tmp_path / "train_step.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "train_step.py"), "--tiny", "--quick",
                           "--steps", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "images/s" in done.stdout  # the table
    report = json.loads(out.read_text("utf-8"))
    assert report["unet"] == "tiny" and report["matmul_dtype"] == "fp32" and report["matmul_peak_tflops"] > 0
    assert {"torch", "diffusers", "peft"} <= report["versions"].keys()
    results = report["results"]
    assert [r["path"] for r in results] == ["reference", "project", "project"]
    assert results[2]["channels_last"] and not results[1]["channels_last"]
    for r in results:
        assert FIELDS <= r.keys(), FIELDS - r.keys()
        for key in ("images_per_s", "step_s_median", "tflop_per_step", "achieved_tflops", "share_of_peak",
                    "speedup_vs_reference"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (r["name"], key, r[key])
        assert r["peak_memory_gib"] is None  # CPU: not measured
    # Same workload, same FLOPs: the project path does the reference's maths.
    assert len({r["tflop_per_step"] for r in results}) == 1
    assert results[0]["speedup_vs_reference"] == 1.0
