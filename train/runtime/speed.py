"""Speed switches for the training UNet, applied once in setup by `apply_speed_settings`.

Each switch leaves the maths unchanged (tests/test_speed.py checks loss and LoRA gradients against
the untouched model); what it changes is how the work reaches the hardware. bench/train_step.py
measures each against a naive reference; bench/RESULTS.md has the figures and the H100 ceiling.

- `sdpa`: every attention layer uses diffusers' `AttnProcessor2_0`, i.e.
  `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels on CUDA).
  It is diffusers' default; the switch asserts it and restores it if something replaced it.
- `channels_last`: the UNet's 4-D weights in NHWC layout, the layout cuDNN's tensor-core
  convolutions want (PyTorch's "Channels Last Memory Format" tutorial). On CPU it rarely helps.
- `compile`: `torch.compile` in place (the module stays a `UNet2DConditionModel`, so PEFT state
  dicts, export and accelerate see the same names).
  "regional" compiles each repeated `BasicTransformerBlock` (diffusers' `compile_repeated_blocks`,
  the blocks listed in `UNet2DConditionModel._repeated_blocks`): the LoRA layers of attention and
  feed-forward sit inside the compiled region, warm-up is one block's compile, not the UNet's.
  "full" compiles the whole UNet's forward (longest warm-up, most fusion). Shapes are static
  (`dynamic=False`): one graph per bucket, each with kernels specialised to its latent size, and
  the recompile limit is raised so that every bucket of a dataset gets its own graph.
- `cuda_graphs`: the compiled graphs are replayed as CUDA graphs (inductor's "reduce-overhead"
  mode, one recorded graph per bucket shape): a step becomes a few graph launches instead of
  thousands of kernel launches, which is what batch 1 is bound by. Needs `compile`; on CPU it
  is a no-op (inductor skips CUDA graphs for CPU tensors).
- `fused_lora`: each LoRA layer's up-projection, scale and residual add as one `addmm` kernel
  instead of PEFT's matmul, multiply and add (`train.lora.fused`); layers it cannot fuse (DoRA,
  dropout) keep PEFT's forward. Applied before compiling, so compiled graphs contain it.
- `fused_optimizer`: AdamW's update as one fused kernel (`train.runtime.optim`).

Applied after the adapters are attached (the compiled graphs must contain the LoRA branches) and
before `accelerator.prepare` (DDP wraps the compiled module).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

logger = logging.getLogger(__name__)

CompileMode = Literal["none", "regional", "full"]
COMPILE_MODES: tuple[str, ...] = ("none", "regional", "full")
RECOMPILE_LIMIT = 64  # graphs per compiled function: the card's 9 buckets, or the `all` set's 40+


@dataclass(frozen=True)
class SpeedSettings:
    """The switches; the defaults are the settings the equality tests pass with on every device.

    `train.config.SpeedConfig` (the `[speed]` TOML table) has the same fields and can be passed
    to `apply_speed_settings` directly.
    """

    sdpa: bool = True
    channels_last: bool = False
    compile: CompileMode = "none"
    cuda_graphs: bool = False
    fused_lora: bool = True
    fused_optimizer: bool = True


def ensure_sdpa(unet) -> int:
    """Make every attention processor `AttnProcessor2_0`; returns how many had to be replaced."""
    processors = unet.attn_processors  # {"down_blocks.1.attentions.0...processor": processor}
    other = [name for name, proc in processors.items() if not isinstance(proc, AttnProcessor2_0)]
    if other:
        logger.info("speed.sdpa: replacing %d attention processors (e.g. %s) with AttnProcessor2_0",
                    len(other), other[0])
        unet.set_attn_processor(AttnProcessor2_0())
    return len(other)


def apply_speed_settings(unet, settings) -> None:
    """Apply `settings` (a `SpeedSettings` or `SpeedConfig`) to `unet` in place.

    Raises:
        ValueError: an unknown `compile` mode.
    """
    if settings.compile not in COMPILE_MODES:
        raise ValueError(f"speed.compile: {settings.compile!r} is not one of {', '.join(COMPILE_MODES)}")
    if settings.cuda_graphs and settings.compile == "none":
        raise ValueError("speed.cuda_graphs needs speed.compile = 'regional' or 'full' (the graphs are "
                         "recorded from the compiled code)")
    if settings.sdpa:
        ensure_sdpa(unet)
    if settings.channels_last:
        unet.to(memory_format=torch.channels_last)
    if settings.fused_lora:
        from train.lora.fused import fuse_lora_layers

        fuse_lora_layers(unet)
    if settings.compile != "none":
        # One specialised graph per bucket: more buckets than dynamo's default limit of 8 would
        # silently fall back to eager for the rest.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        options = {"dynamic": False, "mode": "reduce-overhead" if settings.cuda_graphs else "default"}
        if settings.compile == "regional":
            unet.compile_repeated_blocks(**options)
        else:
            unet.compile(**options)
    logger.info("speed settings: sdpa=%s channels_last=%s fused_lora=%s compile=%s cuda_graphs=%s",
                settings.sdpa, settings.channels_last, settings.fused_lora, settings.compile, settings.cuda_graphs)
