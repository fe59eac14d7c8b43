"""Per-module weight deltas of any LoRA file we read: what the file adds to each base weight.

A plain LoRA (kohya/WebUI or diffusers, read by `train.lora.convert.read_lora`) adds
`alpha / r * up @ down` to a module's weight; the delta is kept in that factored form (the scale
folded into `up`), so its SVD costs O((out + in) r^2) instead of a full decomposition. A LyCORIS
file (kohya single-file layout) is rebuilt as the full matrix its loaders add, following
LyCORIS' and ComfyUI's definitions (lycoris/functional/lokr.py and loha.py,
comfy/weight_adapter/lokr.py and loha.py):

- LoKr: `scale * kron(w1, w2)`, each half either full (`lokr_w1`) or a product (`lokr_w1_a @
  lokr_w1_b`); `scale = alpha / r` when a half is a product, else 1 (loaders ignore alpha then).
- LoHa: `alpha / r * (w1_a @ w1_b) * (w2_a @ w2_b)` (Hadamard product), or with Tucker cores
  `einsum("ijkl,jr,ip->prkl", t, w_b, w_a)` per half.

Modules are keyed by (component, module path) as the diffusers models name them: `unet`,
`text_encoder`, `text_encoder_2`; text encoder paths without the `text_model.` level (as
transformers 5 builds CLIPTextModel). Convolutions are flattened to (out, in * kh * kw).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from train.lora.convert import read_lora, weights_file
from train.lora.files import LoraFileError, read_header
from train.lora.lycoris_convert import is_lycoris, lycoris_alpha, sdxl_module_names

ModuleKey = tuple[str, str]  # (component, module path)


@dataclass
class Delta:
    """One module's weight delta: `up @ down` (scale folded into `up`), a full matrix, or a
    function building the full matrix when asked (`make`: LyCORIS modules, whose full matrices
    for a whole SDXL LoRA would not fit in memory together).

    `shape` is the base weight's: (out, in) for a Linear, (out, in, kh, kw) for a Conv2d.
    """

    shape: tuple[int, ...]
    up: Tensor | None = None  # (out, k), fp32
    down: Tensor | None = None  # (k, in * kh * kw), fp32
    full: Tensor | None = None  # (out, in * kh * kw), fp32
    make: Callable[[], Tensor] | None = None  # () -> (out, in * kh * kw), fp32

    @property
    def factored(self) -> bool:
        return self.down is not None

    @property
    def rank(self) -> int:
        """k of a factored delta; the largest possible rank of a full one."""
        return int(self.down.shape[0]) if self.factored else min(self.shape[0], math.prod(self.shape[1:]))

    def matrix(self) -> Tensor:
        """The delta as an (out, in * kh * kw) fp32 matrix."""
        if self.full is not None:
            return self.full
        return self.up @ self.down if self.factored else self.make()

    def weight(self) -> Tensor:
        """The delta in the base weight's shape."""
        return self.matrix().reshape(self.shape)


@dataclass
class LoraDeltas:
    """A LoRA file read as deltas: `kind` "lora", "lokr" or "loha"; `ranks` the file's rank per
    module; `alpha_ratios` alpha / r per module of a plain LoRA (empty for LyCORIS)."""

    path: Path
    kind: str
    deltas: dict[ModuleKey, Delta]
    ranks: dict[ModuleKey, int]
    metadata: dict[str, str] = field(default_factory=dict)
    alpha_ratios: dict[ModuleKey, float] = field(default_factory=dict)


def canonical_path(component: str, path: str) -> str:
    """Text encoder module paths without the `text_model.` level; UNet paths as they are."""
    return path if component == "unet" else path.removeprefix("text_model.")


def read_deltas(path: str | Path) -> LoraDeltas:
    """Every module's delta of a plain LoRA (kohya or diffusers, file or folder) or a LyCORIS file.

    Raises:
        FileNotFoundError, LoraFileError (ValueError): naming the file and, where one is at fault,
            the key (pickle, truncated file, another architecture, mismatched shapes).
    """
    source = weights_file(Path(path))
    keys, metadata = read_header(source)
    if is_lycoris(keys):
        if any(k.startswith(("unet.", "text_encoder")) for k in keys):
            raise LoraFileError(f"{source}: a LoKr in the diffusers layout (key {keys[0]!r}) is not read here; "
                                "use the LyCORIS .safetensors file it was converted from")
        return _read_lycoris(source, keys, metadata)
    lora = read_lora(source)
    deltas, ranks, ratios = {}, {}, {}
    for component, modules in lora.weights.items():
        for module_path, module in modules.items():
            down = module.down.float()
            up = module.up.float().reshape(module.up.shape[0], -1)  # (out, r, 1, 1) -> (out, r)
            key = (component, canonical_path(component, module_path))
            shape = (up.shape[0], *down.shape[1:])
            deltas[key] = Delta(shape, up=up * (module.alpha / module.rank), down=down.reshape(module.rank, -1))
            ranks[key] = module.rank
            ratios[key] = module.alpha / module.rank
    return LoraDeltas(source, "lora", deltas, ranks, metadata, ratios)


@lru_cache(maxsize=1)
def _sdxl_modules() -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """kohya module name -> (component, canonical module path, kernel size ((1, 1) for a Linear))."""
    return {name: (component, canonical_path(component, path),
                   tuple(module.kernel_size) if isinstance(module, nn.Conv2d) else (1, 1))
            for name, (component, path, module) in sdxl_module_names().items()}


def _read_lycoris(source: Path, keys: list[str], metadata: dict[str, str]) -> LoraDeltas:
    modules: dict[str, dict[str, Tensor]] = {}
    with safe_open(str(source), framework="pt") as handle:
        for key in keys:
            name, _, part = key.partition(".")
            modules.setdefault(name, {})[part] = handle.get_tensor(key)
    sdxl = _sdxl_modules()
    deltas, ranks = {}, {}
    kind = "loha" if any(".hada_" in k for k in keys) else "lokr"
    for name, parts in sorted(modules.items()):
        if name not in sdxl:
            raise LoraFileError(f"{source}: key {name!r} is not an SDXL module (a LyCORIS file for another "
                                "architecture?)")
        component, module_path, kernel = sdxl[name]
        build = partial(_lycoris_weight, parts, kernel)
        try:  # built once here to check it; later only when a tool asks (one module at a time)
            weight, rank = build()
        except (KeyError, RuntimeError, IndexError, ValueError) as err:
            raise LoraFileError(f"{source}: {name}: cannot rebuild the module's delta "
                                f"({type(err).__name__}: {str(err)[:160]})") from None
        if not bool(torch.isfinite(weight).all()):
            raise LoraFileError(f"{source}: {name}: holds NaN or infinite values")
        deltas[(component, module_path)] = Delta(tuple(weight.shape), make=partial(_flat, build))
        ranks[(component, module_path)] = rank
    return LoraDeltas(source, kind, deltas, ranks, metadata)


def _lycoris_weight(parts: dict[str, Tensor], kernel: tuple[int, int]) -> tuple[Tensor, int]:
    """One LyCORIS module's delta in the base weight's shape, and its rank (for a LoKr of two full
    halves, the rank its matrix can have)."""
    p = {k: v.float() for k, v in parts.items() if k != "alpha"}
    if any(k.startswith("lokr_") for k in p):
        return _lokr_weight(p, parts, kernel)
    if any(k.startswith("hada_") for k in p):
        return _loha_weight(p, parts, kernel)
    raise KeyError(f"no lokr_/hada_ tensors among {sorted(parts)}")


def _flat(build: Callable[[], tuple[Tensor, int]]) -> Tensor:
    weight, _ = build()
    return weight.reshape(weight.shape[0], -1)


def _tucker(core: Tensor, w_a: Tensor, w_b: Tensor) -> Tensor:
    # LyCORIS rebuild_tucker: core (r, r, kh, kw), w_a (r, out), w_b (r, in) -> (out, in, kh, kw).
    return torch.einsum("i j k l, j r, i p -> p r k l", core, w_b, w_a)


def _lokr_weight(p: dict[str, Tensor], parts: dict[str, Tensor], kernel: tuple[int, int]) -> tuple[Tensor, int]:
    factored = p.get("lokr_w1_a", p.get("lokr_w2_a"))
    rank = int(factored.shape[1]) if factored is not None else None
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]  # (out_l, in_m)
    if "lokr_w2" in p:
        w2 = p["lokr_w2"]  # (out_k, in_n) or (out_k, in_n, kh, kw)
    elif "lokr_t2" in p:
        w2 = _tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
    else:
        w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]  # (out_k, in_n * kh * kw)
        if kernel != (1, 1):
            w2 = w2.reshape(w2.shape[0], -1, *kernel)
    if w2.ndim == 4:
        weight = torch.kron(w1[:, :, None, None], w2)  # (out, in, kh, kw)
    else:
        weight = torch.kron(w1, w2)
    scale = lycoris_alpha(parts.get("alpha"), rank) / rank if rank is not None else 1.0  # both halves full: scale 1
    return weight * scale, rank or min(weight.shape[0], math.prod(weight.shape[1:]))


def _loha_weight(p: dict[str, Tensor], parts: dict[str, Tensor], kernel: tuple[int, int]) -> tuple[Tensor, int]:
    rank = int(p["hada_w1_b"].shape[0])
    if "hada_t1" in p:
        w1 = _tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"])
        w2 = _tucker(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
    else:
        w1 = p["hada_w1_a"] @ p["hada_w1_b"]  # (out, in * kh * kw)
        w2 = p["hada_w2_a"] @ p["hada_w2_b"]
    weight = w1 * w2 * (lycoris_alpha(parts.get("alpha"), rank) / rank)
    if weight.ndim == 2 and kernel != (1, 1):  # (out, in * kh * kw) -> (out, in, kh, kw)
        weight = weight.reshape(weight.shape[0], -1, *kernel)
    return weight, rank
