"""A fused forward for PEFT's LoRA `Linear` layers: the B projection, scale and add in one addmm.

PEFT's `peft.tuners.lora.layer.Linear.forward` (peft 0.21) computes, per adapted layer,

    result = base_layer(x)
    result = result + lora_B(lora_A(dropout(x))) * scaling

which is three GEMMs plus an elementwise multiply and an elementwise add, each its own kernel
launch (and with a bf16 base and fp32 adapters, casts around them). On the SDXL UNet with the
`attn-mlp` preset that is 722 layers, and these small kernels make a training step much
slower than `attn` at nearly the same FLOPs (bench/RESULTS.md, "The work and the ceiling"). Here the last three steps
become one BLAS call, `addmm(result, h, B^T, beta=1, alpha=scaling)` with `h = x A^T`:

    y = base_layer(x) + scaling * (x A^T) B^T            # (..., out_features)

`fuse_lora_layers` binds that forward on each eligible layer instance; the class, parameters,
names and PEFT state dict are untouched, so `save_lora_weights`, export and checkpoints see the
same model, and `unfuse_lora_layers` restores PEFT's forward.

Eligible: a `peft.tuners.lora.layer.Linear` (not a subclass with its own forward) with exactly
one adapter, plain LoRA (no DoRA or other PEFT variant, no `lora_bias`), `lora_dropout` 0 (the
dropout is `nn.Identity`), no forward hooks on `lora_A` (sd-scripts' dropouts, `train.lora.dropout`),
`fan_in_fan_out` false, and a base layer that is an `nn.Linear` (or a
subclass, such as bitsandbytes' `Linear4bit`) or a `train.model.quantize.Fp8Linear`: its output is one
tensor of shape (..., out_features), which the fused add needs.
Other layers keep PEFT's forward. The fused forward hands the call back to PEFT's class forward
whenever the adapters are disabled, merged or switched, extra arguments such as `adapter_names`
are passed, or input-dtype casting is turned off (`peft.helpers.disable_input_dtype_casting`).

Dtypes follow PEFT: without autocast PEFT casts `x` to the LoRA weight dtype, adds the LoRA
output to the base result in the promoted dtype and casts the sum back to the base result's dtype;
the fused addmm runs in that promoted dtype (fp32 for a bf16 base with fp32 adapters) and casts
back, so the only rounding to bf16 is the final one, as in PEFT. Under `torch.autocast` addmm is
on autocast's lower-precision list, so the whole layer runs in the autocast dtype, as PEFT's
`F.linear` calls do; the cast of `x` to fp32 that PEFT does first is skipped there (autocast
casts it straight back, so it changes nothing but costs two kernels).

The fused path reads `lora_A` / `lora_B` weights directly: forward hooks registered on those two
submodules do not run (hooks on the LoRA layer itself and on its base layer do).
"""

from __future__ import annotations

import logging
import types
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import Tensor, nn

from train.model.quantize import Fp8Linear

logger = logging.getLogger(__name__)

_ADAPTER_ATTR = "_fused_lora_adapter"  # the adapter name the bound forward computes


def _skip_reason(module: LoraLinear) -> str | None:
    """Why `module` cannot take the fused forward, or None when it can."""
    if type(module).forward is not LoraLinear.forward:
        return "subclass with its own forward"
    if len(module.lora_A) != 1:
        return f"{len(module.lora_A)} adapters"
    (name,) = module.lora_A.keys()
    if module.use_dora.get(name, False):
        return "DoRA"
    if name in module.lora_variant:
        return f"PEFT variant {type(module.lora_variant[name]).__name__}"
    if not isinstance(module.lora_dropout[name], nn.Identity):
        return "lora_dropout > 0"
    if module.lora_A[name]._forward_hooks:
        return "hooks on lora_A (lora.dropout, rank_dropout, module_dropout)"
    if module.fan_in_fan_out:
        return "fan_in_fan_out"
    if module.lora_B[name].bias is not None:
        return "lora_bias"
    if not isinstance(module.base_layer, (nn.Linear, Fp8Linear)):
        return f"base layer {type(module.base_layer).__name__} is not a Linear"
    return None


def _fused_forward(self: LoraLinear, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """PEFT's `Linear.forward` for one plain LoRA adapter, with B, scale and add as one addmm."""
    name = getattr(self, _ADAPTER_ATTR)
    if (args or kwargs or self.disable_adapters or self.merged or self.active_adapters != [name]
            or not getattr(self, "cast_input_dtype_enabled", True)):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)  # (..., out_features)
    out_dtype = result.dtype
    weight_a = self.lora_A[name].weight  # (r, in_features)
    weight_b = self.lora_B[name].weight  # (out_features, r)
    autocast = torch.is_autocast_enabled(x.device.type)
    if not autocast:
        x = x.to(weight_a.dtype)
    h = F.linear(x, weight_a)  # (..., r)
    if not autocast:
        # PEFT's `result + lora` promotes (bf16 + fp32 -> fp32) before its final cast back.
        dtype = torch.promote_types(result.dtype, h.dtype)
        result, h, weight_b = result.to(dtype), h.to(dtype), weight_b.to(dtype)
    fused = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]),
                        weight_b.t(), alpha=self.scaling[name])  # (prod(...), out_features)
    return fused.view(result.shape).to(out_dtype)


def fuse_lora_layers(model: nn.Module) -> int:
    """Bind the fused forward on every eligible PEFT LoRA `Linear` of `model`, in place.

    Returns the number of fused layers (calling it again re-binds and returns the same count).
    Ineligible layers keep PEFT's forward; how many and why is logged once per call.
    """
    fused = 0
    skipped: Counter[str] = Counter()
    for module in model.modules():
        if not isinstance(module, LoraLinear):
            continue
        reason = _skip_reason(module)
        if reason is not None:
            skipped[reason] += 1
            _unbind(module)  # fused earlier, ineligible now (e.g. a second adapter was added)
            continue
        (name,) = module.lora_A.keys()
        setattr(module, _ADAPTER_ATTR, name)
        module.forward = types.MethodType(_fused_forward, module)
        fused += 1
    if skipped:
        reasons = ", ".join(f"{count} {reason}" for reason, count in skipped.most_common())
        logger.info("fused LoRA forward on %d layers; %d keep PEFT's forward (%s)",
                    fused, sum(skipped.values()), reasons)
    else:
        logger.info("fused LoRA forward on %d layers", fused)
    return fused


def _unbind(module: nn.Module) -> bool:
    """Drop the fused forward bound on `module`, if any; True when there was one."""
    if _ADAPTER_ATTR not in module.__dict__:
        return False
    module.__dict__.pop("forward", None)
    delattr(module, _ADAPTER_ATTR)
    return True


def unfuse_lora_layers(model: nn.Module) -> int:
    """Restore PEFT's class forward on every layer of `model` that has the fused one; returns how many."""
    return sum(_unbind(module) for module in model.modules())
