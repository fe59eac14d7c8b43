"""Optimizers and learning-rate schedules, chosen by name from tables.

`OPTIMIZERS[name](param_groups, lr=, weight_decay=, betas=, eps=, fused=, warmup_steps=)` builds
one optimizer; every builder has that signature, so adding one is one table entry. `fused` asks for
a single-kernel update where the optimizer has one (PyTorch's AdamW: one fused kernel for all
parameters instead of a dozen foreach kernels per step; `speed.fused_optimizer`); the others ignore
it, as all but schedule-free AdamW ignore `warmup_steps` (the LR schedule warms up instead).
Optional back-ends (bitsandbytes, prodigyopt) are imported only when chosen; CAME, Lion and
schedule-free AdamW come from the maintained `pytorch-optimizer` package. Schedules come from
`diffusers.optimization`, whose names (`constant_with_warmup`, `cosine`, ...) are what users know
from the diffusers scripts.

Schedule-free AdamW (Defazio et al. 2024, "The Road Less Scheduled") trains at one point (y) and
evaluates at another (x, the average of the iterates): `eval_weights(optimizer, params)` puts x
into the parameters for sampling and export and restores y bit for bit afterwards.
`lora_plus_groups` splits parameter groups for LoRA+ (Hayou et al. 2024); `adapter_param_groups`
builds a run's groups: block-wise UNet rates and a rate per text encoder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

OptimizerBuilder = Callable[..., torch.optim.Optimizer]


def _adamw(groups, *, lr, weight_decay, betas, eps, fused=False, warmup_steps=0):
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, fused=fused or None)


def _adamw8bit(groups, *, lr, weight_decay, betas, eps, fused=False, warmup_steps=0):
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ImportError("optimizer.name = 'adamw8bit' needs bitsandbytes: pip install bitsandbytes") from err
    return bnb.optim.AdamW8bit(groups, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)


def _adafactor(groups, *, lr, weight_decay, betas, eps, fused=False, warmup_steps=0):
    from transformers.optimization import Adafactor

    # A fixed learning rate, as for LoRA in sd-scripts: relative_step would ignore `lr`.
    return Adafactor(groups, lr=lr, weight_decay=weight_decay, scale_parameter=False,
                     relative_step=False, warmup_init=False)


def _prodigy(groups, *, lr, weight_decay, betas, eps, fused=False, warmup_steps=0):
    try:
        from prodigyopt import Prodigy
    except ImportError as err:
        raise ImportError("optimizer.name = 'prodigy' needs prodigyopt: pip install prodigyopt") from err
    # Prodigy estimates the step size itself; `lr` is a multiplier (1.0 is the recommended value).
    return Prodigy(groups, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
                   decouple=True, safeguard_warmup=True)


def _came(groups, *, lr, weight_decay, betas, eps, fused=False, warmup_steps=0):
    from pytorch_optimizer import CAME

    # CAME (Luo et al. 2023) has a third beta, for its confidence estimate: the paper's 0.9999.
    # Its eps pair (1e-30, 1e-16) is Adafactor's, not Adam's, so `eps` is not passed on.
    return CAME(groups, lr=lr, weight_decay=weight_decay, betas=(*betas, 0.9999))


def _lion(groups, *, lr, weight_decay, betas, eps, fused=False, warmup_steps=0):
    from pytorch_optimizer import Lion

    # Lion (Chen et al. 2023) takes sign steps: use a 3-10x lower lr and higher weight decay than
    # AdamW. Its betas are part of the method (paper: 0.9, 0.99), so they are passed as configured.
    return Lion(groups, lr=lr, weight_decay=weight_decay, betas=betas)


def _adamw_schedulefree(groups, *, lr, weight_decay, betas, eps, fused=False, warmup_steps=0):
    from pytorch_optimizer import ScheduleFreeAdamW

    return ScheduleFreeAdamW(groups, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
                             warmup_steps=warmup_steps)


OPTIMIZERS: dict[str, OptimizerBuilder] = {
    "adamw": _adamw,
    "adamw8bit": _adamw8bit,
    "adafactor": _adafactor,
    "prodigy": _prodigy,
    "came": _came,
    "lion": _lion,
    "adamw_schedulefree": _adamw_schedulefree,
}


def build_optimizer(name: str, param_groups: list[dict], *, lr: float, weight_decay: float,
                    betas: tuple[float, float], eps: float, fused: bool = False,
                    warmup_steps: int = 0) -> torch.optim.Optimizer:
    """The optimizer `name` over `param_groups` (each may carry its own "lr").

    Raises:
        ValueError: unknown name, listing the known ones.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name: unknown optimizer {name!r} (choose from {sorted(OPTIMIZERS)})")
    return OPTIMIZERS[name](param_groups, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps,
                            fused=fused, warmup_steps=warmup_steps)


def lora_plus_groups(named_params: list[tuple[str, torch.nn.Parameter]], lr: float, ratio: float) -> list[dict]:
    """Parameter groups for LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of
    Large Models"): the B (up, PEFT `lora_B`) matrices at `lr * ratio`, the rest at `lr`.

    With `ratio` 1 this is one group, as without LoRA+. Empty groups are left out.
    """
    if ratio == 1:
        return [{"params": [p for _, p in named_params], "lr": lr}]
    up = [p for name, p in named_params if ".lora_B." in name]
    rest = [p for name, p in named_params if ".lora_B." not in name]
    return [group for group in ({"params": rest, "lr": lr}, {"params": up, "lr": lr * ratio}) if group["params"]]


def adapter_param_groups(unet: list[tuple[str, torch.nn.Parameter]],
                         encoders: list[list[tuple[str, torch.nn.Parameter]]], *, lr: float,
                         encoder_lrs: list[float], lora_plus_ratio: float = 1.0,
                         unet_multiplier: Callable[[str], float] | None = None) -> list[dict]:
    """Optimizer parameter groups of a run's adapters, each split for LoRA+ (`lora_plus_groups`).

    The UNet's parameters at `lr` times `unet_multiplier(name)` (block-wise rates, sd-scripts'
    `down/mid/up_lr_weight`: one group per distinct multiplier), then each text encoder's at its
    rate in `encoder_lrs` (encoders sharing a rate share groups, as with one `text_encoder_lr`).
    """
    multipliers: dict[float, list] = {}
    for named in unet:
        multipliers.setdefault(unet_multiplier(named[0]) if unet_multiplier else 1.0, []).append(named)
    # The groups at the plain rate first: the loop logs the first group's rate as "lr".
    ordered = sorted(multipliers.items(), key=lambda item: item[0] != 1.0)
    groups = [g for scale, named in ordered for g in lora_plus_groups(named, lr * scale, lora_plus_ratio)]
    rates: dict[float, list] = {}
    for named, rate in zip(encoders, encoder_lrs):
        rates.setdefault(rate, []).extend(named)
    return groups + [g for rate, named in rates.items() for g in lora_plus_groups(named, rate, lora_plus_ratio)]


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    """True for a schedule-free optimizer (its groups carry `train_mode`), bare or accelerate-wrapped."""
    return any("train_mode" in group for group in optimizer.param_groups)


@contextmanager
def eval_weights(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> Iterator[None]:
    """The weights to evaluate in `params` for the block: for a schedule-free optimizer its averaged
    iterate x (`optimizer.eval()`), otherwise nothing changes.

    The training point y is copied before and put back after: `optimizer.train()` would recompute
    it from x and z with a rounding error, and a resumed run must continue bit for bit.
    """
    if not is_schedule_free(optimizer):
        yield
        return
    saved = [p.detach().clone() for p in params]
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)


def build_lr_scheduler(name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int):
    """A `diffusers.optimization.get_scheduler` schedule, stepped once per optimizer step."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
