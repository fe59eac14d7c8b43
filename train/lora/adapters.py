"""LoRA, LoKr and LoHa adapters on the SDXL UNet and text encoders, through PEFT.

Adapters are attached with the models' own `add_adapter` (diffusers' and transformers'
PEFT integration), so the UNet stays a `UNet2DConditionModel` that diffusers pipelines and
`save_lora_weights` understand. The adapter parameters are kept in fp32 while the frozen base
stays bf16: bf16 updates of small LoRA weights round to nothing.

Initialisation (`init`), always with B = 0 so the adapted model equals the base model at step 0
(Hu et al. 2021, sec. 4.1):
- "kaiming": A ~ kaiming-uniform(a=sqrt(5)), PEFT's default (`init_lora_weights=True`) and
  sd-scripts' convention (the initialisation of `nn.Linear` weights);
- "gaussian": A ~ normal with std 1/r, PEFT's `init_lora_weights="gaussian"`, as diffusers' training
  scripts use.

LyCORIS methods (`AdapterSpec.type`, the config's `lora.type`), with PEFT's `LoKrConfig` / `LoHaConfig` and LyCORIS's own tensor
names (Yeh et al. 2024, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model
Evaluation"):
- "lokr": delta W = (alpha / r) * kron(w1, w2), each side of w1 a factor of the layer's (`factor`,
  or near the square root for -1) and w2 the rest. w2 (and w1 with `decompose_both`) is
  factorised (w = w_a @ w_b, rank r) only where r < half its larger side, otherwise a full matrix,
  so a large rank gives LyCORIS' "full matrix" mode. PEFT applies alpha / r even when both halves
  are full; loaders do not, which `train.lora.export` corrects. Initialised LyCORIS' way (w2 = 0).
  Tucker conv (`lokr_t2`) is never used: ComfyUI cannot merge it.
- "loha": delta W = (alpha / r) * (w1_a @ w1_b) * (w2_a @ w2_b) (Hadamard product; Hyeon-Woo
  et al. 2022, FedPara), with w2_b = 0 at first (PEFT's init) so step 0 is the base model;
  `tucker` gives 3x3 convolutions the Tucker form (`hada_t1`/`hada_t2`).

Which UNet modules to adapt (the target presets) is described in docs/lora_formats.md:
`attn` (560 layers on SDXL), `attn-mlp` (722, sd-scripts' default), `attn-mlp-conv` (+ LoCon).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from diffusers.training_utils import cast_training_params
from peft import LoHaConfig, LoKrConfig, LoraConfig
from peft.config import PeftConfig
from peft.tuners.loha import LoHaLayer
from peft.tuners.lokr import LoKrLayer
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
ADAPTER_TYPES = ("lora", "lokr", "loha")
INITS = {"kaiming": True, "gaussian": "gaussian"}  # lora.init -> PEFT's init_lora_weights
AdapterLayer = LoraLayer | LoKrLayer | LoHaLayer


@dataclass(frozen=True)
class AdapterSpec:
    """Which adapter to build and its settings (the `[lora]` table, less the targets).

    `factor`, `decompose_both` are LoKr's (PEFT `decompose_factor`, `decompose_both`); `tucker`
    is LoHa's (PEFT `use_effective_conv2d`); `dora` and `init` are plain LoRA's.
    """

    rank: int
    alpha: float
    type: Literal["lora", "lokr", "loha"] = "lora"
    dora: bool = False
    init: Literal["kaiming", "gaussian"] = "kaiming"
    factor: int = -1
    decompose_both: bool = False
    tucker: bool = False

    def check(self) -> None:
        """Raises ValueError for values or combinations that make no sense."""
        if self.type not in ADAPTER_TYPES:
            raise ValueError(f"adapter type {self.type!r}: choose one of {', '.join(ADAPTER_TYPES)}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank {self.rank}: must be >= 1")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha {self.alpha}: must be > 0")
        if self.init not in INITS:
            raise ValueError(f"LoRA init {self.init!r}: choose one of {', '.join(INITS)}")
        if self.type != "lora" and (self.dora or self.init != "kaiming"):
            raise ValueError(f"dora and init apply to type 'lora' only, not {self.type!r}")
        if self.type != "lokr" and (self.factor != -1 or self.decompose_both):
            raise ValueError(f"factor and decompose_both apply to type 'lokr' only, not {self.type!r}")
        if self.type != "loha" and self.tucker:
            raise ValueError(f"tucker applies to type 'loha' only, not {self.type!r}")
        if self.factor != -1 and self.factor < 2:
            raise ValueError(f"LoKr factor {self.factor}: -1 (automatic) or >= 2")


def _peft_config(targets: list[str], spec: AdapterSpec) -> PeftConfig:
    spec.check()
    if spec.type == "lokr":
        # init_weights="lycoris": w2 = 0, w1 random, LyCORIS' own init (PEFT's default zeroes
        # w1 instead). use_effective_conv2d=False: no Tucker `lokr_t2`, which ComfyUI cannot merge.
        return LoKrConfig(r=spec.rank, alpha=spec.alpha, target_modules=targets, init_weights="lycoris",
                          decompose_factor=spec.factor, decompose_both=spec.decompose_both,
                          use_effective_conv2d=False)
    if spec.type == "loha":
        # PEFT's init: w1 random, w2_a random, w2_b = 0 (LyCORIS: the same), so step 0 is the base.
        return LoHaConfig(r=spec.rank, alpha=spec.alpha, target_modules=targets, init_weights=True,
                          use_effective_conv2d=spec.tucker)
    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=targets,
                      init_lora_weights=INITS[spec.init], use_dora=spec.dora)


def _attach(model: nn.Module, config: PeftConfig) -> PeftConfig:
    model.add_adapter(config)
    # Adapter weights train in fp32 whatever the frozen base's dtype.
    cast_training_params(model, dtype=torch.float32)
    return config


def add_unet_lora(
    unet, *, preset: str = "attn-mlp", rank: int, alpha: float, dora: bool = False,
    spec: AdapterSpec | None = None,
) -> PeftConfig:
    """Attach a trainable adapter to the UNet's `preset` modules: a LoRA (or DoRA) from `rank`,
    `alpha`, `dora`, or whatever `spec` describes (then those three are ignored).

    Returns the PEFT config used (also at `unet.peft_config["default"]`).

    Raises:
        ValueError: unknown preset, or a bad `AdapterSpec` (see `AdapterSpec.check`).
    """
    if preset not in TARGET_PRESETS:
        raise ValueError(f"LoRA preset {preset!r}: choose one of {', '.join(TARGET_PRESETS)}")
    spec = spec or AdapterSpec(rank=rank, alpha=alpha, dora=dora)
    return _attach(unet, _peft_config(TARGET_PRESETS[preset], spec))


def add_text_encoder_lora(
    text_encoder, *, rank: int, alpha: float, dora: bool = False, spec: AdapterSpec | None = None
) -> PeftConfig:
    """Attach a trainable adapter to a CLIP text encoder's attention and MLP projections."""
    spec = spec or AdapterSpec(rank=rank, alpha=alpha, dora=dora)
    return _attach(text_encoder, _peft_config(TEXT_ENCODER_TARGETS, spec))


def adapter_type(config: PeftConfig) -> str:
    """"lora", "lokr" or "loha" for an adapter's PEFT config."""
    return {LoKrConfig: "lokr", LoHaConfig: "loha"}.get(type(config), "lora")


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter's PEFT state: `<module path>.lora_A.weight` / `.lora_B.weight` (and DoRA
    magnitudes), or the LoKr / LoHa tensors (`.lokr_w1`, `.hada_w1_a`, ...)."""
    return get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)


def lora_modules(model: nn.Module) -> dict[str, AdapterLayer]:
    """Module path -> adapter-wrapped layer (LoRA, LoKr or LoHa), for every adapted layer of `model`."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (LoraLayer, LoKrLayer, LoHaLayer))
    }


def lora_config(model: nn.Module) -> PeftConfig:
    """The adapter's PEFT config (raises KeyError naming the model when it has none)."""
    configs = getattr(model, "peft_config", {})
    if ADAPTER_NAME not in configs:
        raise KeyError(f"{type(model).__name__} has no LoRA adapter")
    return configs[ADAPTER_NAME]
