"""`convert` for LyCORIS files (LoKr / LoHa in the kohya single-file format, as `train.lora.export`
and sd-scripts / LyCORIS write them).

- LoKr -> diffusers: module names mapped back to the SDXL modules (diffusers or SGM block names),
  and alpha / r baked into `lokr_w1` (or `lokr_w1_a`) where one half is factorised, as LyCORIS'
  and ComfyUI's loaders apply it (full-matrix modules get scale 1, so they are left alone). The
  file is written without adapter metadata: diffusers' `load_lora_adapter` then infers the
  LoKrConfig from the tensor shapes with alpha = r (diffusers.utils.peft_utils `_create_lokr_config`).
- LoHa -> diffusers is refused: diffusers (0.42) builds a LoraConfig for any non-LoKr adapter and
  cannot load it. A LyCORIS file is already the WebUI format, so "-> webui" is refused too.
- `lokr_adapters` / `loha_adapters`: a file's PEFT configs and state dicts per component, which
  `sample` and `eval` attach to their models as the training hook does (`train.generate.sampling`).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from train.lora.export import kohya_module_name, write_diffusers_file
from train.model import sgm_keys
from train.names import SDXL_CONFIG_DIR

LYCORIS_MARKERS = (".lokr_", ".hada_")


def is_lycoris(keys: list[str]) -> bool:
    return any(marker in key for key in keys for marker in LYCORIS_MARKERS)


def sdxl_module_names() -> dict[str, tuple[str, str, nn.Module]]:
    """kohya module name (diffusers or SGM blocks) -> (component, module path, module) for every
    Linear and Conv2d of the SDXL UNet and text encoders (built on the meta device: shapes only)."""
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL_CONFIG_DIR / "unet"))
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(SDXL_CONFIG_DIR / "text_encoder"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(SDXL_CONFIG_DIR / "text_encoder_2"))
    sgm_map = sgm_keys.unet_module_map(dict(unet.config))
    names = {}
    for component, model in (("unet", unet), ("text_encoder", te1), ("text_encoder_2", te2)):
        for path, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                names[kohya_module_name(component, path)] = (component, path, module)
                if component == "unet":
                    names[kohya_module_name(component, path, sgm_map)] = (component, path, module)
    return names


def lycoris_alpha(alpha: Tensor | None, default: float) -> float:
    """A LyCORIS module's alpha: its `.alpha` tensor, or `default` (its rank) when that is missing,
    0 or not finite, as LyCORIS' own loaders read it."""
    value = float(alpha) if alpha is not None else 0.0
    return value if value and math.isfinite(value) else float(default)


def _baked(tensors: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """One LoKr module's tensors with the loaders' alpha / r folded into the w1 half."""
    rank_from = tensors.get("lokr_w1_a", tensors.get("lokr_w2_a"))
    if rank_from is None:  # both halves full: loaders apply scale 1
        return tensors
    w1 = "lokr_w1" if "lokr_w1" in tensors else "lokr_w1_a"
    return {**tensors, w1: tensors[w1] * (alpha / rank_from.shape[1])}


def _modules(source: Path, tensors: dict[str, Tensor]) -> dict[str, tuple[str, str, nn.Module, dict[str, Tensor]]]:
    """kohya module name -> (component, module path, SDXL module, its tensors by suffix).

    Raises:
        ValueError naming `source` and the first module name that is not SDXL's.
    """
    modules: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, suffix = key.partition(".")
        modules.setdefault(name, {})[suffix] = tensor
    sdxl = sdxl_module_names()
    unknown = sorted(name for name in modules if name not in sdxl)
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} modules are not SDXL modules (first: {unknown[0]!r})")
    return {name: (*sdxl[name], parts) for name, parts in modules.items()}


def lokr_adapters(source: Path, tensors: dict[str, Tensor], *,
                  dtype: torch.dtype | None = None) -> dict[str, tuple[dict, dict[str, Tensor]]]:
    """component -> (LoKrConfig as a JSON-able dict, PEFT state dict `{path}.lokr_*`) of a LoKr file's
    tensors, alpha baked in so that PEFT's alpha / r (= 1) gives what LyCORIS' loaders give.

    Raises:
        ValueError naming `source`: a Tucker LoKr, module names that are not SDXL's, or
        factorisations no LoKrConfig reproduces.
    """
    if any(key.endswith(".lokr_t2") for key in tensors):
        raise ValueError(f"{source}: Tucker LoKr (lokr_t2) cannot be converted")
    states: dict[str, dict[str, Tensor]] = {}
    shapes: dict[str, dict[str, tuple]] = {}
    for component, path, base, parts in _modules(source, tensors).values():
        parts = dict(parts)
        shapes.setdefault(component, {})[path] = _factor_shapes(parts, base)
        alpha = parts.pop("alpha", None)
        weights = {k: v.float() for k, v in parts.items()}
        rank_from = weights.get("lokr_w1_a", weights.get("lokr_w2_a"))
        default_alpha = float(rank_from.shape[1]) if rank_from is not None else 1.0
        baked = _baked(weights, lycoris_alpha(alpha, default_alpha))
        states.setdefault(component, {}).update(
            {f"{path}.{k}": (v.to(dtype) if dtype else v.to(parts[k].dtype)).contiguous() for k, v in baked.items()})
    return {component: (_lokr_config(source, shapes[component]), state) for component, state in states.items()}


def loha_adapters(source: Path, tensors: dict[str, Tensor]) -> dict[str, tuple[dict, dict[str, Tensor]]]:
    """component -> (LoHaConfig as a dict, PEFT state dict `{path}.hada_*`) of a LoHa file's tensors.

    PEFT's LoHa has LyCORIS' tensor names and shapes, and the same scale alpha / r (r = the
    rows of `hada_w1_b`); Tucker cores (`hada_t1`/`hada_t2`) are PEFT's `use_effective_conv2d`.
    """
    from peft import LoHaConfig

    states: dict[str, dict[str, Tensor]] = {}
    ranks: dict[str, dict[str, tuple[int, float]]] = {}
    for component, path, _, parts in _modules(source, tensors).values():
        parts = dict(parts)
        alpha = parts.pop("alpha", None)
        rank = int(parts["hada_w1_b"].shape[0])
        ranks.setdefault(component, {})[path] = (rank, lycoris_alpha(alpha, rank))
        states.setdefault(component, {}).update({f"{path}.{k}": v.float().contiguous() for k, v in parts.items()})
    adapters = {}
    for component, modules in ranks.items():
        rank = Counter(r for r, _ in modules.values()).most_common(1)[0][0]
        alpha = Counter(a for _, a in modules.values()).most_common(1)[0][0]
        config = LoHaConfig(r=rank, alpha=alpha, target_modules=sorted(modules),
                            rank_pattern={p: r for p, (r, _) in modules.items() if r != rank},
                            alpha_pattern={p: a for p, (_, a) in modules.items() if a != alpha},
                            use_effective_conv2d=any(k.endswith(".hada_t1") for k in states[component]),
                            init_weights=False).to_dict()
        adapters[component] = ({k: sorted(v) if isinstance(v, set) else v for k, v in config.items()},
                               states[component])
    return adapters


def lycoris_to_diffusers(source: Path, out_dir: Path, *, dtype: torch.dtype | None) -> Path:
    """Write a LoKr file's diffusers `pytorch_lora_weights.safetensors` into `out_dir`.

    Raises:
        ValueError naming `source`: a LoHa (or mixed) file, a Tucker LoKr, or module names that
        are not SDXL's.
    """
    tensors = load_file(source)
    if any(".hada_" in key for key in tensors):
        raise ValueError(f"{source}: LoHa files cannot be converted to diffusers (diffusers cannot load LoHa); "
                         "use the file itself in ComfyUI, Forge, A1111 or sd-scripts")
    layers: dict[str, object] = {}
    for component, (config, state) in lokr_adapters(source, tensors, dtype=dtype).items():
        layers[f"{component}_lora_layers"] = state
        layers[f"{component}_lora_adapter_metadata"] = config
    return write_diffusers_file(out_dir, layers)


def _factor_shapes(parts: dict[str, Tensor], base: nn.Module) -> tuple:
    """((out_l, out_k), (in_m, in_n), rank or None for a full-matrix module, w1 factorised).

    Read from the tensors; `base` gives only the kernel size, which a factorised conv `lokr_w2_b`
    (r, in_n * kh * kw) folds into its columns.
    """
    w1, w1_a, w2 = parts.get("lokr_w1"), parts.get("lokr_w1_a"), parts.get("lokr_w2")
    out_l, in_m = w1.shape[:2] if w1 is not None else (w1_a.shape[0], parts["lokr_w1_b"].shape[1])
    kernel = math.prod(base.kernel_size) if isinstance(base, nn.Conv2d) else 1
    out_k, in_n = w2.shape[:2] if w2 is not None else (parts["lokr_w2_a"].shape[0],
                                                       parts["lokr_w2_b"].shape[1] // kernel)
    rank_from = parts.get("lokr_w2_a", w1_a)
    return ((out_l, out_k), (in_m, in_n), None if rank_from is None else rank_from.shape[1], w1_a is not None)


def _lokr_config(source: Path, shapes: dict[str, tuple]) -> dict:
    """The LoKrConfig (JSON-able) under which PEFT rebuilds these modules with these shapes."""
    from peft import LoKrConfig
    from peft.tuners.lokr.layer import factorization

    def fits(factor: int) -> bool:
        return all(factorization(out_l * out_k, factor) == (out_l, out_k)
                   and factorization(in_m * in_n, factor) == (in_m, in_n)
                   for (out_l, out_k), (in_m, in_n), _, _ in shapes.values())

    candidates = [-1] + sorted({out[0] for out, _, _, _ in shapes.values()})
    factor = next((c for c in candidates if fits(c)), None)
    if factor is None:
        raise ValueError(f"{source}: no LoKr factor reproduces the file's Kronecker factorisations")
    # A full module's rank: at least half of each w2 side, so PEFT makes w2 (and w1) full matrices.
    ranks = {path: rank or max(*out, *inp) for path, (out, inp, rank, _) in shapes.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {path: r for path, r in ranks.items() if r != rank}
    config = LoKrConfig(r=rank, alpha=rank, rank_pattern=pattern, alpha_pattern=pattern,
                        target_modules=sorted(shapes), decompose_factor=factor,
                        decompose_both=any(both for *_, both in shapes.values()), init_weights=False).to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
