"""LoRA adapters on the SDXL UNet and text encoders, through PEFT.

Adapters are attached with the models' own `add_adapter` (diffusers' and transformers'
PEFT integration), so the UNet stays a `UNet2DConditionModel` that diffusers pipelines and
`save_lora_weights` understand. Standard LoRA init (Hu et al. 2021, sec. 4.1): A Gaussian, B zero,
so the adapted model equals the base model at step 0. The adapter parameters are kept in fp32
while the frozen base stays bf16: bf16 updates of small LoRA weights round to nothing.

Which UNet modules to adapt (the target presets) is described in docs/lora_formats.md:
`attn` (560 layers on SDXL), `attn-mlp` (722, sd-scripts' default), `attn-mlp-conv` (+ LoCon).
"""

from __future__ import annotations

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from torch import Tensor, nn

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
TRANSFORMER_MLP = ["ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
# LoCon: the 3x3 convolutions of the ResNet blocks and of the down/upsamplers (sd-scripts' conv_dim).
RESNET_CONV = ["conv1", "conv2", "downsamplers.0.conv", "upsamplers.0.conv"]

TARGET_PRESETS: dict[str, list[str]] = {
    "attn": ATTENTION,
    "attn-mlp": ATTENTION + TRANSFORMER_MLP,
    "attn-mlp-conv": ATTENTION + TRANSFORMER_MLP + RESNET_CONV,
}
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]

ADAPTER_NAME = "default"


def _lora_config(targets: list[str], rank: int, alpha: float, dora: bool) -> LoraConfig:
    if rank < 1:
        raise ValueError(f"LoRA rank {rank}: must be >= 1")
    if alpha <= 0:
        raise ValueError(f"LoRA alpha {alpha}: must be > 0")
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=targets,
        init_lora_weights=True,  # A ~ kaiming-uniform, B = 0: step 0 equals the base model
        use_dora=dora,
    )


def _attach(model: nn.Module, config: LoraConfig) -> LoraConfig:
    model.add_adapter(config)
    # Adapter weights train in fp32 whatever the frozen base's dtype.
    cast_training_params(model, dtype=torch.float32)
    return config


def add_unet_lora(
    unet, *, preset: str = "attn-mlp", rank: int, alpha: float, dora: bool = False
) -> LoraConfig:
    """Attach a trainable LoRA (or DoRA) adapter to the UNet's `preset` modules.

    Returns the PEFT LoraConfig used (also at `unet.peft_config["default"]`).

    Raises:
        ValueError: unknown preset, rank < 1 or alpha <= 0.
    """
    if preset not in TARGET_PRESETS:
        raise ValueError(f"LoRA preset {preset!r}: choose one of {', '.join(TARGET_PRESETS)}")
    return _attach(unet, _lora_config(TARGET_PRESETS[preset], rank, alpha, dora))


def add_text_encoder_lora(
    text_encoder, *, rank: int, alpha: float, dora: bool = False
) -> LoraConfig:
    """Attach a trainable LoRA adapter to a CLIP text encoder's attention and MLP projections."""
    return _attach(text_encoder, _lora_config(TEXT_ENCODER_TARGETS, rank, alpha, dora))


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter's PEFT state: `<module path>.lora_A.weight` / `.lora_B.weight` (and DoRA magnitudes)."""
    return get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)


def lora_modules(model: nn.Module) -> dict[str, LoraLayer]:
    """Module path -> LoRA-wrapped layer, for every adapted layer of `model`."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def lora_config(model: nn.Module) -> LoraConfig:
    """The adapter's LoraConfig (raises KeyError naming the model when it has none)."""
    configs = getattr(model, "peft_config", {})
    if ADAPTER_NAME not in configs:
        raise KeyError(f"{type(model).__name__} has no LoRA adapter")
    return configs[ADAPTER_NAME]
