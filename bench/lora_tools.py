"""Time and peak memory of `animagine-lora lora resize / merge --into / extract` on the real SDXL
architecture, on CPU.

The base is the exact SDXL 1.0 layout (train/model/sdxl_configs/: UNet, both text encoders, VAE)
with seeded random weights, one SGM single file in fp16 (6.9 GB), from `train.model.random_sdxl`
(weights N(0, 1/fan_in), embeddings N(0, 0.02^2), norm weights 1, biases 0). The LoRA is a
rank-32 attn-mlp LoRA (722 UNet modules, as sd-scripts' default) with random factors.

Steps, each a fresh `python -m train.cli lora ...` process:
1. resize the rank-32 LoRA to rank 16;
2. merge it into the base (`--into base.safetensors -o merged.safetensors`, fp16): the tuned model;
3. extract `--base base --tuned merged --rank 32` (exact SVD, fp64).
Then, in this process, the case for a randomized SVD: on 12 of the extracted differences (the
mid block's 1280-wide layers and down_blocks.1's 640-wide ones), the time and kept energy of
`torch.linalg.svd` (fp64) against `torch.svd_lowrank` (q = k + 8, 2 and 4 power iterations) at
ranks 8, 16 and 32 (the difference has rank 32 plus fp16 rounding). `lora` offers no `--fast`
because of what this measured (bench/RESULTS.md).

Per step: wall time, peak RSS (the kernel's VmHWM of the process: memory-mapped model pages
count while touched) and the peak of anonymous memory (RssAnon, sampled every 50 ms: what the
process itself allocated). Runs under the project's memory lock on the shared VM:

    flock /work/notes/bigmem.lock python bench/lora_tools.py [--work DIR] [--keep]
    python bench/lora_tools.py --work DIR --svd-check-only    # the SVD comparison on kept files

Writes bench/results/lora_tools.json (or --json PATH) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

from train.lora.adapters import TARGET_PRESETS
from train.lora.convert import LoraModule
from train.lora.lowrank import write_plain_lora
from train.model.random_sdxl import build_empty, build_random_sdxl

RANK = 32


def write_lora(path: Path, rank: int = RANK, seed: int = 1) -> int:
    """A rank-`rank` attn-mlp LoRA with random factors on the SDXL UNet; returns its module count."""
    unet = build_empty("unet")
    targets = TARGET_PRESETS["attn-mlp"]
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            down = torch.randn(rank, module.in_features, generator=generator) / module.in_features ** 0.5
            up = torch.randn(module.out_features, rank, generator=generator) * 0.01
            modules[name] = LoraModule(down, up, float(rank))
    write_plain_lora({"unet": modules}, path, dtype=torch.float16, comment="bench/lora_tools.py random LoRA")
    return len(modules)


def run_measured(args: list[str]) -> dict:
    """Run `python -m train.cli ARGS`; wall time, peak RSS and sampled peak anonymous RSS (GB)."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "train.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    peak = {"anon": 0, "hwm": 0}

    def sample() -> None:
        while process.poll() is None:
            try:
                status = Path(f"/proc/{process.pid}/status").read_text()
            except OSError:
                break
            for key, field in (("anon", "RssAnon"), ("hwm", "VmHWM")):
                match = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
                if match:
                    peak[key] = max(peak[key], int(match.group(1)))
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, err = process.communicate()
    thread.join()
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({process.returncode}): {err[-2000:]}")
    return {"args": args, "seconds": round(seconds, 1), "peak_rss_gb": round(peak["hwm"] / 2**20, 2),
            "peak_anon_gb": round(peak["anon"] / 2**20, 2), "stdout": out}


def svd_check(base_path: Path, tuned_path: Path) -> list[dict]:
    """Exact (fp64) against randomized SVD on sampled differences: seconds and kept energy share."""
    from train.model.weight_files import ModelWeights

    base, tuned = ModelWeights(base_path), ModelWeights(tuned_path)
    targets = TARGET_PRESETS["attn-mlp"]
    modules = [p for p in tuned.modules("unet") if any(p.endswith("." + t) for t in targets)]
    picked = [p for p in modules if p.startswith("mid_block")][:16:2] + \
        [p for p in modules if p.startswith("down_blocks.1")][:8:2]
    rows = []
    for path in picked:
        at_base, at_tuned = base.locate("unet", path), tuned.locate("unet", path)
        diff = (tuned.read(at_tuned).float() - base.read(at_base).float()).reshape(
            tuned.location_shape(at_tuned)[0], -1)
        total = float(diff.double().square().sum())
        start = time.perf_counter()
        exact = torch.linalg.svd(diff.double(), full_matrices=False)[1]
        row = {"module": path, "shape": list(diff.shape), "exact_seconds": round(time.perf_counter() - start, 3)}
        for k in (8, 16, 32):
            row[f"exact_k{k}"] = float(exact[:k].square().sum()) / total
            for niter in (2, 4):
                start = time.perf_counter()
                fast = torch.svd_lowrank(diff, q=k + 8, niter=niter)[1]
                row[f"lowrank_k{k}_n{niter}_seconds"] = round(time.perf_counter() - start, 3)
                row[f"lowrank_k{k}_n{niter}"] = float(fast[:k].double().square().sum()) / total
        rows.append(row)
    return rows


def print_svd_check(rows: list[dict]) -> dict:
    """Per rank and power iterations: summed time and the worst energy gap (exact - randomized)."""
    summary = {"exact_seconds": round(sum(r["exact_seconds"] for r in rows), 1)}
    print(f"\nrandomized SVD on {len(rows)} differences (exact fp64: {summary['exact_seconds']} s in all)")
    print(f"{'rank':>6}{'iters':>7}{'seconds':>9}{'exact kept':>12}{'lowrank kept':>14}{'worst gap':>11}")
    for k in (8, 16, 32):
        for niter in (2, 4):
            seconds = sum(r[f"lowrank_k{k}_n{niter}_seconds"] for r in rows)
            gap = max(r[f"exact_k{k}"] - r[f"lowrank_k{k}_n{niter}"] for r in rows)
            exact = sum(r[f"exact_k{k}"] for r in rows) / len(rows)
            fast = sum(r[f"lowrank_k{k}_n{niter}"] for r in rows) / len(rows)
            summary[f"k{k}_n{niter}"] = {"seconds": round(seconds, 2), "exact_kept_mean": round(exact, 5),
                                         "lowrank_kept_mean": round(fast, 5), "worst_gap": round(gap, 5)}
            print(f"{k:>6}{niter:>7}{seconds:>9.2f}{exact:>12.4f}{fast:>14.4f}{gap:>11.4f}")
    return summary


def _total_kept(stdout: str) -> float | None:
    """The total kept energy: the last column of the energy table's `all` row."""
    rows = [line.split() for line in stdout.splitlines() if line.startswith("all ")]
    return float(rows[0][-1]) if rows else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="folder for the model files (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the model files")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "lora_tools.json")
    parser.add_argument("--svd-check-only", action="store_true",
                        help="only the SVD comparison, on base.safetensors and merged.safetensors kept in --work")
    args = parser.parse_args()
    if args.svd_check_only:
        rows = svd_check(args.work / "base.safetensors", args.work / "merged.safetensors")
        report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rows": rows,
                  "summary": print_svd_check(rows)}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="lora_tools_"))
    work.mkdir(parents=True, exist_ok=True)
    base, lora = work / "base.safetensors", work / "lora_r32.safetensors"
    results: dict[str, object] = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                  "machine": f"{platform.node()} {os.cpu_count()} CPUs", "torch": torch.__version__,
                                  "threads": torch.get_num_threads(), "steps": {}}
    started = time.perf_counter()
    if not base.is_file():
        build_random_sdxl(base, dtype=torch.float16)
    results["build_base_seconds"] = round(time.perf_counter() - started, 1)
    results["base_gb"] = round(base.stat().st_size / 1e9, 2)
    results["lora_modules"] = write_lora(lora)
    results["lora_mb"] = round(lora.stat().st_size / 1e6, 1)
    steps = {
        "resize --rank 16": ["lora", "resize", str(lora), "-o", str(work / "r16.safetensors"), "--rank", "16"],
        "merge --into (fp16 single file)": ["lora", "merge", str(lora), "--into", str(base),
                                            "-o", str(work / "merged.safetensors"), "--dtype", "fp16"],
        "extract --rank 32": ["lora", "extract", "--base", str(base), "--tuned", str(work / "merged.safetensors"),
                              "-o", str(work / "x32.safetensors"), "--rank", "32"],
    }
    print(f"{'step':<34}{'seconds':>9}{'peak RSS GB':>13}{'peak anon GB':>14}{'energy kept':>13}")
    for label, step in steps.items():
        measured = run_measured(step)
        measured["energy_total"] = _total_kept(measured["stdout"])
        results["steps"][label] = measured
        kept = f"{measured['energy_total']:.6f}" if measured["energy_total"] is not None else ""
        print(f"{label:<34}{measured['seconds']:>9}{measured['peak_rss_gb']:>13}{measured['peak_anon_gb']:>14}"
              f"{kept:>13}", flush=True)
    rows = svd_check(base, work / "merged.safetensors")
    results["svd_check"] = {"rows": rows, "summary": print_svd_check(rows)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    if not args.keep and args.work is None:
        for path in work.iterdir():
            path.unlink()
        work.rmdir()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
