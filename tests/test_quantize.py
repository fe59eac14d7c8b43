"""The compressed frozen UNet base (train.model.quantize): fp8 storage and NF4, on the tiny SDXL UNet.

Where each bound comes from (CPU, bf16 autocast, bf16 frozen base as in training):

- Loss of the fp8 / NF4 model vs the bf16 model: relative error < 5e-2 (measured 1.6e-3 fp8,
  1.8e-3 NF4). NF4 gradients (41 % off on this model) are checked for being non-zero and for
  being exactly those of the dequantised weights.
- LoRA gradients: the tiny random UNet amplifies weight noise about ninefold (1 % random
  multiplicative noise on every frozen weight moves the concatenated LoRA gradient by 8.8 %), so
  E4M3's rounding (about 2.5 % RMS per weight, 3 mantissa bits) moves it by about 24 %: a fixed 1e-1
  bound cannot hold on this model. Instead the fp8 model must (a) compute *exactly* the function of
  its rounded weights (fp32, equal to an nn.Linear/nn.Conv2d model holding the same values), and
  (b) move the gradients no more than 1.5 x as much as random weight noise of the same RMS, layer
  by layer, does (measured: 24.1 % vs 23.4-24.2 % over three noise seeds): a wrong scale, a
  transposed or dropped weight would be systematic and far larger.
- Training curves: see `test_training_curves_track_bf16`.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn
from unet_helpers import ALPHAS_CUMPROD, SETTINGS, fixed_batch, fixed_text, tiny_lora_unet

from train.data.rows import TrainBatch
from train.lora.adapters import add_unet_lora, lora_modules, lora_state_dict
from train.loss import loss_step
from train.model import tiny
from train.model.quantize import (
    QUANTIZE_MODES,
    Fp8Conv2d,
    Fp8Linear,
    fp8_dequantize,
    fp8_quantize,
    frozen_weight_bytes,
    quantize_frozen_unet,
)


@pytest.fixture(scope="module")
def bf16_unet() -> UNet2DConditionModel:
    """Built once; every test works on a deep copy."""
    return tiny_lora_unet(base_dtype=torch.bfloat16)


def _quantized(base: nn.Module, mode: str, compute_dtype=torch.bfloat16):
    unet = copy.deepcopy(base)
    return unet, quantize_frozen_unet(unet, mode, compute_dtype)


def _loss(unet, batch: TrainBatch, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """train.loss.loss_step, under bf16 autocast when the model computes in bf16."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        return loss_step(
            unet,
            batch,
            fixed_text,
            SETTINGS,
            ALPHAS_CUMPROD,
            torch.Generator().manual_seed(seed),
            torch.device("cpu"),
            dtype,
        )


def _loss_and_grads(unet, dtype=torch.bfloat16) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = _loss(unet, fixed_batch(), 4, dtype)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten().float() for _, g in sorted(grads.items())])


def _relative_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    actual, expected = actual.detach().float(), expected.detach().float()
    return float((actual - expected).norm() / expected.norm())


def _base_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """Every Linear/Conv2d-like layer outside the LoRA adapters, by qualified name."""
    kinds = (nn.Linear, nn.Conv2d, Fp8Linear, Fp8Conv2d)
    return {
        name: m
        for name, m in unet.named_modules()
        if isinstance(m, kinds) and not any(p.startswith("lora_") for p in name.split("."))
    }


def _round_trip_weights(unet: nn.Module) -> None:
    """Replace every frozen Linear/Conv2d weight by its fp8 round trip, in place."""
    with torch.no_grad():
        for layer in _base_layers(unet).values():
            layer.weight.copy_(fp8_dequantize(*fp8_quantize(layer.weight), layer.weight.dtype))


# ---------------------------------------------------------------- what is stored


def test_fp8_converts_every_frozen_layer_and_leaves_lora_alone(bf16_unet):
    before = _base_layers(bf16_unet)
    lora_before = lora_state_dict(bf16_unet)
    unet, report = _quantized(bf16_unet, "fp8")

    after = _base_layers(unet)
    assert after.keys() == before.keys()
    assert report.fp8_linear == sum(isinstance(m, nn.Linear) for m in before.values())
    assert report.fp8_conv2d == sum(isinstance(m, nn.Conv2d) for m in before.values())
    assert report.nf4_linear == 0 and report.fp8_linear > 100 and report.fp8_conv2d > 40
    for name, layer in after.items():
        assert isinstance(layer, (Fp8Linear, Fp8Conv2d)), name
        assert layer.fp8_weight().dtype == torch.float8_e4m3fn and layer.weight.element_size() == 1
        assert layer.weight_scale.shape == (layer.weight.shape[0],)
        assert not layer.weight.requires_grad
        assert layer.bias is None or layer.bias.dtype == torch.bfloat16
    # The base layers inside PEFT's wrappers too, not only the un-adapted ones.
    assert all(isinstance(m.base_layer, Fp8Linear) for m in lora_modules(unet).values())

    lora_after = lora_state_dict(unet)
    assert lora_after.keys() == lora_before.keys() and len(lora_after) > 0
    for key, value in lora_after.items():
        assert value.dtype == torch.float32 and torch.equal(value, lora_before[key]), key
    assert unet.dtype == torch.bfloat16  # diffusers' ModelMixin.dtype: inputs are cast to it

    # bf16 -> fp8 halves the weights; the per-channel float32 scales and the untouched bf16
    # norms keep the tiny model a little above half (measured 1.93x).
    assert report.frozen_bytes_before == frozen_weight_bytes(bf16_unet)
    assert report.frozen_bytes_after == frozen_weight_bytes(unet)
    assert 1.85 < report.frozen_bytes_before / report.frozen_bytes_after <= 2.0


def test_nf4_stores_linears_in_4bit_and_convs_in_fp8(bf16_unet):
    import bitsandbytes as bnb

    _, fp8_report = _quantized(bf16_unet, "fp8")
    unet, report = _quantized(bf16_unet, "nf4")
    assert report.nf4_linear == fp8_report.fp8_linear and report.fp8_conv2d == fp8_report.fp8_conv2d
    linears = [m for m in unet.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == report.nf4_linear
    for layer in linears:
        assert layer.weight.quant_state.quant_type == "nf4"
        assert layer.compute_dtype == torch.bfloat16 and not layer.weight.requires_grad
        assert layer.bias is None or not layer.bias.requires_grad
        # Packed: two 4-bit codes per byte.
        assert layer.weight.numel() * 2 == layer.in_features * layer.out_features
    assert all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in lora_modules(unet).values())
    assert unet.dtype == torch.bfloat16
    assert lora_state_dict(unet).keys() == lora_state_dict(bf16_unet).keys()
    assert report.frozen_bytes_after < fp8_report.frozen_bytes_after


# ---------------------------------------------------------------- the custom autograd Functions


def _layers(dtype: torch.dtype) -> list[tuple[nn.Module, nn.Module, tuple]]:
    """(original, fp8 copy, input shape): a Linear on a 3-D input and a strided, padded,
    dilated, grouped Conv2d with an odd input size (the stride's output-size ambiguity)."""
    torch.manual_seed(5)
    linear = nn.Linear(12, 10)
    conv = nn.Conv2d(4, 6, kernel_size=3, stride=2, padding=2, dilation=2, groups=2)
    return [
        (linear, Fp8Linear(linear, dtype), (2, 3, 12)),
        (conv, Fp8Conv2d(conv, dtype), (2, 4, 7, 7)),
    ]


def _reference_forward(fp8_layer: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Plain autograd through the upcast weight."""
    weight, bias = fp8_layer.dequantize(dtype), fp8_layer.bias
    if isinstance(fp8_layer, Fp8Linear):
        return nn.functional.linear(x, weight, bias)
    return nn.functional.conv2d(
        x, weight, bias, fp8_layer.stride, fp8_layer.padding, fp8_layer.dilation, fp8_layer.groups
    )


@pytest.mark.parametrize("index", [0, 1], ids=["linear", "conv2d"])
def test_input_gradient_passes_gradcheck_in_float64(index):
    _, layer, shape = _layers(torch.float64)[index]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index", [0, 1], ids=["linear", "conv2d"])
def test_custom_backward_equals_autograd_through_upcast_weight(index, dtype):
    original, layer, shape = _layers(dtype)[index]
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    grad_output = torch.randn_like(_reference_forward(layer, x, dtype))
    expected_out = _reference_forward(layer, x, dtype)
    (expected,) = torch.autograd.grad(expected_out, x, grad_output)
    out = layer(x)
    (actual,) = torch.autograd.grad(out, x, grad_output)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    torch.testing.assert_close(actual, expected)  # dtype-default tolerances: rounding only
    # And the fp8 layer is close to the layer it was built from (E4M3: 3 mantissa bits).
    reference = original.to(dtype)(x)
    assert _relative_error(reference, out) < 5e-2


@pytest.mark.parametrize("index", [0, 1], ids=["linear", "conv2d"])
def test_backward_keeps_only_the_fp8_weight(index):
    """Between forward and backward only the stored fp8 bytes and the scale are kept: no upcast
    weight copy, and not the input (the frozen weight needs no gradient)."""
    _, layer, shape = _layers(torch.bfloat16)[index]
    x = torch.randn(shape, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    assert [t.dtype for t in saved] == [torch.uint8, torch.float32]
    assert saved[0].data_ptr() == layer.weight.data_ptr()
    assert x.grad is not None and x.grad.abs().sum() > 0


# ---------------------------------------------------------------- the quantized UNet


def test_fp8_model_computes_exactly_its_rounded_weights():
    """fp32: the fp8 model equals a plain model whose weights are the fp8 round trip."""
    base = tiny_lora_unet(base_dtype=torch.float32)
    fp8, _ = _quantized(base, "fp8", torch.float32)
    rounded = copy.deepcopy(base)
    _round_trip_weights(rounded)
    loss_a, grads_a = _loss_and_grads(rounded, torch.float32)
    loss_b, grads_b = _loss_and_grads(fp8, torch.float32)
    torch.testing.assert_close(loss_b, loss_a)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=name)


def test_fp8_loss_and_lora_grads_close_to_bf16(bf16_unet):
    loss_ref, grads_ref = _loss_and_grads(copy.deepcopy(bf16_unet))
    unet, _ = _quantized(bf16_unet, "fp8")
    loss, grads = _loss_and_grads(unet)
    assert _relative_error(loss_ref, loss) < 5e-2
    assert grads.keys() == grads_ref.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert grad.abs().sum() > 0 and torch.isfinite(grad).all(), name

    # The same per-layer RMS error as fp8 rounding, but random: the gradient error it causes is
    # what rounding noise alone explains on this (noise-amplifying) tiny model.
    noisy = copy.deepcopy(bf16_unet)
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for layer in _base_layers(noisy).values():
            weight = layer.weight.float()
            error = (fp8_dequantize(*fp8_quantize(weight), torch.float32) - weight).norm()
            noise = torch.randn(weight.shape, generator=generator)
            layer.weight.copy_(weight + noise * (error / noise.norm()))
    _, grads_noisy = _loss_and_grads(noisy)
    fp8_error = _relative_error(_flat(grads_ref), _flat(grads))
    noise_error = _relative_error(_flat(grads_ref), _flat(grads_noisy))
    assert fp8_error < 1.5 * noise_error, (fp8_error, noise_error)


def test_nf4_forward_backward(bf16_unet):
    """NF4 on CPU (bitsandbytes' fallback): close loss, non-zero LoRA gradients, and exactly the
    function of its dequantised weights."""
    import bitsandbytes as bnb

    loss_ref, _ = _loss_and_grads(copy.deepcopy(bf16_unet))
    unet, _ = _quantized(bf16_unet, "nf4")
    loss, grads = _loss_and_grads(unet)
    assert _relative_error(loss_ref, loss) < 5e-2
    for name, grad in grads.items():
        assert grad.abs().sum() > 0 and torch.isfinite(grad).all(), name

    dequantised = copy.deepcopy(bf16_unet)
    _round_trip_weights(dequantised)  # the convolutions: fp8 in "nf4" mode too
    with torch.no_grad():
        layers = _base_layers(unet)
        for name, layer in _base_layers(dequantised).items():
            if isinstance(layer, nn.Linear):
                packed = layers[name].weight
                layer.weight.copy_(bnb.functional.dequantize_4bit(packed, packed.quant_state))
    loss_deq, grads_deq = _loss_and_grads(dequantised)
    torch.testing.assert_close(loss, loss_deq)
    # bitsandbytes 0.50 dequantises the 4-bit weight for the backward in the compute dtype (bf16),
    # the reference keeps it in the layer's own: the gradients agree to bf16's tolerances.
    # The forward is exactly the dequantised function; the backward is not bit for bit since
    # bitsandbytes 0.50 (its CPU 4-bit backward: 0.9 % relative on this model, bf16 rounding
    # size), and earlier releases cannot step 8-bit AdamW on the CPU, so the bound is bf16's.
    assert _relative_error(_flat(grads_deq), _flat(grads)) < 2e-2


@pytest.mark.parametrize("mode", ["fp8", "nf4"])
def test_gradient_checkpointing_gives_the_same_grads(bf16_unet, mode):
    unet, _ = _quantized(bf16_unet, mode)
    loss, grads = _loss_and_grads(unet)
    unet.zero_grad(set_to_none=True)
    unet.enable_gradient_checkpointing()
    calls = []
    probe = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.base_layer
    probe.register_forward_hook(lambda *_: calls.append(1))
    loss_ckpt, grads_ckpt = _loss_and_grads(unet)
    assert len(calls) == 2  # forward, then the recomputation in backward: checkpointing is on
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    for name in grads:
        assert grads[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-8, msg=name)


# ---------------------------------------------------------------- training


STEPS = 20
# The quantized runs must track the bf16 run to within a quarter of the bf16 curve's own
# batch-to-batch spread (std of its 20 losses, each step a different random batch, noise and
# timesteps). Measured: mean |difference| = 0.034 x that std for fp8 and 0.047 x for NF4, so 0.25
# leaves at least 5x room for other CPUs' kernels while staying far below the spread itself (X = 1
# would accept a curve no closer than an unrelated batch).
CURVE_TOLERANCE = 0.25


def _train(base: nn.Module, mode: str) -> tuple[torch.Tensor, bool]:
    """20 AdamW steps (lr 1e-3) on seeded random batches; (losses, every LoRA tensor moved)."""
    unet, _ = _quantized(base, mode)
    params = [p for p in unet.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for step in range(STEPS):
        loss = _loss(unet, fixed_batch(seed=100 + step, batch_size=1), 200 + step, torch.bfloat16)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    moved = all(not torch.equal(p, p0) for p, p0 in zip(params, start))
    return torch.tensor(losses), moved


@pytest.fixture(scope="module")
def bf16_training(bf16_unet):
    return _train(bf16_unet, "none")


@pytest.mark.heavy
@pytest.mark.parametrize("mode", ["fp8", "nf4"])
def test_training_curves_track_bf16(bf16_unet, bf16_training, mode):
    losses_ref, moved_ref = bf16_training
    losses, moved = _train(bf16_unet, mode)
    assert moved_ref and moved
    spread = float(losses_ref.std())
    difference = float((losses - losses_ref).abs().mean())
    assert difference < CURVE_TOLERANCE * spread, (difference, spread)


# ---------------------------------------------------------------- errors and the no-op


def test_unknown_mode_is_an_error(bf16_unet):
    with pytest.raises(ValueError, match="quantize mode 'int3'.*none, fp8, nf4"):
        quantize_frozen_unet(copy.deepcopy(bf16_unet), "int3", torch.bfloat16)
    with pytest.raises(ValueError, match="compute_dtype"):
        quantize_frozen_unet(copy.deepcopy(bf16_unet), "fp8", torch.float8_e4m3fn)
    assert QUANTIZE_MODES == ("none", "fp8", "nf4")


def test_trainable_weight_is_an_error_and_nothing_is_converted(bf16_unet):
    unet = copy.deepcopy(bf16_unet)
    unet.conv_in.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"require grad: conv_in\b"):
        quantize_frozen_unet(unet, "fp8", torch.bfloat16)
    assert not any(isinstance(m, (Fp8Linear, Fp8Conv2d)) for m in unet.modules())


def test_dora_needs_nf4_linears():
    """PEFT's DoRA reads the base weight every forward: bitsandbytes weights it can dequantise,
    fp8 bytes it cannot (refused). With NF4 on the adapted Linears, DoRA trains as usual."""
    unet = tiny_lora_unet(base_dtype=torch.bfloat16, dora=True)
    with pytest.raises(ValueError, match="DoRA.*fp8 layer"):
        quantize_frozen_unet(unet, "fp8", torch.bfloat16)
    assert not any(isinstance(m, (Fp8Linear, Fp8Conv2d)) for m in unet.modules())
    loss_ref, _ = _loss_and_grads(copy.deepcopy(unet))
    quantize_frozen_unet(unet, "nf4", torch.bfloat16)
    loss, grads = _loss_and_grads(unet)
    assert _relative_error(loss_ref, loss) < 5e-2
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_none_changes_nothing(bf16_unet):
    unet = copy.deepcopy(bf16_unet)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    types = [type(m) for m in unet.modules()]
    report = quantize_frozen_unet(unet, "none", torch.bfloat16)
    assert (report.fp8_linear, report.fp8_conv2d, report.nf4_linear) == (0, 0, 0)
    assert report.frozen_bytes_before == report.frozen_bytes_after == frozen_weight_bytes(unet)
    assert [type(m) for m in unet.modules()] == types
    after = unet.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in state.items())


def test_nf4_without_bitsandbytes_says_what_to_install(bf16_unet, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(ImportError, match="pip install 'bitsandbytes"):
        quantize_frozen_unet(copy.deepcopy(bf16_unet), "nf4", torch.bfloat16)


# ---------------------------------------------------------------- the real SDXL UNet on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nf4_sdxl_step_fits_a_4gb_card():
    """The 4 GB memory preset (train/runtime/memory_presets.py) on the real SDXL UNet (random weights: same
    memory as the checkpoint): attn-mlp r32 LoRA, NF4 Linears + fp8 convolutions, gradient
    checkpointing, 8-bit AdamW, fused LoRA forward, batch 1 at 1024x1024 (latent 128).

    The UNet is built in bf16 on the GPU and quantised there, and the peak counter is reset
    afterwards: what is measured is training. Two optimizer steps, because from the second on
    the optimizer states are alive during forward and backward (the steady-state peak). With
    fp32 AdamW instead, the LoRA's 85M parameters with gradients and moments take 1.27 GiB and
    the estimate is 3.3-3.6 GiB: over the budget.
    """
    from train.lora.fused import fuse_lora_layers
    from train.runtime.optim import build_optimizer

    device = torch.device("cuda")
    torch.manual_seed(0)
    with device:
        unet = UNet2DConditionModel.from_config(tiny._sdxl_config("unet")).to(torch.bfloat16)
    unet.requires_grad_(False)
    add_unet_lora(unet, preset="attn-mlp", rank=32, alpha=32.0)
    report = quantize_frozen_unet(unet, "nf4", torch.bfloat16)
    fuse_lora_layers(unet)
    unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = build_optimizer("adamw8bit", [{"params": params, "lr": 1e-4}], lr=1e-4, weight_decay=1e-2,
                                betas=(0.9, 0.999), eps=1e-8)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()

    generator = torch.Generator().manual_seed(1)
    text = (
        torch.randn(1, 77, 2048, generator=generator).to(device, torch.bfloat16),
        torch.randn(1, 1280, generator=generator).to(device, torch.bfloat16),
    )
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]])
    batch = TrainBatch(torch.randn(1, 4, 128, 128, generator=generator), ["a"], time_ids, ["0"])
    peaks = []
    for step in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_step(
                unet,
                batch,
                lambda _: text,
                SETTINGS,
                ALPHAS_CUMPROD,
                torch.Generator().manual_seed(step),
                device,
                torch.bfloat16,
            )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() / 2**30)
    assert torch.isfinite(loss)
    print(
        f"\nNF4 SDXL step at latent 128: frozen {report.frozen_bytes_after / 2**30:.2f} GiB, "
        f"LoRA params {sum(p.numel() for p in params) / 1e6:.1f}M, "
        f"peak {peaks[0]:.2f} GiB after step 1, {peaks[1]:.2f} GiB after step 2"
    )
    assert peaks[1] < 3.2
