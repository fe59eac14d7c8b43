"""An exponential moving average of the trainable (LoRA) weights, kept in float32.

After every optimizer step `update(step)` moves each average towards its weight:
ema ← ema + (1 - d_t) (w - ema), one `torch._foreach_lerp_` over all tensors. The decay warms up
as diffusers' `EMAModel.get_decay` does (training_utils.py): d_t = min(decay, (1 + t) / (10 + t))
with t = step - 1, so the zero-initialised LoRA B does not dominate the average for thousands of
steps. The average lives on the training device or the CPU (`train.ema_device`); on the CPU
each update copies the weights there first.

`applied()` swaps the averaged weights into the model for a block (export, validation) and puts
the raw ones back. `state_dict`/`load_state_dict` make it one more piece of checkpoint state
(`ema.json` + `ema.safetensors`, keyed by parameter name), so a resumed run continues the same
average.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def ema_decay_at(step: int, decay: float) -> float:
    """The decay used by the update after optimizer step `step` (1-based), with warm-up."""
    t = max(0, step - 1)
    return min(decay, (1 + t) / (10 + t))


class LoraEma:
    """EMA of named trainable parameters.

    Args:
        named_params: (name, parameter) pairs; names key the saved file.
        decay: the target decay (`train.ema_decay`), in (0, 1).
        device: where the float32 averages live.
    """

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], decay: float,
                 device: torch.device | str) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay {decay}: must be in (0, 1)")
        self.names = [name for name, _ in named_params]
        if len(set(self.names)) != len(self.names):
            raise ValueError("EMA parameter names are not unique")
        self.params = [p for _, p in named_params]
        self.decay = decay
        self.device = torch.device(device)
        self.shadow = [p.detach().to(self.device, torch.float32, copy=True) for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Average in the current weights, after optimizer step `step`."""
        weights = [p.detach().to(self.device, torch.float32) for p in self.params]
        torch._foreach_lerp_(self.shadow, weights, 1.0 - ema_decay_at(step, self.decay))

    @contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model for the block, the raw ones restored after."""
        raw = [p.detach().clone() for p in self.params]
        for param, average in zip(self.params, self.shadow):
            param.copy_(average)
        try:
            yield
        finally:
            for param, weight in zip(self.params, raw):
                param.copy_(weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: average.detach().cpu().contiguous() for name, average in zip(self.names, self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the averages of `state_dict()`.

        Raises:
            ValueError: the tensors do not match these parameters (names or shapes).
        """
        if set(state) != set(self.names):
            raise ValueError(f"EMA tensors do not match this config's adapters "
                             f"({len(set(state) ^ set(self.names))} names differ)")
        for name, average in zip(self.names, self.shadow):
            if state[name].shape != average.shape:
                raise ValueError(f"EMA {name} has shape {tuple(state[name].shape)}, expected {tuple(average.shape)}")
            average.copy_(state[name])


def build_ema(modules: dict, decay: float | None, device: torch.device | str) -> LoraEma | None:
    """The EMA of every trainable weight of `modules` ({"unet": module, ...}, unwrapped), named
    `unet.<parameter>` and so on (`train.ema_decay`); None when `decay` is None (off)."""
    if decay is None:
        return None
    named = [(f"{prefix}.{name}", p) for prefix, module in modules.items()
             for name, p in module.named_parameters() if p.requires_grad]
    return LoraEma(named, decay, device)
