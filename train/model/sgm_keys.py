"""Key mapping from diffusers' SDXL layout to the original SGM single-file layout.

An SGM checkpoint (what A1111, ComfyUI and Forge load, and what sd-scripts writes) holds the
whole pipeline in one state dict under four prefixes:

    model.diffusion_model.*               UNet, original `input_blocks / middle_block / output_blocks` names
    first_stage_model.*                   VAE, original `encoder.down.{i}.block.{j}` names
    conditioner.embedders.0.transformer.* CLIP ViT-L in the Hugging Face layout (`text_model.*`)
    conditioner.embedders.1.model.*       OpenCLIP ViT-bigG (`transformer.resblocks.*`, fused `in_proj`)

diffusers converts SGM -> diffusers when loading (`from_single_file`); this module is the inverse,
used to write single-file checkpoints (the tiny test model) and to name LoRA modules the way
sd-scripts does. The layout follows the Stability `generative-models` UNet (`openaimodel.py`) and
diffusers' `scripts/convert_diffusers_to_original_sdxl.py`; the code is our own.
"""

from __future__ import annotations

import torch
from torch import Tensor

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."
# The four models' key prefixes, by diffusers component name.
PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": TE1_PREFIX, "text_encoder_2": TE2_PREFIX}

# Inside a ResNet block: diffusers name -> SGM name (`ResBlock` in openaimodel.py).
_UNET_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

_UNET_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def unet_module_map(config: dict) -> dict[str, str]:
    """Diffusers module path -> SGM module path for every block of an SDXL-type UNet.

    Block-level paths only (`down_blocks.1.attentions.0` -> `input_blocks.4.1`); ResNet internals
    are renamed separately by `unet_module_name_to_sgm`. `config` is the UNet's config dict.
    """
    levels = len(config["block_out_channels"])
    per_level = config["layers_per_block"]
    down_attn = ["CrossAttn" in t for t in config["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    mapping = dict(_UNET_TOP_LEVEL)
    for level in range(levels):
        for j in range(per_level):
            index = 1 + level * (per_level + 1) + j
            mapping[f"down_blocks.{level}.resnets.{j}"] = f"input_blocks.{index}.0"
            if down_attn[level]:
                mapping[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{index}.1"
        if level < levels - 1:
            index = (level + 1) * (per_level + 1)
            mapping[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
    for level in range(levels):
        for j in range(per_level + 1):
            index = level * (per_level + 1) + j
            mapping[f"up_blocks.{level}.resnets.{j}"] = f"output_blocks.{index}.0"
            if up_attn[level]:
                mapping[f"up_blocks.{level}.attentions.{j}"] = f"output_blocks.{index}.1"
        if level < levels - 1:
            index = level * (per_level + 1) + per_level
            slot = 2 if up_attn[level] else 1
            mapping[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{index}.{slot}.conv"
    mapping["mid_block.resnets.0"] = "middle_block.0"
    mapping["mid_block.attentions.0"] = "middle_block.1"
    mapping["mid_block.resnets.1"] = "middle_block.2"
    return mapping


def unet_module_name_to_sgm(name: str, block_map: dict[str, str]) -> str:
    """SGM path of a diffusers UNet module or parameter path (`name` without a leading prefix).

    Raises:
        KeyError: `name` is not inside any known block.
    """
    for prefix in sorted(block_map, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "."):
            rest = name[len(prefix) + 1 :]
            if ".resnets." in prefix and rest:
                head, _, tail = rest.partition(".")
                rest = ".".join(filter(None, [_UNET_RESNET_PARTS.get(head, head), tail]))
            return ".".join(filter(None, [block_map[prefix], rest]))
    raise KeyError(f"UNet key {name!r} is not inside any SDXL block")


def unet_to_sgm(state_dict: dict[str, Tensor], config: dict) -> dict[str, Tensor]:
    """Diffusers UNet state dict -> `model.diffusion_model.*` keys."""
    block_map = unet_module_map(config)
    return {UNET_PREFIX + unet_module_name_to_sgm(k, block_map): v for k, v in state_dict.items()}


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


def vae_to_sgm(state_dict: dict[str, Tensor], config: dict) -> dict[str, Tensor]:
    """Diffusers AutoencoderKL state dict -> `first_stage_model.*` keys (LDM `Encoder/Decoder`).

    The decoder's up blocks are numbered in reverse in LDM (`up.0` is the last, full-resolution
    block), and the mid-block attention uses 1x1 convolutions rather than linear layers.
    """
    levels = len(config["block_out_channels"])
    attention_names = {
        "group_norm": "norm",
        "to_q": "q",
        "to_k": "k",
        "to_v": "v",
        "to_out.0": "proj_out",
    }
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        coder = parts[0]
        if parts[1] in ("down_blocks", "up_blocks"):
            level = int(parts[2])
            sgm_level = level if parts[1] == "down_blocks" else levels - 1 - level
            group = "down" if parts[1] == "down_blocks" else "up"
            if parts[3] == "resnets":
                new = f"{coder}.{group}.{sgm_level}.block.{parts[4]}." + _vae_resnet(
                    ".".join(parts[5:])
                )
            else:  # downsamplers.0.conv / upsamplers.0.conv
                sample = "downsample" if group == "down" else "upsample"
                new = f"{coder}.{group}.{sgm_level}.{sample}." + ".".join(parts[5:])
        elif parts[1] == "mid_block":
            if parts[2] == "resnets":
                new = f"{coder}.mid.block_{int(parts[3]) + 1}." + _vae_resnet(".".join(parts[4:]))
            else:
                inner = ".".join(parts[4:-1])
                new = f"{coder}.mid.attn_1.{attention_names[inner]}.{parts[-1]}"
                if inner != "group_norm" and parts[-1] == "weight":
                    value = value[:, :, None, None]  # (C, C) linear -> (C, C, 1, 1) conv
        elif parts[1] == "conv_norm_out":
            new = f"{coder}.norm_out.{parts[-1]}"
        else:
            new = key
        out[VAE_PREFIX + new] = value
    return out


def clip_l_to_sgm(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """CLIPTextModel state dict -> `conditioner.embedders.0.transformer.text_model.*`.

    Recent transformers flatten `CLIPTextModel` (no `text_model.` level); checkpoints keep it.
    """
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("text_model.")
        if key.endswith("position_ids"):
            continue
        out[TE1_PREFIX + "text_model." + key] = value
    return out


def open_clip_to_sgm(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """CLIPTextModelWithProjection state dict -> OpenCLIP `conditioner.embedders.1.model.*`.

    OpenCLIP fuses q/k/v into `attn.in_proj_weight` (3C, C) and applies the projection as
    `x @ text_projection`, so the HF Linear weight (out, in) is stored transposed (in, out).
    """
    sd = {
        k.removeprefix("text_model."): v
        for k, v in state_dict.items()
        if not k.endswith("position_ids")
    }
    out = {
        TE2_PREFIX + "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        TE2_PREFIX + "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        TE2_PREFIX + "ln_final.weight": sd.pop("final_layer_norm.weight"),
        TE2_PREFIX + "ln_final.bias": sd.pop("final_layer_norm.bias"),
        TE2_PREFIX + "text_projection": sd.pop("text_projection.weight").T.contiguous(),
    }
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    for i in layers:
        src = f"encoder.layers.{i}."
        dst = f"{TE2_PREFIX}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [sd.pop(src + f"self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            )
            out[dst + f"attn.out_proj.{kind}"] = sd.pop(src + f"self_attn.out_proj.{kind}")
            out[dst + f"ln_1.{kind}"] = sd.pop(src + f"layer_norm1.{kind}")
            out[dst + f"ln_2.{kind}"] = sd.pop(src + f"layer_norm2.{kind}")
            out[dst + f"mlp.c_fc.{kind}"] = sd.pop(src + f"mlp.fc1.{kind}")
            out[dst + f"mlp.c_proj.{kind}"] = sd.pop(src + f"mlp.fc2.{kind}")
    if sd:
        raise KeyError(f"text_encoder_2 keys with no OpenCLIP name: {sorted(sd)[:5]}")
    return out


def sgm_to_unet_name(name: str, block_map: dict[str, str]) -> str | None:
    """Diffusers UNet path of an SGM UNet path (without `model.diffusion_model.`); None outside
    every block. The inverse of `unet_module_name_to_sgm`."""
    inverse = {sgm: diffusers for diffusers, sgm in block_map.items()}
    resnet_parts = {sgm: diffusers for diffusers, sgm in _UNET_RESNET_PARTS.items()}
    for prefix in sorted(inverse, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "."):
            rest = name[len(prefix) + 1 :]
            if ".resnets." in inverse[prefix] and rest:
                for sgm_part in sorted(resnet_parts, key=len, reverse=True):
                    if rest == sgm_part or rest.startswith(sgm_part + "."):
                        rest = resnet_parts[sgm_part] + rest[len(sgm_part) :]
                        break
            return ".".join(filter(None, [inverse[prefix], rest]))
    return None


# OpenCLIP names inside `transformer.resblocks.{i}.` <-> CLIPTextModel names inside `encoder.layers.{i}.`.
_OPEN_CLIP_LAYER_PARTS = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                          "ln_1": "layer_norm1", "ln_2": "layer_norm2"}
QKV = ("q_proj", "k_proj", "v_proj")  # the order of OpenCLIP's fused in_proj rows


def open_clip_parameter(name: str) -> tuple[str, int | None] | None:
    """SGM key (under `conditioner.embedders.1.model.`) and the third of a fused q/k/v tensor
    (0, 1, 2; None when not fused) of a CLIPTextModelWithProjection layer parameter
    (`encoder.layers.{i}.self_attn.q_proj.weight`, ...); None for parameters outside the layers."""
    parts = name.removeprefix("text_model.").split(".")
    if parts[:2] != ["encoder", "layers"] or len(parts) < 5:
        return None
    layer, inner, kind = parts[2], ".".join(parts[3:-1]), parts[-1]
    base = f"{TE2_PREFIX}transformer.resblocks.{layer}."
    if inner.startswith("self_attn.") and inner.removeprefix("self_attn.") in QKV:
        return f"{base}attn.in_proj_{kind}", QKV.index(inner.removeprefix("self_attn."))
    sgm = {diffusers: sgm for sgm, diffusers in _OPEN_CLIP_LAYER_PARTS.items()}.get(inner)
    return (f"{base}{sgm}.{kind}", None) if sgm else None


def open_clip_modules(inner: str) -> list[str]:
    """CLIPTextModel module paths stored under an OpenCLIP weight name without its `.weight`
    (`transformer.resblocks.3.attn.in_proj` -> the q, k and v projections of layer 3)."""
    parts = inner.split(".")
    if parts[:2] != ["transformer", "resblocks"] or len(parts) < 4:
        return []
    layer, rest = parts[2], ".".join(parts[3:])
    if rest == "attn.in_proj":
        return [f"encoder.layers.{layer}.self_attn.{qkv}" for qkv in QKV]
    return [f"encoder.layers.{layer}.{_OPEN_CLIP_LAYER_PARTS[rest]}"] if rest in _OPEN_CLIP_LAYER_PARTS else []
