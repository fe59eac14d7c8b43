"""The first GPU run in one command: installs, correctness, UNet speed, preset memory, a real run.

    make gpu-check                          # = python bench/gpu_check.py
    python bench/gpu_check.py --cpu         # the same steps on the tiny model (the test suite runs it)

On the GPU machine (see bench/RESULTS.md, "GPU check", for the `run` call that carries `.whl/`)
the steps below run in order, each in its own process with its own time budget, and each
measured row is appended to `bench/results/gpu_check.json` (atomically) as soon as it exists, so
a step cut short keeps what it measured and the next step still runs. The budgets add up to 9
minutes; why each is what it is, from the FLOP counts and H100 figures, is in bench/RESULTS.md.

| step | budget s | what |
| --- | ---: | --- |
| install | 40 | pip installs the carried wheels (`make gpu-wheels`); versions, the GPU, its bf16 matmul peak |
| pytest-gpu | 50 | `pytest -m gpu`: CUDA equality of the speed switches, the NF4 step's memory |
| unet-eager | 50 | exact SDXL UNet, attn-mlp r32, 1024², batch 8: naive PEFT reference, project defaults |
| unet-compile | 100 | the project at batch 8 with channels_last and full `torch.compile` |
| unet-b1-graphs | 90 | batch 1, full compile and CUDA graphs (the launch-bound consumer case) |
| presets | 40 | peak memory of the 8 GB (fp8 base) and 4 GB (NF4 base) presets at batch 1 |
| train-sample | 150 | `prep` -> `cache` -> `train` 20 steps at 1024² (default config) -> `sample` 2 images, card settings |
| sweep | the rest | `bench/train_step.py`'s full sweep, until the 9 minutes are up |

With `--cpu` (the default without CUDA) the same steps run on the tiny SDXL in this process, at
the smallest sizes (2 timed steps, batch 8 of 16x16 latents, 2 training steps, 1 sampling step
at 64x64): what is checked is that every step runs and writes its rows, not speed. Compiling
takes minutes on a CPU and CUDA graphs need CUDA, so those two steps and the sweep are recorded
as skipped there (tests/test_speed.py covers compile with RUN_SLOW=1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the GPU machine runs the checkout as it is, not an installed package
WHEEL_DIR = REPO / ".whl"
RESULTS = REPO / "bench" / "results"  # gpu_check.json on a GPU, gpu_check_cpu_tiny.json without one
TOTAL_BUDGET_S = 540  # 9 minutes on the GPU machine, installs included
# What datasets needs beyond the machine's own packages: left out of a second install attempt
# when the first fails (the machine's pyarrow is older than datasets 5.2 needs, say).
DATASETS_WHEELS = ("datasets", "dill", "multiprocess", "fsspec")


# ---------------------------------------------------------------- the results file


def append_result(path: Path, row: dict) -> None:
    """Add one measured row to the report at `path`, atomically (a reader never sees half a file)."""
    report = json.loads(path.read_text("utf-8"))
    report["results"].append(row)
    _write(path, report)


def _write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    os.replace(tmp, path)


def start_report(path: Path, *, cpu: bool) -> None:
    _write(path, {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "mode": "cpu-tiny" if cpu else "gpu", "total_budget_s": TOTAL_BUDGET_S, "results": []})


# ---------------------------------------------------------------- steps


@dataclass(frozen=True)
class Context:
    """What every step gets: where to write, where to work, and which mode it runs in."""

    json: Path
    work: Path
    cpu: bool

    def record(self, step: str, name: str, **fields) -> dict:
        row = {"step": step, "name": name, "status": "ok", **fields}
        append_result(self.json, row)
        print(f"[gpu-check] {step}: {name}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in fields.items()), flush=True)
        return row


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _pip_install(requirements: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links",
                           str(WHEEL_DIR), "--no-compile", "--no-cache-dir", *requirements],
                          capture_output=True, text=True, check=False)


def step_install(ctx: Context) -> None:
    """Install the carried wheels (GPU machine), then record versions, the device and its matmul peak.

    Only where CUDA is: a CPU machine runs its own environment. torch is the machine's and no
    carried wheel replaces it, so asking it first is safe.
    """
    import importlib

    import torch

    cuda = torch.cuda.is_available() and not ctx.cpu
    if cuda and (WHEEL_DIR / "requirements.txt").is_file():
        wanted = (WHEEL_DIR / "requirements.txt").read_text("utf-8").split()
        done = _pip_install(wanted)
        if done.returncode:
            # One unsatisfiable pin must not stop the checks that do not need it.
            fallback = [r for r in wanted if re.split("[=<>]", r)[0] not in DATASETS_WHEELS]
            retry = _pip_install(fallback)
            ctx.record("install", "wheels without datasets", status="partial" if retry.returncode == 0 else "failed",
                       pip_error=done.stderr.strip()[-600:], retry_error=retry.stderr.strip()[-600:])
        else:
            ctx.record("install", "wheels", installed=len(wanted))
        importlib.invalidate_caches()  # packages installed after this process started
    import importlib.metadata

    sys.path.insert(0, str(REPO / "bench"))
    import train_step

    versions = {}
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "datasets", "bitsandbytes", "pydantic"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    device = torch.device("cuda" if cuda else "cpu")
    ctx.record("install", "versions and device", python=sys.version.split()[0], **versions,
               device=torch.cuda.get_device_name() if cuda else "cpu",
               gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
               matmul_peak_tflops=train_step.matmul_peak_tflops(device, 8192 if cuda else 256),
               matmul_dtype="bf16" if cuda else "fp32")


def step_pytest_gpu(ctx: Context) -> None:
    """`pytest -m gpu` over the test files that hold GPU tests (all skip on a CPU)."""
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                   if "mark.gpu" in p.read_text("utf-8"))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files],
                          cwd=REPO, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    summary = (done.stdout.strip().splitlines() or [""])[-1]
    # Exit 5: nothing selected or everything skipped is still a clean run on a CPU.
    ok = done.returncode == 0 or (ctx.cpu and done.returncode == 5)
    ctx.record("pytest-gpu", "pytest -m gpu", status="ok" if ok else "failed", summary=summary,
               files=len(files), output_tail=None if ok else done.stdout[-2000:])


def _unet_setup(ctx: Context):
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    import train_step

    cuda = torch.cuda.is_available() and not ctx.cpu
    setup = train_step.Setup(torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32,
                             train_step.unet_config(cuda), 128 if cuda else 16, cuda)
    steps, warmup = (5, 2) if cuda else (2, 1)
    return train_step, setup, steps, warmup


def _measure_cases(ctx: Context, step: str, cases) -> None:
    """Each case in a fresh, seeded UNet (the same weights in every process); one row each."""
    train_step, setup, steps, warmup = _unet_setup(ctx)
    flops: dict = {}
    for case in cases(train_step, 32 if setup.sdxl else 4):
        inputs = train_step.random_inputs(setup, case.batch)
        row = train_step.measure(setup, case, None, inputs, steps=steps, warmup=warmup, flops=flops)
        if row["tflop_per_step"]:
            row["tflop_per_image"] = row["tflop_per_step"] / case.batch
        elif per_image := _eager_tflop_per_image(ctx.json, case):
            # Compiled steps cannot be counted; the work is the eager step's, per image.
            row["tflop_per_step"] = per_image * case.batch
            row["achieved_tflops"] = row["tflop_per_step"] / row["step_s_median"]
        ctx.record(step, row.pop("name"), **row)


def _eager_tflop_per_image(path: Path, case) -> float | None:
    """TFLOP per image of an eager row of the same workload (preset, rank, checkpointing)."""
    rows = json.loads(path.read_text("utf-8"))["results"]
    return next((r["tflop_per_image"] for r in rows if r.get("tflop_per_image") and
                 (r["preset"], r["rank"], r["gradient_checkpointing"]) ==
                 (case.preset, case.rank, case.gradient_checkpointing)), None)


def step_unet_eager(ctx: Context) -> None:
    """Batch 8, no compile: the naive PEFT reference, then the project's defaults."""
    _measure_cases(ctx, "unet-eager", lambda ts, rank: [
        ts.Case("reference", "attn-mlp", rank, 8, False),
        ts.Case("project", "attn-mlp", rank, 8, False, channels_last=True)])


def step_unet_compile(ctx: Context) -> None:
    _measure_cases(ctx, "unet-compile", lambda ts, rank: [
        ts.Case("project", "attn-mlp", rank, 8, False, channels_last=True, compile="full")])


def step_unet_b1_graphs(ctx: Context) -> None:
    _measure_cases(ctx, "unet-b1-graphs", lambda ts, rank: [
        ts.Case("project", "attn-mlp", rank, 1, False, channels_last=True, compile="full", cuda_graphs=True)])


def step_presets(ctx: Context) -> None:
    """The 8 GB (fp8) and 4 GB (NF4) presets at their batch 1: peak memory against their budgets."""
    from train.runtime.memory_presets import MEMORY_PRESETS

    def cases(ts, rank):
        return [c for c in ts.preset_cases(sdxl=rank == 32) if c.memory_preset in ("8gb", "4gb")]

    train_step, setup, steps, warmup = _unet_setup(ctx)
    for case in cases(train_step, 32 if setup.sdxl else 4):
        row = train_step.measure(setup, case, None, train_step.random_inputs(setup, case.batch),
                                 steps=steps, warmup=warmup, flops={})
        budget = MEMORY_PRESETS[case.memory_preset].unet_budget_gib
        peak = row["peak_memory_gib"]
        ctx.record("presets", row.pop("name"), **row, memory_budget_gib=budget,
                   fits_budget=None if peak is None else peak <= budget)


def _cli(ctx: Context, argv: list[str]) -> None:
    """One `animagine-lora` command: in this process (train.cli.main), logging as the CLI does."""
    from accelerate.state import AcceleratorState

    from train.cli import main

    try:
        code = main(argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    if code != 0:
        raise RuntimeError(f"animagine-lora {argv[0]} exited with {code}")


def _training_config(ctx: Context, model: Path, prep: Path, run_dir: Path) -> Path:
    """The default config (every key at its default) on `model` and the prepped sample dataset;
    on CPU, the tiny model's sizes: 128-pixel images, 2 steps, fp32."""
    model_table = {"source": str(model)} | ({"weight_dtype": "fp32"} if ctx.cpu else {})
    tables = {
        "model": model_table,
        "data": {"dataset": str(prep)} | ({"resolution_scale": 0.125} if ctx.cpu else {}),
        "train": {"max_steps": 2 if ctx.cpu else 20} | ({"mixed_precision": "no"} if ctx.cpu else {}),
        "output": {"dir": str(run_dir), "name": "check", "log_every_n_steps": 2 if ctx.cpu else 10},
    }
    lines = []
    for name, table in tables.items():
        lines += [f"[{name}]", *(f"{key} = {json.dumps(value)}" for key, value in table.items())]
    path = ctx.work / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def step_train_sample(ctx: Context) -> None:
    """prep -> cache -> train (20 steps, default config, 1024²) -> sample 2 images at the card's settings."""
    import torch

    cuda = torch.cuda.is_available() and not ctx.cpu
    started = time.perf_counter()
    if cuda:
        from train.model.random_sdxl import build_random_sdxl

        model = build_random_sdxl(ctx.work / "random_sdxl.safetensors")
    else:
        from train.model.tiny import build_tiny_model

        model = build_tiny_model(ctx.work / "tiny").diffusers_dir
    ctx.record("train-sample", "model", seconds=time.perf_counter() - started,
               model="exact SDXL, random weights" if cuda else "tiny SDXL")

    prep, run_dir = ctx.work / "prep", ctx.work / "run"
    timed = {}
    for stage, argv in (("prep", ["prep", str(REPO / "datasets" / "sample.toml"), "-o", str(prep), "--workers", "1" if ctx.cpu else "8"]),
                        ("cache", ["cache", str(_training_config(ctx, model, prep, run_dir))])):
        started = time.perf_counter()
        _cli(ctx, argv)
        timed[stage] = time.perf_counter() - started
    ctx.record("train-sample", "prep and cache latents", prep_s=timed["prep"], cache_s=timed["cache"])

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    _cli(ctx, ["train", str(ctx.work / "config.toml")])
    seconds = time.perf_counter() - started
    logged = [json.loads(line) for line in (run_dir / "log.jsonl").read_text("utf-8").splitlines()]
    last = [entry for entry in logged if "images_per_s" in entry][-1]
    ctx.record("train-sample", f"train {2 if ctx.cpu else 20} steps", seconds=seconds,
               images_per_s=last["images_per_s"], steps_per_s=last["images_per_s"],  # batch 1
               loss=last["loss"], peak_memory_gib=last.get("gpu_memory_gb"))

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    size, steps = ("64x64", "1") if ctx.cpu else ("1024x1024", "28")
    started = time.perf_counter()
    _cli(ctx, ["sample", "1girl, solo, smile", "--model", str(model), "--lora", str(run_dir / "check.safetensors"),
               "--size", size, "--steps", steps, "--seed", "0", "1", "--batch-size", "2", "--noise-device", "gpu",
               "--no-reorder", "-o", str(ctx.work / "samples")])
    seconds = time.perf_counter() - started
    ctx.record("train-sample", f"sample 2 images, {steps} steps, {size}", seconds=seconds, images_per_s=2 / seconds,
               peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)


SWEEP_JSON = RESULTS / "train_step_cuda_sdxl.json"


def step_sweep(ctx: Context) -> None:
    """bench/train_step.py's whole sweep; it rewrites its JSON after every configuration, so
    the rows measured before the 9 minutes run out are kept."""
    subprocess.run([sys.executable, str(REPO / "bench" / "train_step.py"), "--json", str(SWEEP_JSON)],
                   cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    rows = json.loads(SWEEP_JSON.read_text("utf-8"))["results"]
    ctx.record("sweep", "bench/train_step.py", rows=len(rows), json=str(SWEEP_JSON.relative_to(REPO)))


@dataclass(frozen=True)
class Step:
    name: str
    budget_s: int
    run: Callable[[Context], None]
    gpu_only: str = ""  # why the step is skipped on a CPU, if it is


STEPS = [
    Step("install", 40, step_install),
    Step("pytest-gpu", 50, step_pytest_gpu),
    Step("unet-eager", 50, step_unet_eager),
    Step("unet-compile", 100, step_unet_compile, "compiling the UNet takes minutes on a CPU"),
    Step("unet-b1-graphs", 90, step_unet_b1_graphs, "CUDA graphs need CUDA"),
    Step("presets", 40, step_presets),
    Step("train-sample", 150, step_train_sample),
]
assert sum(s.budget_s for s in STEPS) <= TOTAL_BUDGET_S
SWEEP = Step("sweep", 0, step_sweep, "the GPU sweep; tests/test_bench_train_step.py runs it on the tiny UNet")


# ---------------------------------------------------------------- running


def run_step_here(step: Step, ctx: Context) -> None:
    """One step in this process; an exception becomes a `failed` row and the next step runs."""
    started = time.perf_counter()
    try:
        step.run(ctx)
    except Exception as err:  # noqa: BLE001 - any failure of one step is a result, not the end
        append_result(ctx.json, {"step": step.name, "name": step.name, "status": "failed",
                                 "error": f"{type(err).__name__}: {err}"[:1000],
                                 "seconds": time.perf_counter() - started})
        print(f"[gpu-check] {step.name}: FAILED {type(err).__name__}: {err}", flush=True)


def run_step_isolated(step: Step, ctx: Context, limit_s: float, cut_status: str = "timed out") -> None:
    """One step in a child process killed at `limit_s`; its rows are in the file already, and a
    row with `cut_status` says it was stopped."""
    started = time.perf_counter()
    command = [sys.executable, __file__, "--step", step.name, "--json", str(ctx.json), "--work", str(ctx.work)]
    # A session of its own, so the step's children (pytest, the sweep) are stopped with it.
    child = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    try:
        child.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        append_result(ctx.json, {"step": step.name, "name": step.name, "status": cut_status,
                                 "seconds": time.perf_counter() - started, "budget_s": step.budget_s})
        print(f"[gpu-check] {step.name}: stopped at its budget of {limit_s:.0f} s", flush=True)
        return
    if child.returncode:  # the child records its own errors; this is a crash (a signal, out of memory)
        append_result(ctx.json, {"step": step.name, "name": step.name, "status": "failed",
                                 "error": f"the step's process exited with {child.returncode}",
                                 "seconds": time.perf_counter() - started})


def print_table(path: Path) -> None:
    report = json.loads(path.read_text("utf-8"))
    peak = next((r.get("matmul_peak_tflops") for r in report["results"] if r.get("matmul_peak_tflops")), None)
    columns = ("step", "row", "status", "s", "images/s", "TFLOP/s", "% peak", "peak GiB", "note")
    lines = []
    for r in report["results"]:
        tflops = r.get("achieved_tflops")
        seconds = r.get("seconds", r.get("step_s_median"))
        note = r.get("summary") or r.get("error") or r.get("note") or ("fits" if r.get("fits_budget") else
                                                      "OVER" if r.get("fits_budget") is False else "")
        if r.get("memory_budget_gib"):
            note = f"budget {r['memory_budget_gib']} GiB {note}"
        lines.append((r["step"], r["name"][:58], r["status"], _num(seconds), _num(r.get("images_per_s")),
                      _num(tflops), _num(100 * tflops / peak if tflops and peak else None),
                      _num(r.get("peak_memory_gib")), str(note)[:60]))
    widths = [max(len(c), *(len(line[i]) for line in lines)) if lines else len(c) for i, c in enumerate(columns)]
    print(f"\nGPU check ({report['mode']}), started {report['started']}; matmul peak {_num(peak)} TFLOP/s")
    for line in (columns, *lines):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)))


def _num(value) -> str:
    return "" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the tiny model on the CPU (the default without CUDA)")
    parser.add_argument("--json", type=Path, help="the report (default bench/results/gpu_check.json, "
                        "gpu_check_cpu_tiny.json on a CPU)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # a child process runs one step
    args = parser.parse_args(argv)
    cpu = args.cpu or not _cuda_available()
    args.json = args.json or RESULTS / ("gpu_check_cpu_tiny.json" if cpu else "gpu_check.json")
    if args.step:
        step = next(s for s in (*STEPS, SWEEP) if s.name == args.step)
        run_step_here(step, Context(args.json, args.work, cpu=False))
        return 0
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as scratch:
        work = args.work or Path(scratch)
        ctx = Context(args.json.resolve(), work, cpu)
        start_report(ctx.json, cpu=cpu)
        deadline = time.monotonic() + TOTAL_BUDGET_S
        for step in STEPS:
            (work / step.name).mkdir(parents=True, exist_ok=True)
            step_ctx = Context(ctx.json, work / step.name, cpu)
            if cpu and step.gpu_only:
                append_result(ctx.json, {"step": step.name, "name": step.name, "status": "skipped",
                                         "note": step.gpu_only})
            elif cpu:
                run_step_here(step, step_ctx)
            else:
                run_step_isolated(step, step_ctx, min(step.budget_s, max(1.0, deadline - time.monotonic())))
        if cpu:
            append_result(ctx.json, {"step": SWEEP.name, "name": SWEEP.name, "status": "skipped", "note": SWEEP.gpu_only})
        elif deadline - time.monotonic() > 30:  # only while time remains
            run_step_isolated(SWEEP, Context(ctx.json, work, cpu), deadline - time.monotonic(), cut_status="partial")
        print_table(ctx.json)
    failed = [r for r in json.loads(ctx.json.read_text("utf-8"))["results"] if r["status"] in ("failed", "timed out")]
    return 1 if failed else 0


def _cuda_available() -> bool:
    """Whether CUDA is there, asked in a child so this process imports no torch before the install."""
    done = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                          capture_output=True, text=True, check=False)
    return done.stdout.strip() == "True"


if __name__ == "__main__":
    sys.exit(main())
