"""LoRA set-up (train.lora.adapters): target presets on the real SDXL architecture, init, dtypes."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from train.config import LoraConfig
from train.lora.adapters import (
    TARGET_PRESETS,
    add_text_encoder_lora,
    add_unet_lora,
    lora_config,
    lora_modules,
    lora_state_dict,
)
from train.model.loading import load_base_model
from train.names import SDXL_CONFIG_DIR


def _sdxl_unet_on_meta():
    with init_empty_weights():
        return UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(SDXL_CONFIG_DIR / "unet")
        )


@pytest.mark.parametrize(
    "preset, expected", [("attn", 560), ("attn-mlp", 722), ("attn-mlp-conv", 760)]
)
def test_preset_layer_counts_on_real_sdxl(preset, expected):
    """Counts from docs/lora-formats.md; +conv adds 17 ResNets x 2 convs and 4 resamplers."""
    unet = _sdxl_unet_on_meta()
    with init_empty_weights():
        add_unet_lora(unet, preset=preset, rank=4, alpha=4)
    modules = lora_modules(unet)
    assert len(modules) == expected
    assert all(
        ".transformer_blocks." in n or ".attentions." in n for n in modules
    ) or preset.endswith("conv")


def test_text_encoder_counts_on_real_sdxl():
    with init_empty_weights():
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(SDXL_CONFIG_DIR / "text_encoder"))
        te2 = CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(SDXL_CONFIG_DIR / "text_encoder_2")
        )
        add_text_encoder_lora(te1, rank=4, alpha=1)
        add_text_encoder_lora(te2, rank=4, alpha=1)
    assert len(lora_modules(te1)) == 72
    assert len(lora_modules(te2)) == 192
    suffixes = {name.rsplit(".", 1)[-1] for name in lora_modules(te2)}
    assert suffixes == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}


@pytest.mark.parametrize("dora", [False, True])
@torch.no_grad()
def test_step_zero_equals_base_model(tiny_model, sdxl_output, dora):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model.diffusers_dir)
    before = sdxl_output(pipe)
    add_unet_lora(pipe.unet, preset="attn-mlp-conv", rank=4, alpha=8, dora=dora)
    add_text_encoder_lora(pipe.text_encoder, rank=4, alpha=8, dora=dora)
    add_text_encoder_lora(pipe.text_encoder_2, rank=4, alpha=8, dora=dora)
    torch.testing.assert_close(sdxl_output(pipe), before, rtol=0, atol=1e-6)
    for module in lora_modules(pipe.unet).values():
        assert module.lora_B["default"].weight.abs().sum() == 0
        assert module.lora_A["default"].weight.abs().sum() > 0


def test_lora_fp32_on_frozen_bf16_base_and_trains(tiny_model):
    model = load_base_model(str(tiny_model.diffusers_dir))  # bf16 UNet
    config = add_unet_lora(model.unet, rank=4, alpha=1.0)
    assert (config.r, config.lora_alpha) == (4, 1.0)
    trainable = {n: p for n, p in model.unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    frozen = [p for n, p in model.unet.named_parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    for module in lora_modules(model.unet).values():
        assert module.scaling["default"] == pytest.approx(1.0 / 4)  # alpha / r, independent knobs
    latents = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    context = torch.randn(1, 77, 80, dtype=torch.bfloat16)
    added = {"text_embeds": torch.randn(1, 48, dtype=torch.bfloat16), "time_ids": torch.ones(1, 6)}
    out = model.unet(latents, 10, encoder_hidden_states=context, added_cond_kwargs=added).sample
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in trainable.values() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in frozen)


def test_state_dict_and_config(tiny_model):
    model = load_base_model(str(tiny_model.diffusers_dir), weight_dtype=torch.float32)
    add_text_encoder_lora(model.text_encoder, rank=2, alpha=3.0, dora=True)
    state = lora_state_dict(model.text_encoder)
    assert "encoder.layers.0.self_attn.q_proj.lora_A.weight" in state
    assert state["encoder.layers.0.self_attn.q_proj.lora_A.weight"].shape == (2, 32)
    assert any("lora_magnitude_vector" in k for k in state)
    assert lora_config(model.text_encoder).use_dora
    with pytest.raises(KeyError, match="no LoRA adapter"):
        lora_config(model.unet)


def test_bad_settings():
    unet = _sdxl_unet_on_meta()
    with pytest.raises(ValueError, match="attn-mlp"):
        add_unet_lora(unet, preset="everything", rank=4, alpha=4)
    with pytest.raises(ValueError, match="rank 0"):
        add_unet_lora(unet, rank=0, alpha=4)
    assert set(TARGET_PRESETS) == {"attn", "attn-mlp", "attn-mlp-conv"}


@pytest.mark.parametrize("init, std", [("kaiming", 1 / math.sqrt(3 * 64)), ("gaussian", 1 / 8)])
def test_lora_init(init, std):
    """lora.init: A ~ kaiming-uniform(a=sqrt(5)) (std 1/sqrt(3 fan_in)) or N(0, 1/r); B = 0 either way."""
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, vocab_size=100))
    add_text_encoder_lora(encoder, rank=8, alpha=8, spec=LoraConfig(rank=8, alpha=8.0, init=init))
    layers = lora_modules(encoder).values()
    a = torch.cat([m.lora_A["default"].weight.flatten() for m in layers])
    assert a.std().item() == pytest.approx(std, rel=0.1)
    assert all(not m.lora_B["default"].weight.any() for m in layers)


def test_adapter_settings_refuse_combinations_that_make_no_sense():
    for settings, message in [
        ({"type": "lokr", "rank": 4, "alpha": 4, "dora": True}, "dora and init apply to type 'lora' only"),
        ({"type": "loha", "rank": 4, "alpha": 4, "init": "gaussian"}, "dora and init apply to type 'lora'"),
        ({"type": "loha", "rank": 4, "alpha": 4, "factor": 8}, "factor and decompose_both apply to type 'lokr'"),
        ({"type": "lokr", "rank": 4, "alpha": 4, "tucker": True}, "tucker applies to type 'loha' only"),
        ({"type": "lokr", "rank": 4, "alpha": 4, "factor": 1}, "factor 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            LoraConfig(**settings)
