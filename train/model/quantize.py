"""Compressed storage for the frozen UNet base: fp8 weights with per-channel scales, or NF4.

LoRA training never updates the base weights, so they only need to be stored well enough to
compute activations and input gradients. Two formats, both applied *after* the adapters exist:

- "fp8": every frozen `nn.Linear` and `nn.Conv2d` keeps its weight as float8 E4M3 (Micikevicius
  et al. 2022, "FP8 Formats for Deep Learning") with one float32 scale per output channel
  (amax / 448, so a channel of small weights keeps its 3 mantissa bits instead of flushing to
  zero). Half the bytes of bf16.
- "nf4": every frozen `nn.Linear` becomes `bitsandbytes.nn.Linear4bit` (NF4 with double-quantised
  block scales, Dettmers et al. 2023, QLoRA); the convolutions, which bitsandbytes cannot
  quantise, go to fp8 as above. On SDXL (87 % of the weights in Linears): 1.38 GiB instead of
  4.78 GiB in bf16.

Design (module swap): each frozen layer is replaced by `Fp8Linear` / `Fp8Conv2d` / `Linear4bit`
in its parent, including the `base_layer` inside PEFT's LoRA wrappers, which call
`self.base_layer(x)` and so work with any module. A swap rather than rebinding `forward` on the
original instance because the original's `weight` must stop being a bf16 `nn.Linear` weight:
code that sees an `nn.Linear` (PEFT's merge, diffusers' QKV fusion) reads `.weight` as the real
matrix, and the new classes make that mistake an AttributeError/dtype error instead of silently
wrong numbers. The fp8 layers keep `in_features`/`out_features` (conv: `in_channels`, ...).

Storage details of the fp8 layers, each chosen for a reason:

- The fp8 bytes live in a frozen `nn.Parameter` of dtype uint8 (the E4M3 bit pattern;
  `fp8_weight()` views it as `torch.float8_e4m3fn`), as bitsandbytes stores 4-bit codes. A float8
  dtype would be found first by diffusers' `ModelMixin.dtype` (the first floating parameter), so
  `unet.dtype` would report float8 and pipelines would cast their inputs to it; it would also be
  upcast by a later `unet.to(torch.bfloat16)`. A parameter rather than a buffer because DDP
  broadcasts all buffers from rank 0 on every forward.
- The scale is a float32 buffer of shape (out,) (11 MiB on SDXL, so DDP's per-forward buffer
  broadcast costs little; a float32 parameter could become `unet.dtype`).
- The bias is kept as a frozen parameter in the compute dtype.

The forward goes through a custom `torch.autograd.Function` that upcasts the weight, runs the
op, and saves only the fp8 bytes and the scale for backward, where it upcasts again to compute
the input gradient. `F.linear(x, weight.to(bf16))` would instead save the bf16 copy for
backward, keeping a full-precision copy of every weight alive from forward to backward. No
weight gradient is computed: the base is frozen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

logger = logging.getLogger(__name__)

QUANTIZE_MODES = ("none", "fp8", "nf4")
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0


@dataclass(frozen=True)
class QuantizeReport:
    """What `quantize_frozen_unet` converted, and the frozen bytes before and after."""

    mode: str
    fp8_linear: int  # nn.Linear -> Fp8Linear
    fp8_conv2d: int  # nn.Conv2d -> Fp8Conv2d
    nf4_linear: int  # nn.Linear -> bitsandbytes Linear4bit
    frozen_bytes_before: int
    frozen_bytes_after: int


# ---------------------------------------------------------------- fp8 storage


def fp8_quantize(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel E4M3 quantisation: (bits as uint8, same shape; float32 scale, (out,)).

    scale = amax over the channel / 448, so each channel's largest weight maps to fp8's largest
    finite value; `weight ~= bits.view(float8_e4m3fn) * scale`. All-zero channels get scale 1.
    """
    w = weight.detach().float()  # (out, in) or (out, in/groups, kh, kw)
    amax = w.abs().amax(dim=tuple(range(1, w.ndim)))  # (out,)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    scaled = (w / scale.view(-1, *[1] * (w.ndim - 1))).clamp(-FP8_MAX, FP8_MAX)
    return scaled.to(FP8_DTYPE).view(torch.uint8), scale


def fp8_dequantize(bits: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The weight `bits.view(float8_e4m3fn) * scale` in `dtype` (the inverse of `fp8_quantize`)."""
    return bits.view(FP8_DTYPE).to(dtype) * scale.to(dtype).view(-1, *[1] * (bits.ndim - 1))


class _Fp8LinearFunction(torch.autograd.Function):
    """y = x W^T + b with W upcast from fp8 on the fly; saves only the fp8 bytes and the scale."""

    @staticmethod
    def forward(ctx, x, bits, scale, bias, compute_dtype):
        ctx.save_for_backward(bits, scale)
        ctx.compute_dtype, ctx.input_dtype = compute_dtype, x.dtype
        return F.linear(x.to(compute_dtype), fp8_dequantize(bits, scale, compute_dtype), bias)

    @staticmethod
    def backward(ctx, grad_output):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        bits, scale = ctx.saved_tensors
        # grad_output's dtype is what the forward computed in (autocast's dtype under autocast):
        # casting the weight to it reproduces autograd through F.linear exactly.
        weight = fp8_dequantize(bits, scale, ctx.compute_dtype).to(grad_output.dtype)
        grad_input = grad_output @ weight  # (..., out) @ (out, in) -> (..., in)
        return grad_input.to(ctx.input_dtype), None, None, None, None


class _Fp8Conv2dFunction(torch.autograd.Function):
    """conv2d with the weight upcast from fp8 on the fly; saves only the fp8 bytes and the scale."""

    @staticmethod
    def forward(ctx, x, bits, scale, bias, stride, padding, dilation, groups, compute_dtype):
        ctx.save_for_backward(bits, scale)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.compute_dtype, ctx.input_dtype, ctx.input_shape = compute_dtype, x.dtype, x.shape
        weight = fp8_dequantize(bits, scale, compute_dtype)
        return F.conv2d(x.to(compute_dtype), weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_output):
        nones = (None,) * 8
        if not ctx.needs_input_grad[0]:
            return (None, *nones)
        bits, scale = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        weight = fp8_dequantize(bits, scale, ctx.compute_dtype).to(grad_output.dtype)
        # The transposed convolution, through aten.convolution_backward with only the input
        # gradient requested; the explicit input shape resolves the stride's size ambiguity.
        grad_input = torch.nn.grad.conv2d_input(
            ctx.input_shape, weight, grad_output, stride, padding, dilation, groups
        )
        return (grad_input.to(ctx.input_dtype), *nones)


def _frozen_bias(bias: Tensor | None, dtype: torch.dtype) -> nn.Parameter | None:
    if bias is None:
        return None
    return nn.Parameter(bias.detach().to(dtype), requires_grad=False)


def _store_fp8(module: nn.Module, layer: nn.Linear | nn.Conv2d, compute_dtype: torch.dtype) -> None:
    """Give `module` the fp8 form of `layer`'s frozen weight and bias (the attributes both fp8
    layers share: `weight` bits, `weight_scale`, `bias`, `compute_dtype`, train mode)."""
    module.compute_dtype = compute_dtype
    bits, scale = fp8_quantize(layer.weight)
    module.weight = nn.Parameter(bits, requires_grad=False)
    module.bias = _frozen_bias(layer.bias, compute_dtype)
    module.register_buffer("weight_scale", scale)
    module.train(layer.training)


class Fp8Linear(nn.Module):
    """A frozen `nn.Linear` stored in fp8 (per-output-channel scale), computing in `compute_dtype`.

    `weight`: uint8 parameter holding the E4M3 bits, (out_features, in_features);
    `weight_scale`: float32 buffer, (out_features,); `bias`: compute_dtype or None.
    """

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        _store_fp8(self, linear, compute_dtype)

    def fp8_weight(self) -> Tensor:
        """The stored weight as `torch.float8_e4m3fn` (a view, no copy), before scaling."""
        return self.weight.view(FP8_DTYPE)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The full weight in `dtype` (default compute_dtype): a new tensor, for inspection."""
        return fp8_dequantize(self.weight, self.weight_scale, dtype or self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        return _Fp8LinearFunction.apply(
            x, self.weight, self.weight_scale, self.bias, self.compute_dtype
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}"
        )


class Fp8Conv2d(nn.Module):
    """A frozen `nn.Conv2d` stored in fp8 (per-output-channel scale), computing in `compute_dtype`.

    Zero padding only (`padding_mode="zeros"`, numeric padding): every convolution of SDXL.
    `weight`: uint8 parameter holding the E4M3 bits, (out, in/groups, kh, kw).
    """

    def __init__(self, conv: nn.Conv2d, compute_dtype: torch.dtype) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(
                f"Fp8Conv2d: padding {conv.padding!r} / padding_mode "
                f"{conv.padding_mode!r} not supported (numeric zero padding only)"
            )
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation, self.groups = conv.padding, conv.dilation, conv.groups
        _store_fp8(self, conv, compute_dtype)

    def fp8_weight(self) -> Tensor:
        """The stored weight as `torch.float8_e4m3fn` (a view, no copy), before scaling."""
        return self.weight.view(FP8_DTYPE)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The full weight in `dtype` (default compute_dtype): a new tensor, for inspection."""
        return fp8_dequantize(self.weight, self.weight_scale, dtype or self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        return _Fp8Conv2dFunction.apply(
            x,
            self.weight,
            self.weight_scale,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.compute_dtype,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, bias={self.bias is not None}, "
            f"compute_dtype={self.compute_dtype}"
        )


# ---------------------------------------------------------------- NF4 (bitsandbytes)


def _import_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(
            "quantize mode 'nf4' needs bitsandbytes: pip install 'bitsandbytes>=0.45' "
            "(or use mode 'fp8', which needs only torch)"
        ) from err
    return bitsandbytes


def _nf4_linear(linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    """`bitsandbytes.nn.Linear4bit` (NF4, double-quantised block scales) built from `linear`.

    The weight is cast to `compute_dtype` first, so dequantisation yields it directly, and is
    quantised on its current device (`Params4bit.to(device)` quantises an unquantised weight).
    """
    bnb = _import_bitsandbytes()
    weight = linear.weight.detach()
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=False,
        compute_dtype=compute_dtype,
        quant_type="nf4",
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        weight.to(compute_dtype),
        requires_grad=False,
        quant_type="nf4",
        compress_statistics=True,
        module=layer,
    ).to(weight.device)
    layer.bias = _frozen_bias(linear.bias, compute_dtype)
    return layer.train(linear.training)


# ---------------------------------------------------------------- the UNet pass


def _adapter_module_ids(model: nn.Module) -> set[int]:
    """ids of every module inside a LoRA wrapper's adapter containers (lora_A, lora_B,
    lora_embedding_*, lora_magnitude_vector): trainable, never converted."""
    ids = set()
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for attr in LoraLayer.adapter_layer_names:
                holder = getattr(module, attr, None)
                if isinstance(holder, nn.Module):
                    ids.update(id(m) for m in holder.modules())
    return ids


def _frozen_layers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(qualified name, parent, attribute) of each base `nn.Linear` / `nn.Conv2d`.

    Exact types only: a subclass may override `forward`, which a swap would silently drop
    (this also skips an already converted `Linear4bit`, an `nn.Linear` subclass).
    """
    adapters = _adapter_module_ids(model)
    found = []
    for parent_name, parent in model.named_modules():
        for attr, child in parent.named_children():
            if type(child) in (nn.Linear, nn.Conv2d) and id(child) not in adapters:
                found.append((f"{parent_name}.{attr}" if parent_name else attr, parent, attr))
    return found


def _dora_base_names(model: nn.Module) -> set[str]:
    """Qualified names of the `base_layer`s of LoRA wrappers with a DoRA adapter."""
    return {
        f"{name}.base_layer"
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and any(module.use_dora.values())
    }


def _check_convertible(layers, mode: str, dora_bases: set[str]) -> None:
    trainable = [
        name
        for name, parent, attr in layers
        if any(p.requires_grad for p in getattr(parent, attr).parameters())
    ]
    if trainable:
        more = f" (+{len(trainable) - 5} more)" if len(trainable) > 5 else ""
        raise ValueError(
            f"quantize mode {mode!r}: {len(trainable)} layer(s) to convert have parameters that "
            f"require grad: {', '.join(trainable[:5])}{more}. Only frozen base weights can be "
            "compressed; freeze the base "
            "(`requires_grad_(False)`) before attaching the LoRA adapters."
        )
    # PEFT's DoRA recomputes the base weight's column norm every forward from
    # `dequantize_module_weight(base_layer)`, which dequantises bitsandbytes weights but would
    # return an fp8 layer's raw uint8 bytes: silently wrong, so refused.
    fp8_dora = sorted(
        name
        for name, parent, attr in layers
        if name in dora_bases and (mode == "fp8" or isinstance(getattr(parent, attr), nn.Conv2d))
    )
    if fp8_dora:
        raise ValueError(
            f"quantize mode {mode!r}: DoRA needs the dequantised base weight, which PEFT cannot "
            f"read from an fp8 layer ({fp8_dora[0]}, {len(fp8_dora)} in all); use mode 'none', "
            "or 'nf4' with a preset without convolutions"
        )


def quantize_frozen_unet(unet: nn.Module, mode: str, compute_dtype: torch.dtype) -> QuantizeReport:
    """Compress the frozen base weights of `unet` in place (see the module docstring).

    Call AFTER `train.lora.adapters.add_unet_lora`: PEFT's `_move_adapter_to_device_of_base_layer`
    casts newly created adapter weights to the dtype of the base layer's weight, which for an fp8
    or 4-bit base would round (or break) the fresh LoRA weights.

    Converted: every `nn.Linear` and `nn.Conv2d` that is not part of a LoRA adapter, i.e. the
    `base_layer` inside each LoRA wrapper and every un-adapted layer (time embedding, ResNet
    convolutions, ...). Norms and the adapters are untouched; biases move to `compute_dtype`.
    In `train.loop.setup` this (through `quantize_unet`) comes right after `build_lora` and before
    the speed settings (a compiled region must contain the final modules).

    Args:
        mode: "none" (no-op), "fp8" (Linear and Conv2d to fp8), "nf4" (Linear to NF4, Conv2d
            to fp8).
        compute_dtype: dtype the converted layers compute in (and store biases in); the
            frozen base's dtype, usually torch.bfloat16.

    Returns:
        A QuantizeReport: layers converted per kind and the frozen bytes before and after.

    Raises:
        ValueError: unknown mode or compute dtype; a layer to convert has a weight or bias that
            requires grad; a DoRA adapter on a layer that would be stored in fp8.
        ImportError: mode "nf4" without bitsandbytes.
    """
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize mode {mode!r}: choose one of {', '.join(QUANTIZE_MODES)}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"quantize compute_dtype {compute_dtype}: use torch.bfloat16, "
            "torch.float16 or torch.float32"
        )
    before = frozen_weight_bytes(unet)
    counts = {"fp8_linear": 0, "fp8_conv2d": 0, "nf4_linear": 0}
    if mode == "none":
        return QuantizeReport(mode, **counts, frozen_bytes_before=before, frozen_bytes_after=before)
    if mode == "nf4":
        _import_bitsandbytes()  # fail before touching the model
    layers = _frozen_layers(unet)
    # Everything is checked before anything is converted: an error leaves the model as it was.
    _check_convertible(layers, mode, _dora_base_names(unet))
    # Layers are fetched one at a time so each full-precision original is freed once replaced.
    for _, parent, attr in layers:
        layer = getattr(parent, attr)
        if isinstance(layer, nn.Conv2d):
            new, kind = Fp8Conv2d(layer, compute_dtype), "fp8_conv2d"
        elif mode == "nf4":
            new, kind = _nf4_linear(layer, compute_dtype), "nf4_linear"
        else:
            new, kind = Fp8Linear(layer, compute_dtype), "fp8_linear"
        setattr(parent, attr, new)
        del layer, new
        counts[kind] += 1
    return QuantizeReport(
        mode, **counts, frozen_bytes_before=before, frozen_bytes_after=frozen_weight_bytes(unet)
    )


def quantize_unet(unet: nn.Module, mode: str, *, compute_dtype: torch.dtype, device: torch.device | str) -> None:
    """`model.quantize`: compress the frozen UNet weights (`quantize_frozen_unet`), then move the
    UNet to `device` (it was left on the CPU, so its full-precision weights never reach a small GPU).
    Nothing happens for mode "none"."""
    if mode == "none":
        return
    report = quantize_frozen_unet(unet, mode, compute_dtype)
    unet.to(device)
    logger.info("model.quantize = %s: frozen UNet weights %.2f GiB -> %.2f GiB", mode,
                report.frozen_bytes_before / 2**30, report.frozen_bytes_after / 2**30)


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def frozen_weight_bytes(model: nn.Module) -> int:
    """Bytes of every non-trainable parameter and buffer of `model`, as stored.

    fp8 weights count 1 byte per element; a bitsandbytes 4-bit weight counts its packed bytes
    plus its quantisation state (block scales, code book) as `state_dict` would save them.
    """
    total = sum(_nbytes(b) for b in model.buffers())
    for param in model.parameters():
        if param.requires_grad:
            continue
        total += _nbytes(param)
        quant_state = getattr(param, "quant_state", None)
        if quant_state is not None:
            total += sum(
                _nbytes(v)
                for v in quant_state.as_dict(packed=True).values()
                if isinstance(v, Tensor)
            )
    return total
