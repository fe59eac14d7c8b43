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

LyCORIS methods (the config's `lora.type`), with PEFT's `LoKrConfig` / `LoHaConfig` and LyCORIS's own tensor
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

Which UNet modules to adapt (the target presets) is described in docs/lora-formats.md:
`attn` (560 layers on SDXL), `attn-mlp` (722, sd-scripts' default), `attn-mlp-conv` (+ LoCon).
Plain LoRA can set rank and alpha per UNet block (`train.lora.blocks`, PEFT's `rank_pattern` /
`alpha_pattern` / `exclude_modules`) and sd-scripts' dropouts (`train.lora.dropout`).
"""

from __future__ import annotations

import torch
from diffusers.training_utils import cast_training_params
from peft import LoHaConfig, LoKrConfig, LoraConfig
from peft.config import PeftConfig
from peft.tuners.loha import LoHaLayer
from peft.tuners.lokr import LoKrLayer
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from pydantic import ValidationError
from torch import Tensor, nn

from train.config import LoraConfig as AdapterSettings
from train.lora.blocks import unet_block_layout

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
INITS = {"kaiming": True, "gaussian": "gaussian"}  # lora.init -> PEFT's init_lora_weights
AdapterLayer = LoraLayer | LoKrLayer | LoHaLayer


def _peft_config(targets: list[str], spec: AdapterSettings, layout: dict | None = None) -> PeftConfig:
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
                      init_lora_weights=INITS[spec.init], use_dora=spec.dora, **(layout or {}))


def _attach(model: nn.Module, config: PeftConfig, spec: AdapterSettings) -> PeftConfig:
    from train.lora.dropout import add_lora_dropouts

    model.add_adapter(config)
    # Adapter weights train in fp32 whatever the frozen base's dtype.
    cast_training_params(model, dtype=torch.float32)
    add_lora_dropouts(model, dropout=spec.dropout, rank_dropout=spec.rank_dropout, module_dropout=spec.module_dropout)
    return config


def targeted_modules(model: nn.Module, targets: list[str]) -> list[str]:
    """Paths of the modules of `model` that target names select (PEFT's rule: the whole path or a
    dotted suffix of it)."""
    return [name for name, _ in model.named_modules()
            if any(name == target or name.endswith("." + target) for target in targets)]


def _block_layout(unet, targets: list[str], spec: AdapterSettings) -> dict:
    """PEFT LoraConfig keywords for `spec`'s block-wise ranks and alphas (empty without them)."""
    layout = unet_block_layout(targeted_modules(unet, targets), dict(unet.config), spec)
    keywords = {"rank_pattern": layout.rank_pattern, "alpha_pattern": layout.alpha_pattern}
    if layout.excluded:
        keywords["exclude_modules"] = layout.excluded
    return {key: value for key, value in keywords.items() if value}


def _settings(spec: AdapterSettings | None, overrides: dict) -> AdapterSettings:
    """`spec` (default: the `[lora]` table's defaults) with `overrides` of its keys, validated."""
    if not overrides:
        return spec or AdapterSettings()
    try:
        return AdapterSettings(**{**(spec.model_dump() if spec else {}), **overrides})
    except ValidationError as err:  # one line per setting: "LoRA rank 0: Input should be ..."
        raise ValueError("; ".join(
            "LoRA " + (f"{'.'.join(map(str, e['loc']))} {e['input']!r}: " if e["loc"] else "")
            + e["msg"].removeprefix("Value error, ") for e in err.errors())) from None


def add_unet_lora(unet, spec: AdapterSettings | None = None, **overrides) -> PeftConfig:
    """Attach a trainable adapter to the UNet's `preset` modules, as `spec` (the `[lora]` table)
    describes, with `overrides` of its keys (`preset`, `rank`, `alpha`, `dora`, `type`, ...).

    Returns the PEFT config used (also at `unet.peft_config["default"]`).

    Raises:
        ValueError: unknown preset or settings that do not fit together (`train.config.LoraConfig`).
    """
    spec = _settings(spec, overrides)
    targets = TARGET_PRESETS[spec.preset]
    return _attach(unet, _peft_config(targets, spec, _block_layout(unet, targets, spec)), spec)


def add_text_encoder_lora(text_encoder, spec: AdapterSettings | None = None, **overrides) -> PeftConfig:
    """Attach a trainable adapter to a CLIP text encoder's attention and MLP projections (`spec`
    and `overrides` as for `add_unet_lora`; the preset and block-wise settings do not apply)."""
    spec = _settings(spec, overrides)
    return _attach(text_encoder, _peft_config(TEXT_ENCODER_TARGETS, spec), spec)


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
