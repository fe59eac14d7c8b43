"""sd-scripts' three LoRA dropouts on PEFT LoRA layers: neuron, rank and module dropout.

sd-scripts' `LoRAModule.forward` (networks/lora.py), in training only, computes

    lx = lora_down(x)                                   # (B, r), (B, T, r) or (B, r, H, W)
    module dropout: with probability p_module (one draw per forward) the module adds nothing
    neuron dropout: lx = dropout(lx, p)                  # network_dropout, rescaled by 1/(1-p)
    rank dropout:   lx = lx * mask / (1 - p_rank)        # mask (B, r) ~ Bernoulli(1 - p_rank)
    y = base(x) + scale * lora_up(lx)

so rank dropout zeroes whole rank components per sample and rescales the rest as if the rank were
smaller. PEFT's own `lora_dropout` acts on x before `lora_A` instead, so these are applied by a
forward hook on each layer's `lora_A` (its output is sd-scripts' lx), which PEFT's forward then
multiplies by B and the scale. In eval mode (validation, sample grids) the hook changes nothing.

Module dropout multiplies lx by 0 rather than skipping the branch: the output is the same, and
every LoRA parameter still gets a (zero) gradient, which DDP needs to stay in step across ranks
(a parameter without a gradient would stall its all-reduce). Draws use torch's global generators,
which checkpoints save and restore, so a resumed run draws the same masks.

The fused LoRA forward (`train.lora.fused`) reads `lora_A`'s weight directly and would bypass the
hook, so layers with it keep PEFT's forward.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train.lora.adapters import ADAPTER_NAME, lora_modules


def down_dropout(lx: Tensor, *, dropout: float, rank_dropout: float, module_dropout: float) -> Tensor:
    """sd-scripts' training-time dropouts on a LoRA down projection's output `lx`.

    `lx` is (B, r) or (B, T, r) for a Linear layer, (B, r, H, W) for a convolution; the rank mask
    is drawn per sample, (B, r), and broadcast over tokens or pixels.
    """
    if module_dropout and torch.rand(1).item() < module_dropout:
        return lx * 0  # connected to the graph: zero gradients, not none (see the module docstring)
    if dropout:
        lx = F.dropout(lx, p=dropout)
    if rank_dropout:
        rank = lx.shape[-1] if lx.dim() == 3 else lx.shape[1]
        mask = torch.rand((lx.shape[0], rank), device=lx.device) > rank_dropout  # (B, r)
        if lx.dim() == 3:
            mask = mask.unsqueeze(1)  # (B, 1, r): the same components for every token
        elif lx.dim() == 4:
            mask = mask[:, :, None, None]  # (B, r, 1, 1): the same components for every pixel
        lx = lx * mask.to(lx.dtype) / (1.0 - rank_dropout)
    return lx


def _hook(module: nn.Module, inputs, output: Tensor, **rates) -> Tensor | None:
    return down_dropout(output, **rates) if module.training else None


def add_lora_dropouts(model: nn.Module, *, dropout: float = 0.0, rank_dropout: float = 0.0,
                      module_dropout: float = 0.0) -> int:
    """Hook the dropouts onto every LoRA layer's `lora_A` in `model`; returns how many layers.

    Nothing is hooked when all three rates are 0 (the forward stays exactly PEFT's).
    """
    if not (dropout or rank_dropout or module_dropout):
        return 0
    hook = functools.partial(_hook, dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout)
    layers = [layer for layer in lora_modules(model).values() if ADAPTER_NAME in getattr(layer, "lora_A", {})]
    for layer in layers:
        layer.lora_A[ADAPTER_NAME].register_forward_hook(hook)
    return len(layers)
