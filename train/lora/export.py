"""Write trained LoRAs in the formats generation tools load (rules: docs/lora-formats.md).

- `save_webui_lora`: the kohya ("WebUI") single file that A1111, Forge, ComfyUI and diffusers all
  load: `lora_unet_` / `lora_te1_` / `lora_te2_` + module path with `.` -> `_`, then
  `.lora_down.weight` (PEFT `lora_A`), `.lora_up.weight` (PEFT `lora_B`) and `.alpha` holding the
  configured alpha (loaders scale by alpha / r), plus the sd-scripts/modelspec header metadata.
  A LoKr or LoHa adapter is written in the LyCORIS single-file format instead (`lycoris_tensors`):
  the same module names, LyCORIS' tensor names, and `ss_network_module = "lycoris.kohya"`.
- `save_diffusers_lora`: diffusers' own `pytorch_lora_weights.safetensors`, with the PEFT
  LoraConfig as adapter metadata so a reload keeps alpha.
- `RunExporter`: what a training run writes at each checkpoint and at its end: both of the above,
  with the run's metadata (tag frequencies, steps, images), the EMA weights as the run's LoRA when
  `train.ema_decay` is on, and no WebUI file for DoRA.

Both write to a temporary path beside the target and rename it into place.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from torch import Tensor

from captioning import outputs
from train.config import LoraConfig as AdapterSettings
from train.lora.adapters import (
    ADAPTER_NAME,
    adapter_type,
    lora_config,
    lora_modules,
    lora_state_dict,
)
from train.lora.trigger import trigger_metadata
from train.model import sgm_keys
from train.names import UNET_BLOCK_COUNTS
from train.tensor_files import save_tensors

logger = logging.getLogger(__name__)

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}

MODELSPEC_PREDICTION = {"epsilon": "epsilon", "v_prediction": "v"}


def trained_prediction_type(metadata: dict[str, str]) -> str | None:
    """The prediction type a LoRA's header says its base model had ("epsilon", "v_prediction"),
    from `modelspec.prediction_type` or sd-scripts' `ss_v_parameterization`; None when it says neither."""
    spec = {value: name for name, value in MODELSPEC_PREDICTION.items()}.get(metadata.get("modelspec.prediction_type", ""))
    if spec is not None:
        return spec
    flag = metadata.get("ss_v_parameterization")
    return None if flag is None else ("v_prediction" if flag == "True" else "epsilon")


def mismatched_prediction(lora: str | Path, predicts: str) -> str | None:
    """The prediction type the LoRA file at `lora` was trained for, when its header names one other
    than `predicts` (the loaded model's); None when they agree or the header does not say."""
    from train.lora.files import read_header

    trained = trained_prediction_type(read_header(lora)[1])
    return trained if trained is not None and trained != predicts else None


def prediction_mismatch(loras: Sequence[str | Path], predicts: str, reason: str = "") -> str | None:
    """The warning for LoRA files whose headers say their base model predicted otherwise than
    `predicts` (the loaded model's, chosen for `reason`); None when none does."""
    mismatched = [(lora, trained) for lora in loras if (trained := mismatched_prediction(lora, predicts)) is not None]
    if not mismatched:
        return None
    (first, trained), others = mismatched[0], len(mismatched) - 1
    return (f"{first}{f' (and {others} more)' if others else ''} was trained on a {trained} model, the model loaded "
            f"predicts {predicts}{f' ({reason})' if reason else ''}: the images will be wrong unless "
            "--prediction-type says what the model is")

REQUIRED_METADATA = (
    "ss_base_model_version",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_output_name",
    "ss_training_comment",
    "ss_tag_frequency",
    "modelspec.sai_model_spec",
    "modelspec.architecture",
    "modelspec.title",
    "modelspec.resolution",
    "modelspec.date",
    "modelspec.prediction_type",
)


def kohya_module_name(
    component: str, module_path: str, sgm_block_map: dict[str, str] | None = None
) -> str:
    """`lora_unet_down_blocks_1_...` for a module path of `component` (unet, text_encoder, text_encoder_2).

    Text encoder names always start `text_model_`, as in the checkpoints, even where recent
    transformers versions have flattened `CLIPTextModel` and dropped that level. With
    `sgm_block_map` (`sgm_keys.unet_module_map`), UNet names use the original SGM blocks
    (`lora_unet_input_blocks_4_1_...`), as sd-scripts writes them.
    """
    if component == "unet" and sgm_block_map is not None:
        module_path = sgm_keys.unet_module_name_to_sgm(module_path, sgm_block_map)
    if component != "unet" and not module_path.startswith("text_model."):
        module_path = "text_model." + module_path
    return KOHYA_PREFIXES[component] + module_path.replace(".", "_")


def kohya_state_dict(
    component: str, model, dtype: torch.dtype = torch.float16, block_names: str = "diffusers"
) -> dict[str, Tensor]:
    """One model's adapter as kohya tensors: lora_down (A), lora_up (B) and alpha per module, or
    for LoKr / LoHa the LyCORIS tensors of `lycoris_tensors`.

    `block_names` "sgm" writes UNet modules under their original SGM names (sd-scripts style).

    Raises:
        ValueError: the adapter uses DoRA (see `save_webui_lora`), or a LyCORIS module has a
        layout loaders reject (see `lycoris_tensors`).
    """
    config = lora_config(model)
    if getattr(config, "use_dora", False):
        raise ValueError(
            "DoRA export to the WebUI (kohya) format is not supported: loaders disagree on the axis "
            "of `dora_scale` and diffusers drops it; save with save_diffusers_lora instead"
        )
    if block_names not in ("diffusers", "sgm"):
        raise ValueError(f"block_names {block_names!r}: choose diffusers or sgm")
    block_map = (
        sgm_keys.unet_module_map(dict(model.config))
        if block_names == "sgm" and component == "unet"
        else None
    )
    lycoris = adapter_type(config) != "lora"
    out: dict[str, Tensor] = {}
    for path, module in lora_modules(model).items():
        name = kohya_module_name(component, path, block_map)
        if lycoris:
            tensors = lycoris_tensors(module, f"{component}:{path}")
            out[f"{name}.alpha"] = _alpha(tensors.pop("alpha"))
            out.update({f"{name}.{key}": t.to("cpu", dtype).contiguous() for key, t in tensors.items()})
            continue
        down = module.lora_A[ADAPTER_NAME].weight.detach()  # (r, in) or (r, in, kh, kw)
        up = module.lora_B[ADAPTER_NAME].weight.detach()  # (out, r) or (out, r, 1, 1)
        alpha = module.lora_alpha[ADAPTER_NAME]
        if alpha != config.lora_alpha:
            # A block alpha (`lora.block_alphas`) is folded into up and the file's alpha is the
            # adapter's one: diffusers' kohya loader keys an attention module's alpha by a name
            # PEFT never matches and would apply the most common alpha to it. Every loader's
            # alpha / r * up @ down is unchanged.
            up, alpha = up.float() * (alpha / config.lora_alpha), config.lora_alpha
        out[f"{name}.lora_down.weight"] = down.to("cpu", dtype).contiguous()
        out[f"{name}.lora_up.weight"] = up.to("cpu", dtype).contiguous()
        out[f"{name}.alpha"] = _alpha(alpha)
    return out


def _alpha(value) -> Tensor:
    # The configured alpha, not r (loaders scale by alpha / r); fp32 so e.g. 0.3 stays 0.3.
    return torch.tensor(float(value), dtype=torch.float32)


_HADA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def lycoris_tensors(module, where: str) -> dict[str, Tensor]:
    """One PEFT LoKr / LoHa layer as LyCORIS tensors (fp32): PEFT's names and shapes are LyCORIS'
    own (`lokr_w1` or `lokr_w1_a/_b`, `lokr_w2` or `lokr_w2_a/_b`; `hada_w1_a/_b`, `hada_w2_a/_b`,
    `hada_t1/_t2`), plus "alpha" (a float).

    LoKr alpha: LyCORIS' and ComfyUI's loaders scale by alpha / r only when one half is
    factorised; when both are full matrices (SDXL's 640-wide layers at rank >= 16) they apply
    scale 1 (lycoris/modules/lokr.py `LokrModule.__init__`, comfy/weight_adapter/lokr.py), while
    PEFT applies alpha / r. So that scale is folded into `lokr_w1` there, and alpha is written as
    r, which means scale 1 to any loader.

    Raises:
        ValueError naming `where`: a Tucker LoKr half (`lokr_t2`, which ComfyUI cannot merge), or
        a LoHa module lacking one of its tensors (ComfyUI would refuse the whole file).
    """
    tensors = {
        attr: getattr(module, attr)[ADAPTER_NAME].detach().float()
        for attr in module.adapter_layer_names
        if ADAPTER_NAME in getattr(module, attr)
    }
    alpha, rank = float(module.alpha[ADAPTER_NAME]), int(module.r[ADAPTER_NAME])
    if "lokr_t2" in tensors:
        raise ValueError(f"{where}: Tucker LoKr (lokr_t2) cannot be merged by ComfyUI; train with "
                         "use_effective_conv2d = False")
    if "lokr_w1" in tensors and "lokr_w2" in tensors:
        tensors["lokr_w1"] = tensors["lokr_w1"] * (alpha / rank)
        alpha = float(rank)
    if any(key.startswith("hada_") for key in tensors):
        missing = [key for key in _HADA if key not in tensors]
        if missing or (("hada_t1" in tensors) != ("hada_t2" in tensors)):
            raise ValueError(f"{where}: LoHa module lacks {', '.join(missing) or 'hada_t1/hada_t2'}")
    tensors["alpha"] = alpha
    return tensors


def lycoris_network_args(*, algo: str, rank: int, alpha: float, conv: bool, factor: int = -1,
                         decompose_both: bool = False, tucker: bool = False) -> dict[str, str]:
    """`ss_network_args` of a LyCORIS file, as LyCORIS' kohya wrapper records its arguments
    (string values): the algorithm, conv rank/alpha when convolutions are adapted, and LoKr's
    factor / decompose_both or LoHa's Tucker switch."""
    args = {"algo": algo}
    if conv:
        args.update(conv_dim=str(rank), conv_alpha=str(float(alpha)))
    if algo == "lokr":
        args.update(factor=str(factor), decompose_both=str(decompose_both), use_tucker="False")
    if algo == "loha":
        args.update(use_tucker=str(tucker))
    return args


def lora_network_args(lora: AdapterSettings) -> dict[str, str]:
    """A plain LoRA's block and dropout settings as sd-scripts' `network_args` strings
    (networks/lora.py): `block_dims` / `block_alphas` with their 23 SDXL entries (the unadapted
    embeddings and output at the base rank and alpha), `down/mid/up_lr_weight`, `rank_dropout`,
    `module_dropout`. Empty when none is set."""
    args: dict[str, str] = {}
    for key, values, base in (("block_dims", lora.block_dims, lora.rank),
                              ("block_alphas", lora.block_alphas, lora.alpha)):
        if values is not None:
            entries = [base, *[v for part in ("down", "mid", "up")
                               for v in values.per_block(part) or [base] * UNET_BLOCK_COUNTS[part]], base]
            args[key] = ",".join(f"{v:g}" for v in entries)
    for part in ("down", "mid", "up"):
        weights = lora.block_lr.per_block(part) if lora.block_lr is not None else None
        if weights is not None:
            args[f"{part}_lr_weight"] = ",".join(f"{w:g}" for w in weights)
    for key in ("rank_dropout", "module_dropout"):
        if getattr(lora, key):
            args[key] = str(getattr(lora, key))
    return args


def webui_metadata(
    *,
    rank: int,
    alpha: float,
    output_name: str,
    resolution: int | tuple[int, int],
    tag_frequency: dict,
    comment: str,
    base_model: str = "cagliostrolab/animagine-xl-4.0-zero",
    prediction_type: str = "epsilon",
    conv: bool = False,
    title: str | None = None,
    date: datetime | None = None,
    extra: dict[str, object] | None = None,
    network_args: dict[str, str] | None = None,
    lora_args: dict[str, str] | None = None,
) -> dict[str, str]:
    """safetensors header metadata for a kohya-format SDXL LoRA (all values strings).

    `ss_base_model_version` starts with `sdxl_`, which is what makes A1111 list the file under
    SDXL. `tag_frequency` is `{dataset name: {tag: count}}` (sd-scripts' layout) or a flat
    `{tag: count}`, which is filed under `output_name`. `extra` adds more `ss_*` / `modelspec.*`
    keys (e.g. `ss_num_train_images`, `ss_steps`); values are converted with `str`.
    `network_args` (from `lycoris_network_args`) marks a LyCORIS file: `ss_network_module` becomes
    "lycoris.kohya" and `ss_network_args` that JSON. `lora_args` (from `lora_network_args`) adds a
    plain LoRA's block and dropout settings to `ss_network_args`, as sd-scripts records them.
    """
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    if tag_frequency and all(isinstance(v, int) for v in tag_frequency.values()):
        tag_frequency = {output_name: tag_frequency}
    stamp = (date or datetime.now(timezone.utc)).replace(microsecond=0)
    metadata = {
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_output_name": output_name,
        "ss_training_comment": comment,
        "ss_sd_model_name": base_model,
        "ss_resolution": f"({width}, {height})",
        "ss_v2": "False",
        "ss_tag_frequency": json.dumps(tag_frequency, ensure_ascii=False),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title or output_name,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": stamp.isoformat(),
        # The SAI model spec's values are "epsilon" and "v" (sd-scripts' sai_model_spec.py).
        "modelspec.prediction_type": MODELSPEC_PREDICTION.get(prediction_type, prediction_type),
        "modelspec.description": comment,
    }
    if conv or lora_args:
        # sd-scripts records LoCon ranks here; its conv LoRA uses the same rank and alpha as ours.
        conv_args = {"conv_dim": str(rank), "conv_alpha": str(float(alpha))} if conv else {}
        metadata["ss_network_args"] = json.dumps({**conv_args, **(lora_args or {})})
    if network_args is not None:
        metadata["ss_network_module"] = "lycoris.kohya"
        metadata["ss_network_args"] = json.dumps(network_args)
    for key, value in (extra or {}).items():
        if not key.startswith(("ss_", "modelspec.")):
            raise ValueError(
                f"metadata key {key!r}: extra keys must start with 'ss_' or 'modelspec.'"
            )
        metadata[key] = (
            value
            if isinstance(value, str)
            else json.dumps(value)
            if isinstance(value, dict)
            else str(value)
        )
    return metadata


def check_metadata(metadata: dict[str, str]) -> None:
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ValueError(f"LoRA metadata lacks {', '.join(missing)} (build it with webui_metadata)")
    not_str = [key for key, value in metadata.items() if not isinstance(value, str)]
    if not_str:
        raise ValueError(f"LoRA metadata values must be strings: {', '.join(not_str)}")
    if not metadata["ss_base_model_version"].startswith("sdxl_"):
        raise ValueError(
            "ss_base_model_version must start with 'sdxl_' or A1111 hides the LoRA for SDXL models"
        )


def save_webui_lora(
    path,
    *,
    unet,
    text_encoder=None,
    text_encoder_2=None,
    metadata: dict[str, str],
    dtype: torch.dtype = torch.float16,
    block_names: str = "diffusers",
) -> None:
    """Write the kohya/WebUI LoRA file (the primary deliverable) atomically.

    Args:
        path: target `.safetensors` file.
        unet, text_encoder, text_encoder_2: models carrying a LoRA adapter (text encoders optional).
        metadata: header metadata, normally from `webui_metadata`.
        dtype: tensor dtype in the file (fp16 is what most tools expect; fp32 for exact copies).
        block_names: "diffusers" (default; every loader maps them) or "sgm" (sd-scripts' names).

    Raises:
        ValueError: missing/invalid metadata, or a DoRA adapter.
    """
    check_metadata(metadata)
    tensors = kohya_state_dict("unet", unet, dtype, block_names)
    for component, model in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if model is not None:
            tensors.update(kohya_state_dict(component, model, dtype, block_names))
    save_tensors(path, tensors, metadata)


def peft_metadata(model) -> dict:
    """The adapter's LoraConfig as a JSON-able dict (what diffusers stores as adapter metadata)."""
    config = lora_config(model).to_dict()
    if config.pop("exclude_modules", None):
        # Block ranks left modules out: name the adapted ones instead, so that a loader's PEFT
        # finds exactly the modules the weights hold (it warns about targets or exclusions it
        # does not find in them).
        config["target_modules"] = sorted(lora_modules(model))
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def save_diffusers_lora(out_dir, *, unet, text_encoder=None, text_encoder_2=None) -> Path:
    """Write `out_dir/pytorch_lora_weights.safetensors` with each adapter's config as metadata;
    returns its path. A weights file already there (an earlier export) is replaced atomically.

    DoRA adapters are written too (PEFT's `lora_magnitude_vector`); diffusers restores them from
    the metadata's `use_dora`.
    """
    layers: dict[str, object] = {
        "unet_lora_layers": lora_state_dict(unet),
        "unet_lora_adapter_metadata": peft_metadata(unet),
    }
    for name, model in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if model is not None:
            layers[f"{name}_lora_layers"] = lora_state_dict(model)
            layers[f"{name}_lora_adapter_metadata"] = peft_metadata(model)
    return write_diffusers_file(Path(out_dir), layers)


def write_diffusers_file(out_dir: Path, layers: dict[str, object]) -> Path:
    """`StableDiffusionXLPipeline.save_lora_weights(out_dir, **layers)`, written to a temporary file
    beside `out_dir/pytorch_lora_weights.safetensors` and renamed over it (the umask's mode); other
    files in `out_dir` are left alone.

    Raises:
        OutputError: `out_dir` is a file or device, or the write failed (disk full).
    """
    outputs.claim_dir(out_dir)
    target = out_dir / DIFFUSERS_WEIGHT_NAME
    with outputs.atomic_path(target) as temp:
        StableDiffusionXLPipeline.save_lora_weights(str(out_dir), weight_name=temp.name, **layers)
    return target


def tag_frequency(rows: Sequence[dict]) -> dict[str, dict[str, int]]:
    """{source: {tag: count}} over the training captions: sd-scripts' `ss_tag_frequency` layout,
    which the WebUIs show as the LoRA's trigger words."""
    counts: dict[str, Counter] = {}
    for row in rows:
        tags = [*row["caption_head"], *row["caption_body"], *row["caption_tail"]]
        counts.setdefault(row["source"] or "dataset", Counter()).update(tags)
    return {source: dict(counter) for source, counter in counts.items()}


class RunExporter:
    """`exporter(folder, step)`: a training run's LoRA files, written into `folder`.

    `NAME.safetensors` (kohya format; LyCORIS for LoKr / LoHa) and `diffusers/`. With an EMA
    (`ema`, an object with `decay` and an `applied()` context that swaps the averaged weights in),
    the averaged weights are the run's LoRA and the raw ones go beside them (`NAME-raw.safetensors`,
    `diffusers-raw/`). A DoRA run writes the diffusers folder only: the WebUI loaders disagree on
    DoRA's magnitude axis and diffusers drops it on load.

    Args:
        modules: returns {"unet": ..., "text_encoder": ..., "text_encoder_2": ...}, the unwrapped
            modules carrying the adapters (text encoders only when trained).
        lora: the `[lora]` table.
        rows: the training rows (tag frequencies, image count).
        trigger_features: {trigger tag: [tags prep folded into it]} (the prep output's manifest),
            written as `ss_folded_tags` / `modelspec.trigger_phrase` (train.lora.trigger).
        weights: a context in which the weights to export are in place (schedule-free AdamW's average).
        training: more `ss_*` / `modelspec.*` keys recording how it was trained (the loss, the
            noise, the prediction type and why: `train.loss.training_metadata`).
    """

    def __init__(self, modules: Callable[[], dict], lora: AdapterSettings, *, name: str, rows: Sequence[dict],
                 base_model: str, prediction_type: str, resolution: tuple[int, int], num_reg_images: int = 0,
                 ema=None, weights: Callable[[], AbstractContextManager] = nullcontext,
                 trigger_features: dict[str, list[str]] | None = None,
                 training: dict[str, object] | None = None) -> None:
        self.modules, self.lora, self.name, self.ema, self.weights = modules, lora, name, ema, weights
        self.metadata = {
            "rank": lora.rank, "alpha": lora.alpha, "output_name": name, "resolution": resolution,
            "tag_frequency": tag_frequency(rows), "comment": f"animagine-lora, preset {lora.preset}",
            "base_model": base_model, "prediction_type": prediction_type, "conv": lora.preset == "attn-mlp-conv",
            "network_args": None if lora.type == "lora" else lycoris_network_args(
                algo=lora.type, rank=lora.rank, alpha=lora.alpha, conv=lora.preset == "attn-mlp-conv",
                factor=lora.factor, decompose_both=lora.decompose_both, tucker=lora.tucker),
            "lora_args": lora_network_args(lora) if lora.type == "lora" else None}
        self.counts = {"ss_num_train_images": len(rows), "ss_num_reg_images": num_reg_images,
                       **({"ss_network_dropout": lora.dropout} if lora.dropout else {}),
                       **trigger_metadata(trigger_features or {})}
        self.counts.update(training or {})
        if lora.dora:
            logger.warning("lora.dora = true: only the diffusers-format LoRA is exported (no WebUI/ComfyUI file)")

    def __call__(self, folder: str | Path, step: int) -> None:
        with self.weights():
            if self.ema is None:
                self._write(Path(folder), step, "")
                return
            self._write(Path(folder), step, "-raw")
            with self.ema.applied():
                self._write(Path(folder), step, "")

    def _write(self, folder: Path, step: int, suffix: str) -> None:
        modules = self.modules()
        ema = {"ss_ema_decay": self.ema.decay} if self.ema is not None and not suffix else {}
        metadata = webui_metadata(**self.metadata, extra={"ss_steps": step, **self.counts, **ema})
        if not self.lora.dora:
            save_webui_lora(folder / f"{self.name}{suffix}.safetensors", metadata=metadata, **modules)
        save_diffusers_lora(folder / f"diffusers{suffix}", **modules)
