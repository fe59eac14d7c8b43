"""An SDXL model's weights by module, read lazily from an SGM single file or a diffusers folder.

`ModelWeights(source)` opens the safetensors files memory-mapped (`safe_open`) and reads one
tensor at a time, so tools that walk a whole SDXL model (merging a LoRA into it, extracting a
LoRA from two of them) hold one layer, not 7 GB. Modules are named as the diffusers models name
them (text encoder paths without `text_model.`); `locate` finds a module's weight in either layout,
including the q/k/v thirds of OpenCLIP's fused `in_proj_weight` in an SGM file (`train.model.sgm_keys`).
Pickle weights (`.bin`, `.ckpt`) are never opened.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from train.model import sgm_keys
from train.names import SDXL_CONFIG_DIR
from train.tensor_files import PICKLE_MAGIC, TORCH_DTYPE_OF

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")
# diffusers folder: component -> weights file stem inside its subfolder.
_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
          "text_encoder_2": "model"}


class ModelFileError(ValueError):
    """A model that cannot be read; the message names the file (and the key, if one)."""


@dataclass(frozen=True)
class Location:
    """Where one weight lives: a file, a key, and for OpenCLIP's fused q/k/v which third (0, 1, 2)."""

    file: Path
    key: str
    part: int | None = None


def _sdxl_block_map() -> dict[str, str]:
    config = json.loads((SDXL_CONFIG_DIR / "unet" / "config.json").read_text("utf-8"))
    return sgm_keys.unet_module_map(config)


class ModelWeights:
    """The weights of an SDXL model (`layout` "sgm" or "diffusers"), memory-mapped."""

    def __init__(self, source: str | Path) -> None:
        self.source = Path(source)
        self._handles: dict[Path, object] = {}
        self._block_map = _sdxl_block_map()
        if self.source.is_file():
            self.layout = "sgm"
            keys = self._keys(self.source)
            if not any(k.startswith(sgm_keys.UNET_PREFIX) for k in keys):
                raise ModelFileError(f"{self.source}: not an SDXL single-file checkpoint (no "
                                     f"{sgm_keys.UNET_PREFIX}* keys; first key {keys[0] if keys else None!r})")
            self.files = {"": [self.source]}
        elif self.source.is_dir():
            self.layout = "diffusers"
            if not (self.source / "unet").is_dir():
                raise ModelFileError(f"{self.source}: not a diffusers folder (no unet/ subfolder)")
            self.files = {c: self._component_files(c) for c in COMPONENTS if (self.source / c).is_dir()}
        else:
            raise FileNotFoundError(f"{self.source}: model file or folder not found")
        # key -> file, over every file of the model
        self._where = {key: path for paths in self.files.values() for path in paths for key in self._keys(path)}

    def _component_files(self, component: str) -> list[Path]:
        folder, stem = self.source / component, _STEMS[component]
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text("utf-8")).get("weight_map", {})
            return sorted({folder / name for name in weight_map.values()})
        for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
            if (folder / name).is_file():
                return [folder / name]
        raise ModelFileError(f"{folder}: no {stem}.safetensors (pickle .bin weights are not read)")

    def _handle(self, path: Path):
        if path not in self._handles:
            with open(path, "rb") as probe:
                start = probe.read(8)
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except (OSError, SafetensorError) as err:
                kind = "a pickle checkpoint, which is never unpickled" if start.startswith(PICKLE_MAGIC) \
                    else f"not a readable .safetensors file ({err})"
                raise ModelFileError(f"{path}: {kind}") from None
        return self._handles[path]

    def _keys(self, path: Path) -> list[str]:
        return list(self._handle(path).keys())

    def metadata(self) -> dict[str, str]:
        """The header metadata of a single file (empty for a folder)."""
        return dict(self._handle(self.source).metadata() or {}) if self.layout == "sgm" else {}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(self._where[key]).get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        return TORCH_DTYPE_OF[self._handle(self._where[key]).get_slice(key).get_dtype()]

    def get(self, key: str) -> Tensor:
        return self._handle(self._where[key]).get_tensor(key)

    def keys(self, component: str | None = None) -> list[str]:
        """Every key (of one component's files in a diffusers folder), in file order."""
        if self.layout == "sgm" or component is None:
            keys = list(self._where)
            if component is not None:
                keys = [k for k in keys if k.startswith(sgm_keys.PREFIXES[component])]
            return keys
        return [k for path in self.files.get(component, []) for k in self._keys(path)]

    def locate(self, component: str, module_path: str) -> Location | None:
        """Where the `.weight` of a module lives; None when the model has no such weight."""
        name = module_path + ".weight"
        if self.layout == "diffusers":
            for key in ([name] if component == "unet" else [name, "text_model." + name]):
                if key in self._where and self._where[key].parent.name == component:
                    return Location(self._where[key], key)
            return None
        if component == "unet":
            key, part = sgm_keys.UNET_PREFIX + sgm_keys.unet_module_name_to_sgm(name, self._block_map), None
        elif component == "text_encoder":
            key, part = f"{sgm_keys.TE1_PREFIX}text_model.{name}", None
        else:
            found = sgm_keys.open_clip_parameter(name)
            if found is None:
                return None
            key, part = found
        return Location(self.source, key, part) if key in self._where else None

    def read(self, location: Location) -> Tensor:
        """The weight at `location` (its third of a fused q/k/v tensor)."""
        tensor = self._handle(location.file).get_tensor(location.key)
        if location.part is None:
            return tensor
        rows = tensor.shape[0] // 3
        return tensor[location.part * rows : (location.part + 1) * rows]

    def location_shape(self, location: Location) -> tuple[int, ...]:
        shape = self.shape(location.key)
        return shape if location.part is None else (shape[0] // 3, *shape[1:])

    def modules(self, component: str) -> list[str]:
        """Module paths of `component` whose weight is a matrix or a conv kernel (what a LoRA adapts)."""
        found = []
        for key in self.keys(component):
            # OpenCLIP's fused q/k/v is `attn.in_proj_weight`, without the dot
            if not key.endswith((".weight", ".in_proj_weight")) or len(self.shape(key)) not in (2, 4):
                continue
            if self.layout == "diffusers":
                found.append(key.removesuffix(".weight").removeprefix("text_model."))
                continue
            inner = key[len(sgm_keys.PREFIXES[component]):].removesuffix(".weight").removesuffix("_weight")
            if component == "unet":
                name = sgm_keys.sgm_to_unet_name(inner, self._block_map)
                found += [name] if name else []
            elif component == "text_encoder":
                found.append(inner.removeprefix("text_model."))
            else:
                found += sgm_keys.open_clip_modules(inner)
        return found

