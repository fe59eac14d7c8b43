"""LoRA files built directly from tensors for the `lora resize/merge/extract` tests: a tiny-SDXL
UNet (and optionally text encoders) with an adapter whose every tensor is random, exported as
the trainer exports it."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from train.config import LoraConfig
from train.lora.adapters import add_text_encoder_lora, add_unet_lora, lora_modules
from train.lora.export import save_webui_lora, webui_metadata


def randomise_adapters(*models, seed: int = 0, scale: float = 0.1) -> None:
    """Every trainable adapter tensor random (a zero half would make every delta zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in models:
            for param in model.parameters():
                if param.requires_grad:
                    param.copy_(torch.randn(param.shape, generator=generator) * scale)


def adapted_unet(base_unet, spec: LoraConfig, *, preset: str = "attn-mlp-conv", seed: int = 0):
    """A copy of `base_unet` with a random `spec` adapter on `preset`."""
    unet = copy.deepcopy(base_unet)
    add_unet_lora(unet, spec, preset=preset)
    randomise_adapters(unet, seed=seed)
    return unet


def write_lora(path: Path, spec: LoraConfig, *, unet, text_encoder=None, text_encoder_2=None,
               dtype: torch.dtype = torch.float32) -> Path:
    """Export the adapted models as the trainer does (kohya file; LyCORIS for LoKr/LoHa)."""
    metadata = webui_metadata(rank=spec.rank, alpha=spec.alpha, output_name=path.stem, resolution=64,
                              tag_frequency={"a": 1}, comment="test")
    save_webui_lora(path, unet=unet, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                    metadata=metadata, dtype=dtype)
    return path


def adapt_text_encoders(pipe, spec: LoraConfig, seed: int = 1) -> None:
    add_text_encoder_lora(pipe.text_encoder, spec)
    add_text_encoder_lora(pipe.text_encoder_2, spec)
    randomise_adapters(pipe.text_encoder, pipe.text_encoder_2, seed=seed)


def peft_deltas(component: str, model) -> dict[tuple[str, str], torch.Tensor]:
    """(component, module path) -> PEFT's own delta of each adapted layer: the reference."""
    return {(component, path.removeprefix("text_model.")): layer.get_delta_weight("default").detach().float()
            for path, layer in lora_modules(model).items()}
