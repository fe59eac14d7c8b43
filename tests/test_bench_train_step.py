"""bench/train_step.py runs end to end on CPU (tiny UNet, --quick) and writes a complete report."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.heavy  # trains tiny models: left out of `make test-fast`

REPO = Path(__file__).resolve().parents[1]
FIELDS = {"images_per_s", "step_s_median", "first_step_s", "tflop_per_step", "achieved_tflops",
          "share_of_peak", "speedup_vs_reference", "peak_memory_gib", "path", "preset", "rank", "batch",
          "gradient_checkpointing", "channels_last", "compile", "name"}


def test_quick_tiny_bench_writes_positive_numbers(tmp_path):
    out = tmp_path / "train_step.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "train_step.py"), "--tiny", "--quick",
                           "--steps", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "images/s" in done.stdout  # the table
    report = json.loads(out.read_text("utf-8"))
    assert report["unet"] == "tiny" and report["matmul_dtype"] == "fp32" and report["matmul_peak_tflops"] > 0
    assert {"torch", "diffusers", "peft"} <= report["versions"].keys()
    results = report["results"]
    assert [r["path"] for r in results] == ["reference", "project", "project", "project"]
    assert results[2]["channels_last"] and not results[1]["channels_last"]
    assert results[1]["fused_lora"] and not results[3]["fused_lora"]
    for r in results:
        assert FIELDS <= r.keys(), FIELDS - r.keys()
        for key in ("images_per_s", "step_s_median", "tflop_per_step", "achieved_tflops", "share_of_peak",
                    "speedup_vs_reference"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (r["name"], key, r[key])
        assert r["peak_memory_gib"] is None  # CPU: not measured
    # Same workload, same FLOPs: the project path does the reference's maths.
    assert len({r["tflop_per_step"] for r in results}) == 1
    assert results[0]["speedup_vs_reference"] == 1.0


def test_memory_presets_run_on_the_tiny_unet(tmp_path):
    """--presets: one row per memory preset with its settings; the budget check needs CUDA."""
    from train.runtime.memory_presets import MEMORY_PRESETS

    out = tmp_path / "presets.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "train_step.py"), "--tiny", "--presets",
                           "--steps", "1", "--warmup", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text("utf-8"))["results"]
    assert [r["memory_preset"] for r in results] == list(MEMORY_PRESETS)
    for r, preset in zip(results, MEMORY_PRESETS.values(), strict=True):
        assert (r["batch"], r["quantize"], r["optimizer"]) == (
            preset.section("train")["batch_size"], preset.section("model")["quantize"],
            preset.section("optimizer")["name"])
        assert r["images_per_s"] > 0 and r["memory_budget_gib"] == preset.unet_budget_gib
        assert r["fits_budget"] is None  # CPU: no peak memory to compare


def test_out_of_memory_rows_keep_the_table_and_ratios_working(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_train_step", REPO / "bench" / "train_step.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    reference = bench.Case("reference", "attn", 4, 8, False)
    ok = {**bench.asdict(reference), "name": reference.name, "step_s_median": 0.5, "step_s_min": 0.4,
          "images_per_s": 16.0, "first_step_s": 1.0, "tflop_per_step": 2.0, "achieved_tflops": 4.0,
          "peak_memory_gib": 10.0}
    oom = bench.out_of_memory(bench.replace(reference, path="project", compile="full"))
    results = [ok, oom]
    bench.add_ratios(results, peak_tflops=8.0)
    assert ok["speedup_vs_reference"] == 1.0 and ok["share_of_peak"] == 0.5
    assert oom["speedup_vs_reference"] is None and oom["images_per_s"] is None
    bench.print_table({"unet": "sdxl", "latent": 128, "device": "test", "matmul_peak_tflops": 8.0,
                       "matmul_dtype": "bf16", "results": results})
    assert "out of memory" in capsys.readouterr().out
