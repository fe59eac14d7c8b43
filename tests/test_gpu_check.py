"""bench/gpu_check.py (`make gpu-check`) runs every step on the tiny model on CPU, in this process, so
the script the first GPU run depends on cannot rot; bench/gpu_wheels.py's pieces that need no network."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return _load("gpu_check")


def test_budgets_fit_nine_minutes_and_name_every_step(gpu_check):
    assert sum(step.budget_s for step in gpu_check.STEPS) <= gpu_check.TOTAL_BUDGET_S == 9 * 60
    assert [s.name for s in gpu_check.STEPS] == ["install", "pytest-gpu", "unet-eager", "unet-compile",
                                                 "unet-b1-graphs", "presets", "train-sample"]


def test_cpu_run_writes_a_row_for_every_step(gpu_check, tmp_path, capsys):
    report_path = tmp_path / "gpu_check.json"
    code = gpu_check.main(["--cpu", "--json", str(report_path), "--work", str(tmp_path / "work")])
    out = capsys.readouterr().out
    report = json.loads(report_path.read_text("utf-8"))
    rows = report["results"]
    assert code == 0, [r for r in rows if r["status"] not in ("ok", "skipped")]
    assert report["mode"] == "cpu-tiny"
    by_step: dict[str, list[dict]] = {}
    for row in rows:
        by_step.setdefault(row["step"], []).append(row)
    assert list(by_step) == [s.name for s in gpu_check.STEPS] + ["sweep"]
    skipped = {row["step"] for row in rows if row["status"] == "skipped"}
    assert skipped == {s.name for s in gpu_check.STEPS if s.gpu_only} | {"sweep"}
    assert all(row["status"] == "ok" for row in rows if row["step"] not in skipped)

    versions = by_step["install"][-1]
    assert versions["torch"] and versions["diffusers"] and versions["matmul_peak_tflops"] > 0
    summary = by_step["pytest-gpu"][0]["summary"]  # the GPU tests exist (and skip without CUDA)
    assert "skipped" in summary or "passed" in summary, summary

    reference, project = by_step["unet-eager"]
    assert (reference["path"], project["path"], reference["batch"]) == ("reference", "project", 8)
    for row in (reference, project):
        assert math.isfinite(row["images_per_s"]) and row["images_per_s"] > 0
    assert reference["tflop_per_step"] == project["tflop_per_step"] > 0  # the same work
    assert {r["memory_preset"] for r in by_step["presets"]} == {"8gb", "4gb"}
    assert all(r["memory_budget_gib"] > 0 and r["fits_budget"] is None for r in by_step["presets"])

    model, prep, trained, sampled = by_step["train-sample"]
    assert model["model"] == "tiny SDXL"
    assert trained["name"] == "train 2 steps" and math.isfinite(trained["loss"]) and trained["steps_per_s"] > 0
    assert sampled["images_per_s"] > 0 and prep["cache_s"] > 0
    assert (tmp_path / "work" / "train-sample" / "samples" / "grid.png").is_file()
    assert "GPU check (cpu-tiny)" in out and "unet-eager" in out.split("GPU check")[-1]  # the final table


def test_a_failing_step_is_recorded_and_the_run_goes_on(gpu_check, tmp_path):
    path = tmp_path / "r.json"
    gpu_check.start_report(path, cpu=True)

    def broken(ctx):
        raise RuntimeError("no GPU here")

    ctx = gpu_check.Context(path, tmp_path, cpu=True)
    gpu_check.run_step_here(gpu_check.Step("broken", 1, broken), ctx)
    ctx.record("after", "next step")
    rows = json.loads(path.read_text("utf-8"))["results"]
    assert [(r["step"], r["status"]) for r in rows] == [("broken", "failed"), ("after", "ok")]
    assert "no GPU here" in rows[0]["error"]


def test_wheel_list_fits_what_the_gpu_machine_lacks():
    wheels = _load("gpu_wheels")
    assert {"diffusers", "datasets", "bitsandbytes", "pydantic"} <= wheels.WHEELS.keys()
    # what the GPU machine has (.library/device/KINDS.md) is not carried
    assert not {"torch", "transformers", "accelerate", "pyarrow"} & wheels.WHEELS.keys()
    assert "manylinux2014_x86_64" in wheels.PLATFORMS and wheels.version("diffusers")


def test_isolated_steps_write_their_rows_and_stop_at_their_budget(gpu_check, tmp_path):
    """The GPU machine's path: each step in a child process (`--step`), killed at its budget."""
    path = tmp_path / "r.json"
    gpu_check.start_report(path, cpu=False)
    ctx = gpu_check.Context(path, tmp_path, cpu=False)
    install = gpu_check.STEPS[0]
    gpu_check.run_step_isolated(install, ctx, limit_s=300)
    gpu_check.run_step_isolated(install, ctx, limit_s=0.2)
    rows = json.loads(path.read_text("utf-8"))["results"]
    assert [(r["name"], r["status"]) for r in rows] == [("versions and device", "ok"), ("install", "timed out")]
    assert rows[0]["torch"] and rows[1]["budget_s"] == install.budget_s


def test_compiled_rows_take_the_work_of_the_eager_row(gpu_check, tmp_path):
    """FlopCounterMode cannot count a compiled step: its FLOPs are the eager step's per image."""
    path = tmp_path / "r.json"
    gpu_check.start_report(path, cpu=False)
    ctx = gpu_check.Context(path, tmp_path, cpu=False)
    ctx.record("unet-eager", "project", preset="attn-mlp", rank=32, gradient_checkpointing=False, batch=8,
               tflop_per_image=14.6)
    train_step = _load("train_step")
    compiled = train_step.Case("project", "attn-mlp", 32, 1, False, compile="full", cuda_graphs=True)
    assert gpu_check._eager_tflop_per_image(path, compiled) == 14.6
    assert gpu_check._eager_tflop_per_image(path, train_step.Case("project", "attn", 32, 1, False)) is None
