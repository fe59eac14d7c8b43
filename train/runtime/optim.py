"""Optimizers and learning-rate schedules, chosen by name from tables.

`OPTIMIZERS[name](param_groups, lr=, weight_decay=, betas=, eps=, fused=)` builds one optimizer;
every builder has that signature, so adding one is one table entry. `fused` asks for a single-kernel
update where the optimizer has one (PyTorch's AdamW: one fused kernel for all parameters instead
of a dozen foreach kernels per step; `speed.fused_optimizer`); the others ignore it. Optional
back-ends (bitsandbytes, prodigyopt) are imported only when chosen. Schedules come from
`diffusers.optimization`, whose names (`constant_with_warmup`, `cosine`, ...) are what users know
from the diffusers scripts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

OptimizerBuilder = Callable[..., torch.optim.Optimizer]


def _adamw(groups, *, lr, weight_decay, betas, eps, fused=False):
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, fused=fused or None)


def _adamw8bit(groups, *, lr, weight_decay, betas, eps, fused=False):
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ImportError("optimizer.name = 'adamw8bit' needs bitsandbytes: pip install bitsandbytes") from err
    return bnb.optim.AdamW8bit(groups, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)


def _adafactor(groups, *, lr, weight_decay, betas, eps, fused=False):
    from transformers.optimization import Adafactor

    # A fixed learning rate, as for LoRA in sd-scripts: relative_step would ignore `lr`.
    return Adafactor(groups, lr=lr, weight_decay=weight_decay, scale_parameter=False,
                     relative_step=False, warmup_init=False)


def _prodigy(groups, *, lr, weight_decay, betas, eps, fused=False):
    try:
        from prodigyopt import Prodigy
    except ImportError as err:
        raise ImportError("optimizer.name = 'prodigy' needs prodigyopt: pip install prodigyopt") from err
    # Prodigy estimates the step size itself; `lr` is a multiplier (1.0 is the recommended value).
    return Prodigy(groups, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
                   decouple=True, safeguard_warmup=True)


OPTIMIZERS: dict[str, OptimizerBuilder] = {
    "adamw": _adamw,
    "adamw8bit": _adamw8bit,
    "adafactor": _adafactor,
    "prodigy": _prodigy,
}


def build_optimizer(name: str, param_groups: list[dict], *, lr: float, weight_decay: float,
                    betas: tuple[float, float], eps: float, fused: bool = False) -> torch.optim.Optimizer:
    """The optimizer `name` over `param_groups` (each may carry its own "lr").

    Raises:
        ValueError: unknown name, listing the known ones.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name: unknown optimizer {name!r} (choose from {sorted(OPTIMIZERS)})")
    return OPTIMIZERS[name](param_groups, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, fused=fused)


def build_lr_scheduler(name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int):
    """A `diffusers.optimization.get_scheduler` schedule, stepped once per optimizer step."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
