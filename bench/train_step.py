"""LoRA training-step speed: the project's path against the naive reference, in one process.

The UNet is the exact SDXL architecture (train/model/sdxl_configs/unet) with random weights, built on
the GPU (random weights run at the same speed as the real checkpoint); with
`--tiny`, or without CUDA, it is the tiny UNet of train/model/tiny.py on a small latent, so the bench
runs (and is tested) on CPU.

Two paths train the same frozen weights on the same random batch:
- reference: the diffusers-example recipe. PEFT LoRA injected with `peft.inject_adapter_in_model`,
  frozen weights bf16 on GPU (fp32 on CPU), LoRA parameters fp32, `torch.optim.AdamW(fused=True)`
  on CUDA, no compile, plain MSE on epsilon.
- project: `train.lora.adapters.add_unet_lora`, `train.model.quantize.quantize_frozen_unet` (`model.quantize`),
  `train.runtime.speed.apply_speed_settings` (channels_last, fused LoRA, compile, CUDA graphs),
  `train.loss.loss_step` and the optimizer table (`train.runtime.optim.build_optimizer`, fused AdamW or
  adamw8bit), i.e. what `animagine-lora train` runs per micro-batch (without accelerate's
  wrapper, a no-op on one process). A case's switches default to the config's defaults.
Both run under bf16 autocast on CUDA, as `mixed_precision = "bf16"` does.

Per configuration: images/s (median step time of `--steps` timed steps after `--warmup` steps;
`torch.cuda.synchronize()` around each on GPU), TFLOP per step from
`torch.utils.flop_counter.FlopCounterMode` (forward + backward, the recompute of gradient
checkpointing included), achieved TFLOP/s, its share of a measured dense matmul peak (bf16
8192^3 on GPU, fp32 on CPU), peak memory (`torch.cuda.max_memory_allocated`; "n/a" on CPU) and
the speed-up over the reference at the same preset, batch and checkpointing.

    python bench/train_step.py                  # GPU: SDXL at 1024^2 (latent 128), every configuration
    python bench/train_step.py --presets        # GPU: peak memory of each memory preset vs its card
    python bench/train_step.py --tiny           # CPU: tiny UNet, every configuration
    python bench/train_step.py --tiny --quick   # a small subset (tests)

Writes bench/results/train_step_{cuda_sdxl,cpu_tiny}.json (or --json PATH) and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import diffusers
import peft
import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from train.data.rows import TrainBatch
from train.lora.adapters import TARGET_PRESETS, add_unet_lora
from train.loss import LossSettings, loss_step
from train.model import tiny
from train.model.quantize import quantize_frozen_unet
from train.runtime.memory_presets import MEMORY_PRESETS
from train.runtime.optim import build_optimizer
from train.runtime.speed import SpeedSettings, apply_speed_settings

logger = logging.getLogger("bench.train_step")

LR = 1e-4
SEED = 0
TEXT_TOKENS = 77


@dataclass(frozen=True)
class Case:
    """One measured configuration."""

    path: str  # "reference" | "project"
    preset: str
    rank: int
    batch: int
    gradient_checkpointing: bool
    channels_last: bool = False
    compile: str = "none"
    cuda_graphs: bool = False
    fused_lora: bool = True  # the config defaults (train.config.SpeedConfig)
    fused_optimizer: bool = True
    quantize: str = "none"
    optimizer: str = "adamw"
    memory_preset: str = ""  # the train.runtime.memory_presets entry this case checks

    @property
    def workload(self) -> tuple:
        """What fixes the FLOPs and the matching reference."""
        return (self.preset, self.rank, self.batch, self.gradient_checkpointing)

    @property
    def name(self) -> str:
        if self.memory_preset:
            return f"preset {self.memory_preset}: {self.preset} r{self.rank} b{self.batch} " \
                   f"{'gc ' if self.gradient_checkpointing else ''}{self.quantize} {self.optimizer}"
        switches = [s for s, on in (("gc", self.gradient_checkpointing), ("cl", self.channels_last),
                                    ("cudagraphs", self.cuda_graphs)) if on]
        if self.compile != "none":
            switches.append(f"compile-{self.compile}")
        if self.path == "project":
            switches += [s for s, off in (("unfused-lora", not self.fused_lora),
                                          ("foreach-adamw", not self.fused_optimizer)) if off]
            switches += [self.quantize] if self.quantize != "none" else []
            switches += [self.optimizer] if self.optimizer != "adamw" else []
        return f"{self.path} {self.preset} r{self.rank} b{self.batch}" + (" " + "+".join(switches) if switches else "")


@dataclass(frozen=True)
class Setup:
    device: torch.device
    weight_dtype: torch.dtype
    unet_config: dict
    latent: int
    sdxl: bool


# ---------------------------------------------------------------- models and steps


def unet_config(sdxl: bool) -> dict:
    config = tiny._sdxl_config("unet")
    return config if sdxl else {**config, **tiny.TINY_UNET}


def build_frozen_unet(setup: Setup, state: dict | None) -> UNet2DConditionModel:
    """A frozen UNet on the device in the weight dtype; `state` None means a fresh seeded init."""
    torch.manual_seed(SEED)
    with torch.device(setup.device):
        unet = UNet2DConditionModel.from_config(setup.unet_config)
    if state is not None:
        unet.load_state_dict(state)
    if setup.weight_dtype != torch.float32:
        unet.to(setup.weight_dtype)
    unet.requires_grad_(False)
    unet.train()
    return unet


def random_inputs(setup: Setup, batch: int) -> dict:
    """Latents, text embeddings and time ids of one batch, fixed by SEED."""
    config = setup.unet_config
    generator = torch.Generator().manual_seed(SEED + batch)
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    size = setup.latent * 8
    return {
        "latents": torch.randn(batch, 4, setup.latent, setup.latent, generator=generator),  # (B, 4, h, w)
        "prompt_embeds": torch.randn(batch, TEXT_TOKENS, config["cross_attention_dim"], generator=generator),
        "pooled": torch.randn(batch, pooled, generator=generator),
        "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=torch.float32),
    }


def _autocast(setup: Setup):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=setup.device.type == "cuda")


def reference_step_fn(setup: Setup, unet, case: Case, inputs: dict) -> Callable[[], None]:
    """The diffusers-example recipe: PEFT directly, fp32 LoRA params, fused AdamW on CUDA."""
    config = peft.LoraConfig(r=case.rank, lora_alpha=case.rank, target_modules=TARGET_PRESETS[case.preset],
                             init_lora_weights=True)
    peft.inject_adapter_in_model(config, unet)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    if case.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=LR, fused=setup.device.type == "cuda")
    alphas_cumprod = torch.linspace(0.9991, 0.0047, 1000, device=setup.device)
    latents = inputs["latents"].to(setup.device)
    embeds = inputs["prompt_embeds"].to(setup.device, setup.weight_dtype)
    cond = {"text_embeds": inputs["pooled"].to(setup.device, setup.weight_dtype),
            "time_ids": inputs["time_ids"].to(setup.device)}

    def step() -> None:
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (len(latents),), device=setup.device)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        with _autocast(setup):
            pred = unet(noisy.to(setup.weight_dtype), t, encoder_hidden_states=embeds, added_cond_kwargs=cond).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def project_step_fn(setup: Setup, unet, case: Case, inputs: dict) -> Callable[[], None]:
    """What `animagine-lora train` runs: add_unet_lora, the speed switches, loss_step, the optimizer table."""
    add_unet_lora(unet, preset=case.preset, rank=case.rank, alpha=float(case.rank))
    if case.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if case.quantize != "none":
        quantize_frozen_unet(unet, case.quantize, setup.weight_dtype)
    apply_speed_settings(unet, SpeedSettings(channels_last=case.channels_last, compile=case.compile,
                                             cuda_graphs=case.cuda_graphs, fused_lora=case.fused_lora))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = build_optimizer(case.optimizer, [{"params": params, "lr": LR}], lr=LR, weight_decay=1e-2,
                                betas=(0.9, 0.999), eps=1e-8, fused=case.fused_optimizer)
    settings = LossSettings("epsilon", 0.0, None, 0, 1000)
    alphas_cumprod = torch.linspace(0.9991, 0.0047, 1000)
    batch = TrainBatch(inputs["latents"], [""] * len(inputs["latents"]), inputs["time_ids"], [])
    text_out = (inputs["prompt_embeds"].to(setup.device, setup.weight_dtype),
                inputs["pooled"].to(setup.device, setup.weight_dtype))
    generator = torch.Generator().manual_seed(SEED)

    def step() -> None:
        with _autocast(setup):
            loss = loss_step(unet, batch, lambda captions: text_out, settings, alphas_cumprod, generator,
                             setup.device, setup.weight_dtype)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# ---------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak_tflops(device: torch.device, n: int) -> float:
    """Dense matmul TFLOP/s: bf16 on CUDA (the tensor-core peak), fp32 on CPU; median of 10."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(13):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e12


def count_flops(step: Callable[[], None]) -> int:
    """FLOPs of one step (forward, backward; the optimizer's elementwise work is not counted)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def measure(setup: Setup, case: Case, state: dict, inputs: dict, *, steps: int, warmup: int,
            flops: dict) -> dict:
    """Build the case's model from `state`, time it, and free it."""
    device = setup.device
    torch._dynamo.reset()
    unet = build_frozen_unet(setup, state)
    builder = reference_step_fn if case.path == "reference" else project_step_fn
    step = builder(setup, unet, case, inputs)
    if device.type == "cuda":
        # Peak from here on: the fp32 build of the random UNet before its bf16 cast is not training.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    step()  # first step: compilation, cuDNN autotuning, allocator growth
    _sync(device)
    first_step_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    if case.workload not in flops and case.compile == "none":
        flops[case.workload] = count_flops(step)
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    del step, unet
    gc.collect()
    median = statistics.median(times)
    total = flops.get(case.workload)
    return {
        **asdict(case), "name": case.name, "step_s_median": median, "step_s_min": min(times),
        "images_per_s": case.batch / median, "first_step_s": first_step_s,
        "tflop_per_step": total / 1e12 if total else None,
        "achieved_tflops": total / median / 1e12 if total else None, "peak_memory_gib": peak,
    }


def out_of_memory(case: Case) -> dict:
    """The row of a configuration that did not fit: every number None."""
    numbers = ("step_s_median", "step_s_min", "images_per_s", "first_step_s", "tflop_per_step",
               "achieved_tflops", "peak_memory_gib")
    return {**asdict(case), "name": case.name + " (out of memory)", **dict.fromkeys(numbers)}


def cases(*, sdxl: bool, quick: bool) -> list[Case]:
    """Every configuration to measure, each workload's reference first.

    1. reference vs project (config defaults) for attn and attn-mlp, each batch, checkpointing
       off and on;
    2. at attn-mlp and the largest batch, the fastest settings and each one of them turned off;
    3. at batch 1 (launch-bound, what consumer GPUs run), compile and CUDA graphs;
    4. at batch 1 with checkpointing, the quantized frozen bases.
    """
    rank = 32 if sdxl else 4
    if quick:
        base = Case("reference", "attn-mlp", rank, 1, False)
        return [base, replace(base, path="project"), replace(base, path="project", channels_last=True),
                replace(base, path="project", fused_lora=False)]
    batches = (1, 4, 8) if sdxl else (1, 2)
    out = []
    for preset in ("attn", "attn-mlp"):
        for batch in batches:
            for checkpointing in (False, True):
                base = Case("reference", preset, rank, batch, checkpointing)
                out += [base, replace(base, path="project")]
    best = Case("project", "attn-mlp", rank, batches[-1], False, channels_last=True, compile="full")
    out += [best, replace(best, fused_lora=False), replace(best, fused_optimizer=False),
            replace(best, channels_last=False), replace(best, compile="regional"), replace(best, compile="none"),
            replace(best, gradient_checkpointing=True)]
    one = Case("project", "attn-mlp", rank, 1, False, channels_last=True)
    out += [replace(one, compile="full"), replace(one, compile="full", cuda_graphs=True),
            replace(one, compile="regional", cuda_graphs=True)]
    small = Case("project", "attn-mlp", rank, 1, True)
    out += [replace(small, quantize="fp8"), replace(small, quantize="nf4"),
            replace(small, quantize="nf4", optimizer="adamw8bit")]
    return out


def preset_cases(*, sdxl: bool) -> list[Case]:
    """One case per memory preset: its batch, checkpointing, quantization and optimizer."""
    rank = 32 if sdxl else 4
    out = []
    for preset in MEMORY_PRESETS.values():
        train, model, optimizer = preset.section("train"), preset.section("model"), preset.section("optimizer")
        out.append(Case("project", "attn-mlp", rank, train["batch_size"], train["gradient_checkpointing"],
                        quantize=model["quantize"], optimizer=optimizer["name"], memory_preset=preset.name))
    return out


# ---------------------------------------------------------------- output


def add_ratios(results: list[dict], peak_tflops: float) -> None:
    reference = {(r["preset"], r["rank"], r["batch"], r["gradient_checkpointing"]): r["images_per_s"]
                 for r in results if r["path"] == "reference"}
    for r in results:
        ref = reference.get((r["preset"], r["rank"], r["batch"], r["gradient_checkpointing"]))
        r["speedup_vs_reference"] = r["images_per_s"] / ref if ref and r["images_per_s"] else None
        r["share_of_peak"] = r["achieved_tflops"] / peak_tflops if r["achieved_tflops"] else None


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    # Tiny models do GFLOPs per step; SDXL does TFLOPs.
    unit, scale = ("TFLOP", 1.0) if report["unet"] == "sdxl" else ("GFLOP", 1e3)
    table = Table(title=f"LoRA training step, {report['unet']} UNet, latent {report['latent']}², "
                        f"{report['device']} (matmul peak {report['matmul_peak_tflops']:.3g} TFLOP/s "
                        f"{report['matmul_dtype']})")
    for column in ("configuration", "images/s", "step ms", "1st step s", f"{unit}/step", f"{unit}/s",
                   "% peak", "peak GiB", "× ref"):
        table.add_column(column, justify="left" if column == "configuration" else "right")

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    for r in report["results"]:
        step_ms = r["step_s_median"] and r["step_s_median"] * 1e3
        memory = fmt(r["peak_memory_gib"], ".2f")
        if r.get("memory_budget_gib"):  # a memory preset: its peak against the card's budget
            memory += f" / {r['memory_budget_gib']:.1f}" + {True: " ok", False: " OVER", None: ""}[r["fits_budget"]]
        table.add_row(r["name"], fmt(r["images_per_s"], ".3g"), fmt(step_ms, ".1f"),
                      fmt(r["first_step_s"], ".2f"), fmt(r["tflop_per_step"] and r["tflop_per_step"] * scale, ".3g"),
                      fmt(r["achieved_tflops"] and r["achieved_tflops"] * scale, ".3g"),
                      fmt(r["share_of_peak"] and 100 * r["share_of_peak"], ".1f"),
                      memory, fmt(r["speedup_vs_reference"], ".2f"))
    Console(width=150).print(table)


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny UNet on CPU (the default without CUDA)")
    parser.add_argument("--quick", action="store_true", help="reference, project, channels_last at batch 1 only")
    parser.add_argument("--presets", action="store_true",
                        help="only the memory presets (train/runtime/memory_presets.py): peak memory against each budget")
    parser.add_argument("--steps", type=int, help="timed steps per configuration (default 10, quick 3)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 3, quick 1)")
    parser.add_argument("--latent", type=int, help="latent side (default 128 = 1024² on SDXL, 16 tiny)")
    parser.add_argument("--json", type=Path, help="output file (default bench/results/train_step_*.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    diffusers.utils.logging.set_verbosity_error()  # per-case notes about the dtype cast of a random UNet

    cuda = torch.cuda.is_available() and not args.tiny
    sdxl = cuda
    device = torch.device("cuda" if cuda else "cpu")
    setup = Setup(device, torch.bfloat16 if cuda else torch.float32, unet_config(sdxl),
                  args.latent or (128 if sdxl else 16), sdxl)
    steps = args.steps or (3 if args.quick else 10)
    warmup = max(1, args.warmup or (1 if args.quick else 3))
    peak_n = 8192 if cuda else (512 if args.quick else 2048)
    peak = matmul_peak_tflops(device, peak_n)

    # Kept on the CPU so that each configuration's peak GPU memory holds one copy of the weights.
    state = {k: v.cpu() for k, v in build_frozen_unet(setup, None).state_dict().items()}
    inputs = random_inputs(setup, 1)
    flops: dict = {}
    results: list[dict] = []
    suffix = "_presets" if args.presets else "_quick" if args.quick else ""
    default = f"train_step_{'cuda_sdxl' if sdxl else 'cpu_tiny'}{suffix}.json"
    path = args.json or REPO / "bench" / "results" / default
    for case in preset_cases(sdxl=sdxl) if args.presets else cases(sdxl=sdxl, quick=args.quick):
        batch_inputs = inputs if case.batch == 1 else random_inputs(setup, case.batch)
        try:
            results.append(measure(setup, case, state, batch_inputs, steps=steps, warmup=warmup, flops=flops))
        except torch.cuda.OutOfMemoryError:
            # One configuration too large for this GPU must not cost the rest of the sweep.
            logger.warning("%s: out of memory, skipped", case.name)
            gc.collect()
            torch.cuda.empty_cache()
            results.append(out_of_memory(case))
        # After every configuration: a sweep stopped at a time limit keeps what it measured.
        report = build_report(setup, steps, warmup, peak, peak_n, results, flops)
        write_json(path, report)
    print_table(report)
    return 0


def build_report(setup: Setup, steps: int, warmup: int, peak: float, peak_n: int, measured: list[dict],
                 flops: dict) -> dict:
    """The JSON report of the rows measured so far (ratios and FLOPs of compiled rows filled in)."""
    cuda = setup.device.type == "cuda"
    results = [dict(r) for r in measured]
    for r in results:  # compiled cases: the FLOPs of the same workload measured uncompiled
        workload = (r["preset"], r["rank"], r["batch"], r["gradient_checkpointing"])
        if r["tflop_per_step"] is None and r["step_s_median"] and workload in flops:
            total = flops[workload]
            r["tflop_per_step"], r["achieved_tflops"] = total / 1e12, total / r["step_s_median"] / 1e12
    add_ratios(results, peak)

    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, "
                                                                f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()})",
        "unet": "sdxl" if setup.sdxl else "tiny", "latent": setup.latent, "weight_dtype": str(setup.weight_dtype),
        "steps": steps, "warmup": warmup, "matmul_peak_tflops": peak, "matmul_n": peak_n,
        "matmul_dtype": "bf16" if cuda else "fp32",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "peft": peft.__version__},
        "results": results,
    }
    for r in results:
        if r["memory_preset"]:
            budget = MEMORY_PRESETS[r["memory_preset"]].unet_budget_gib
            r["memory_budget_gib"] = budget
            r["fits_budget"] = None if r["peak_memory_gib"] is None else r["peak_memory_gib"] <= budget
    return report


if __name__ == "__main__":
    sys.exit(main())
