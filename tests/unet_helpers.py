"""The tiny SDXL UNet with a LoRA and a fixed batch, for tests that compare training maths
(speed switches, fused LoRA, quantized bases)."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from train.data.rows import TrainBatch
from train.lora.adapters import add_unet_lora, lora_modules
from train.loss import LossSettings, loss_step
from train.model import tiny

SETTINGS = LossSettings("epsilon", 0.0, None, 0, 1000)
ALPHAS_CUMPROD = torch.linspace(0.999, 0.01, 1000)


def tiny_lora_unet(*, base_dtype: torch.dtype = torch.float32, lora: bool = True, dora: bool = False,
                   gradient_checkpointing: bool = False) -> UNet2DConditionModel:
    """The tiny SDXL UNet, frozen base in `base_dtype`, with a rank-4 attn-mlp LoRA (fp32) whose
    B is random: B = 0 would give A no gradient and every comparison would prove nothing.

    Zero-initialised base weights are randomised too. `lora=False` gives the same base weights
    without adapters.
    """
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**tiny._sdxl_config("unet"), **tiny.TINY_UNET})
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in unet.parameters():
            if param.ndim > 1 and param.abs().sum() == 0:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    unet.requires_grad_(False)
    unet.to(base_dtype)
    if lora:
        add_unet_lora(unet, preset="attn-mlp", rank=4, alpha=4.0, dora=dora)
        with torch.no_grad():
            for module in lora_modules(unet).values():
                module.lora_B["default"].weight.normal_(0, 0.02, generator=generator)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet


def fixed_batch(seed: int = 2, batch_size: int = 2) -> TrainBatch:
    """Latents (B, 4, 16, 16) and time ids of a 128-pixel batch, fixed by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    time_ids = torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]] * batch_size)
    return TrainBatch(torch.randn(batch_size, 4, 16, 16, generator=generator), ["a"] * batch_size, time_ids,
                      [str(i) for i in range(batch_size)])


def fixed_text(captions):
    """Stand-in text-encoder outputs: (B, 77, d1+d2) and pooled (B, d2), fixed."""
    generator = torch.Generator().manual_seed(3)
    width = tiny.TEXT_HIDDEN_1 + tiny.TEXT_HIDDEN_2
    return (torch.randn(len(captions), 77, width, generator=generator),
            torch.randn(len(captions), tiny.TEXT_HIDDEN_2, generator=generator))


def loss_and_grads(unet, model_dtype: torch.dtype = torch.float32
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`train.loss.loss_step` on the fixed batch, then backward: (loss, LoRA gradients by name)."""
    loss = loss_step(unet, fixed_batch(), fixed_text, SETTINGS, ALPHAS_CUMPROD, torch.Generator().manual_seed(4),
                     torch.device("cpu"), model_dtype)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}


def assert_same_loss_and_grads(expected, actual, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    """Two `loss_and_grads` results agree (fp32 on CPU: rtol 1e-4, a small atol for gradients
    near zero), and every gradient is non-zero, so the comparison proves something."""
    (loss_a, grads_a), (loss_b, grads_b) = expected, actual
    torch.testing.assert_close(loss_b, loss_a, rtol=rtol, atol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        assert grads_a[name].abs().sum() > 0, f"{name}: no gradient, the comparison would prove nothing"
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=rtol, atol=atol, msg=name)
