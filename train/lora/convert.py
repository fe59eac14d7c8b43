"""Converting SDXL LoRA files between the WebUI (kohya) and diffusers formats (`animagine-lora convert`).

Reads a kohya/WebUI file (diffusers or original SGM block names, as sd-scripts writes) or a
diffusers `pytorch_lora_weights.safetensors` (file or its folder), and writes the other format
(or `--to` the one asked for); a LyCORIS LoKr file converts to diffusers (`train.lora.lycoris_convert`).
Alpha is carried per module: kohya `.alpha` tensors <-> the PEFT
config (`lora_alpha`, `alpha_pattern`) diffusers stores as adapter metadata. Where the input does
not record alpha, loaders assume alpha = r; `--alpha` supplies the training alpha instead.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from peft import LoraConfig
from safetensors.torch import load_file
from torch import Tensor

from train.lora.export import (
    DIFFUSERS_WEIGHT_NAME,
    check_metadata,
    kohya_module_name,
    webui_metadata,
    write_diffusers_file,
)
from train.lora.files import LoraFileError, check_pair, lora_modules, read_header
from train.lora.lycoris_convert import is_lycoris, lycoris_to_diffusers
from train.names import SDXL_CONFIG_DIR
from train.tensor_files import save_tensors

logger = logging.getLogger(__name__)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass
class LoraModule:
    down: Tensor  # PEFT lora_A: (r, in) or (r, in, kh, kw)
    up: Tensor  # PEFT lora_B: (out, r) or (out, r, 1, 1)
    alpha: float  # loaders scale the product by alpha / r

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


LoraWeights = dict[str, dict[str, LoraModule]]  # component -> module path -> module


@dataclass
class LoraFile:
    format: str  # "webui" | "diffusers"
    weights: LoraWeights
    metadata: dict[str, str]  # safetensors header of a WebUI input (kept on WebUI output)


def weights_file(path: Path) -> Path:
    """The LoRA file `path` names: itself, or a diffusers folder's weights file."""
    if path.is_dir():
        path = path / DIFFUSERS_WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: LoRA file not found")
    return path


def detect_format(keys: list[str], path: Path) -> str:
    """'webui' (kohya `lora_*` keys) or 'diffusers' (`unet.` / `text_encoder*.` keys).

    Raises:
        ValueError: naming the file and a key that fits neither.
    """
    if keys and all(
        k.startswith(("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_")) for k in keys
    ):
        return "webui"
    if keys and all(k.startswith(tuple(c + "." for c in COMPONENTS)) for k in keys):
        return "diffusers"
    odd = next((k for k in keys if not k.startswith(("lora_", "unet.", "text_encoder"))), keys[:1])
    raise ValueError(f"{path}: not an SDXL LoRA in the WebUI or diffusers format (key {odd!r})")


def _pattern_value(path: str, patterns: dict) -> object | None:
    """The value of the `alpha_pattern`/`rank_pattern` key that names module `path`, or None.

    PEFT reads these keys as regular expressions, but they come from the file: a crafted key can
    take exponential time to match. Writers (diffusers, PEFT, this project) store module paths,
    so a key is matched as data: the whole path, or a dotted suffix of it.
    """
    for key, value in patterns.items():
        if isinstance(key, str) and (path == key or path.endswith("." + key)):
            return value
    return None


def _module_alpha(path: str, config: dict, default: float | None, rank: int) -> float:
    """A module's alpha from a PEFT config dict: its alpha_pattern entry, else lora_alpha."""
    patterns = config.get("alpha_pattern") or {}
    value = _pattern_value(path, patterns) if isinstance(patterns, dict) else None
    if value is not None:
        alpha = float(value)
    elif "lora_alpha" in config:
        alpha = float(config["lora_alpha"])
    else:
        alpha = default or float(rank)
    if config.get("use_rslora"):
        alpha *= math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(r); kohya by alpha / r
    return alpha


def _read_diffusers(path: Path, alpha: float | None) -> LoraWeights:
    tensors = load_file(path)
    raw = read_header(path)[1].get("lora_adapter_metadata")
    try:
        packed = json.loads(raw) if raw else {}
    except ValueError:
        raise LoraFileError(f"{path}: metadata key 'lora_adapter_metadata' is not JSON") from None
    if not isinstance(packed, dict):
        raise LoraFileError(f"{path}: metadata key 'lora_adapter_metadata' is not a JSON object")
    if not packed:
        logger.warning(
            "%s: no adapter metadata; alpha = %s",
            path,
            alpha if alpha else "r (loaders' assumption)",
        )
    if any("lora_magnitude_vector" in k for k in tensors):
        raise ValueError(
            f"{path}: DoRA LoRAs cannot be converted (no WebUI format reproduces them)"
        )
    weights: LoraWeights = {}
    for component in COMPONENTS:
        config = {
            k[len(component) + 1 :]: v for k, v in packed.items() if k.startswith(component + ".")
        }
        prefix = component + "."
        modules = {
            k[len(prefix) : -len(".lora_A.weight")]
            for k in tensors
            if k.startswith(prefix) and k.endswith(".lora_A.weight")
        }
        for module in sorted(modules):
            down = tensors[f"{prefix}{module}.lora_A.weight"]
            up = tensors[f"{prefix}{module}.lora_B.weight"]
            try:
                module_alpha = _module_alpha(module, config, alpha, int(down.shape[0]))
            except (TypeError, ValueError):
                raise LoraFileError(f"{path}: {component}: alpha of {module} in the adapter metadata "
                                    "is not a number") from None
            weights.setdefault(component, {})[module] = LoraModule(down, up, module_alpha)
    return weights


def _read_webui(path: Path, alpha: float | None) -> LoraWeights:
    """kohya file -> modules, through diffusers' own kohya conversion (`lora_state_dict`).

    diffusers maps SGM block names (sd-scripts) to diffusers ones using the UNet config; the SDXL
    base config is used, which every SDXL fine-tune (and the tiny test model) shares.
    """
    tensors = load_file(path)
    if any(k.endswith("dora_scale") for k in tensors):
        raise ValueError(f"{path}: DoRA LoRAs (dora_scale) cannot be converted")
    # diffusers reads the config by attribute (`unet_config.layers_per_block`), as on a model.
    unet_config = SimpleNamespace(
        **json.loads((SDXL_CONFIG_DIR / "unet" / "config.json").read_text("utf-8"))
    )
    state, network_alphas = StableDiffusionXLPipeline.lora_state_dict(
        dict(tensors), unet_config=unet_config
    )
    network_alphas = network_alphas or {}
    n_modules = len({k.split(".", 1)[0] for k in tensors if not k.endswith(".alpha")})
    weights: LoraWeights = {}
    for component in COMPONENTS:
        prefix = component + "."
        part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not part:
            continue
        peft = (
            convert_unet_state_dict_to_peft(part)
            if component == "unet"
            else convert_state_dict_to_peft(part)
        )
        alphas = _module_alphas(
            {k[len(prefix) :]: v for k, v in network_alphas.items() if k.startswith(prefix)},
            component,
        )
        for key in sorted(k for k in peft if k.endswith(".lora_A.weight")):
            module = key[: -len(".lora_A.weight")]
            down, up = peft[key], peft[f"{module}.lora_B.weight"]
            module_alpha = alphas.get(module, alpha or float(down.shape[0]))
            weights.setdefault(component, {})[module] = LoraModule(down, up, module_alpha)
    converted = sum(len(m) for m in weights.values())
    if converted != n_modules:
        raise ValueError(
            f"{path}: only {converted} of {n_modules} LoRA modules have names diffusers can map"
        )
    n_alphas = sum(k.endswith(".alpha") for k in tensors)
    if len(network_alphas) != n_alphas:
        raise ValueError(
            f"{path}: only {len(network_alphas)} of {n_alphas} alpha tensors could be mapped to modules"
        )
    return weights


def _module_alphas(network_alphas: dict[str, float], component: str) -> dict[str, float]:
    """Module path -> alpha from diffusers' `network_alphas`.

    diffusers keys the alphas by its intermediate (pre-PEFT) weight names, e.g.
    `...attn1.processor.to_q_lora.down.weight.alpha` or `...proj_in.alpha`; running each name
    through the same PEFT conversion as the weights gives the module path.
    """
    to_peft = convert_unet_state_dict_to_peft if component == "unet" else convert_state_dict_to_peft
    named = {}
    for key, value in network_alphas.items():
        name = key.removesuffix(".alpha")
        if not name.endswith("down.weight"):
            name += ".lora.down.weight"
        named[name] = torch.tensor(float(value))
    # Converted all at once: the converter infers the naming scheme from the whole dict.
    converted = to_peft(named) if named else {}
    return {k.removesuffix(".lora_A.weight"): float(v) for k, v in converted.items()}


def read_lora(path: str | Path, *, alpha: float | None = None) -> LoraFile:
    """Read a WebUI or diffusers SDXL LoRA (file, or diffusers folder) into per-module tensors.

    Args:
        alpha: alpha for modules whose file does not record one (default r, as loaders assume).

    Every module is checked (`train.lora.files.check_pair`) before anything is written.

    Raises:
        FileNotFoundError, ValueError (LoraFileError): with the file named.
    """
    path = weights_file(Path(path))
    keys, metadata = read_header(path)
    fmt = detect_format(keys, path)
    lora_modules(path)  # every down matrix has its up matrix, and the reverse
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise LoraFileError(f"--alpha {alpha}: must be a finite positive number")
    try:
        weights = _read_webui(path, alpha) if fmt == "webui" else _read_diffusers(path, alpha)
    except (KeyError, IndexError, RuntimeError, TypeError) as err:  # diffusers' kohya mapping on odd keys
        raise LoraFileError(f"{path}: cannot interpret its LoRA tensors ({type(err).__name__}: {err})") from None
    for component, modules in weights.items():
        for module, weight in modules.items():
            check_pair(f"{path}: {component}.{module}", weight.down, weight.up, weight.alpha)
    return LoraFile(fmt, weights, metadata if fmt == "webui" else {})


def _cast(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    return tensor.to(dtype).contiguous() if dtype is not None else tensor.contiguous()


def _most_common(values) -> float:
    return Counter(values).most_common(1)[0][0]


def write_webui(
    lora: LoraFile, path: Path, *, dtype: torch.dtype | None, resolution: int, source: str,
    comment: str | None = None,
) -> None:
    """kohya file with diffusers block names; metadata from the input when it had some (but the
    network's kind, rank and alpha are this file's)."""
    tensors: dict[str, Tensor] = {}
    for component, modules in lora.weights.items():
        for module, weight in modules.items():
            name = kohya_module_name(component, module)
            tensors[f"{name}.lora_down.weight"] = _cast(weight.down, dtype)
            tensors[f"{name}.lora_up.weight"] = _cast(weight.up, dtype)
            tensors[f"{name}.alpha"] = torch.tensor(weight.alpha, dtype=torch.float32)
    all_modules = [m for modules in lora.weights.values() for m in modules.values()]
    metadata = webui_metadata(
        rank=int(_most_common(m.rank for m in all_modules)),
        alpha=_most_common(m.alpha for m in all_modules),
        output_name=path.stem,
        resolution=resolution,
        tag_frequency={},
        comment=comment or f"converted from {source} by animagine-lora convert",
        conv=any(m.down.ndim == 4 and m.down.shape[-1] > 1 for m in all_modules),
    )
    # Keep what the input recorded (training details, tag frequency), but never its model class.
    kept = {
        k: v for k, v in lora.metadata.items() if k.startswith(("ss_", "modelspec.", "sshs_")) and v
    }
    metadata.update(
        {
            k: v
            for k, v in kept.items()
            if k not in ("ss_base_model_version", "modelspec.architecture", "ss_network_module",
                         "ss_network_args", "ss_network_dim", "ss_network_alpha")
            and not (comment and (k in ("ss_training_comment", "modelspec.description") or k.startswith("sshs_")))
        }
    )
    check_metadata(metadata)
    save_tensors(path, tensors, metadata)


def write_diffusers(lora: LoraFile, out_dir: Path, *, dtype: torch.dtype | None) -> Path:
    """`pytorch_lora_weights.safetensors` with a LoraConfig per component as adapter metadata."""
    layers: dict[str, object] = {}
    for component, modules in lora.weights.items():
        rank = int(_most_common(m.rank for m in modules.values()))
        alpha = _most_common(m.alpha for m in modules.values())

        # PEFT matches targets and patterns as path suffixes; without the `text_model.` level they
        # fit CLIPTextModel both as recent transformers flatten it and as older ones wrap it.
        def target(path: str) -> str:
            return path.removeprefix("text_model.")

        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            target_modules=sorted(target(p) for p in modules),
            rank_pattern={target(p): m.rank for p, m in modules.items() if m.rank != rank},
            alpha_pattern={target(p): m.alpha for p, m in modules.items() if m.alpha != alpha},
        ).to_dict()
        layers[f"{component}_lora_layers"] = {
            f"{p}.{ab}.weight": _cast(t, dtype)
            for p, m in modules.items()
            for ab, t in (("lora_A", m.down), ("lora_B", m.up))
        }
        layers[f"{component}_lora_adapter_metadata"] = {
            k: sorted(v) if isinstance(v, set) else v for k, v in config.items()
        }
    return write_diffusers_file(out_dir, layers)


def convert(
    in_path: str | Path,
    out_path: str | Path,
    *,
    to: str | None = None,
    alpha: float | None = None,
    dtype: torch.dtype | None = None,
    resolution: int = 1024,
) -> Path:
    """Convert `in_path` into `out_path` (a file for 'webui', a folder for 'diffusers'); returns it.

    Raises:
        FileNotFoundError, ValueError: unreadable input, same input and output, unknown format.
    """
    in_path, out_path = Path(in_path), Path(out_path)
    source = weights_file(in_path)
    keys, _ = read_header(source)  # refuses pickles and truncated files before anything is read
    if is_lycoris(keys):
        # LoKr / LoHa in the kohya single-file layout: only LoKr -> diffusers exists (lycoris_convert).
        if to not in (None, "diffusers") or source.suffix != ".safetensors" or any(k.startswith("unet.") for k in keys):
            raise ValueError(f"{source}: a LyCORIS (LoKr/LoHa) file converts only from the WebUI file to diffusers")
        return lycoris_to_diffusers(source, out_path, dtype=dtype)
    lora = read_lora(source, alpha=alpha)
    to = to or ("diffusers" if lora.format == "webui" else "webui")
    target = out_path / DIFFUSERS_WEIGHT_NAME if to == "diffusers" else out_path
    if target.resolve() == source.resolve():
        raise ValueError(f"{out_path}: output would overwrite the input; choose another path")
    if to == "webui":
        if out_path.suffix != ".safetensors":
            raise ValueError(f"{out_path}: a WebUI LoRA is one .safetensors file")
        write_webui(lora, out_path, dtype=dtype, resolution=resolution, source=source.name)
        return out_path
    if to == "diffusers":
        return write_diffusers(lora, out_path, dtype=dtype)
    raise ValueError(f"--to {to!r}: choose webui or diffusers")
