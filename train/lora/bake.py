"""`lora merge --into MODEL`: LoRAs at weights added into a base model's weights.

W' = W + sum_i w_i * delta_i for every module the LoRAs adapt (`train.lora.deltas`; for LoRA,
delta = alpha / r * up @ down, which is what diffusers' `fuse_lora` and the WebUIs' merge add).
The base is an SGM single file or a diffusers folder (`train.model.weight_files`); the result
is an SGM single file (what ComfyUI's Load Checkpoint and the WebUIs load) and/or a diffusers
folder, in fp16, bf16 or fp32. Tensors stream: each is read memory-mapped, merged in fp32, cast
and written before the next (`train.tensor_files.save_tensors_streamed`), so memory holds one
layer at a time. A diffusers base becomes a single file through the `train.model.sgm_keys` maps;
a single-file base becomes a diffusers folder through diffusers' own single-file loader.
The LoRAs, their weights and SHA-256 are recorded in the output's metadata (`merged_loras`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from captioning import outputs
from train.lora.deltas import Delta, LoraDeltas, read_deltas
from train.lora.files import LoraFileError
from train.lora.merge import WeightedLora, summed_deltas
from train.model import sgm_keys
from train.model.weight_files import ModelWeights
from train.tensor_files import TensorSpec, save_tensors_streamed

logger = logging.getLogger(__name__)

Additions = dict[str, list[tuple[int | None, Delta]]]  # source key -> (q/k/v third or None, delta)
MERGE_RECORD = "merge_record.json"  # in a diffusers folder written from a single file


@dataclass
class BakeResult:
    modules: int  # modules changed
    outputs: list[Path]

    def lines(self) -> list[str]:
        return [f"{self.modules} modules merged", *(f"wrote {path}" for path in self.outputs)]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def merge_record(loras: list[tuple[LoraDeltas, float]], model: Path) -> dict[str, str]:
    """The metadata that records a merge: the base, and each LoRA's file name, weight and SHA-256."""
    return {"merged_loras": json.dumps([{"file": lora.path.name, "weight": weight, "sha256": _sha256(lora.path)}
                                        for lora, weight in loras]),
            "merged_into": model.name, "merged_by": "animagine-lora lora merge --into"}


def additions(loras: list[tuple[LoraDeltas, float]], weights: ModelWeights) -> Additions:
    """The summed delta of every module, placed at its weight in the model.

    Raises:
        LoraFileError: a LoRA module the model lacks, or whose shape differs (file and key named).
    """
    for lora, _ in loras:
        for (component, path), delta in lora.deltas.items():
            location = weights.locate(component, path)
            if location is None:
                raise LoraFileError(f"{lora.path}: {component}.{path}: no such module in {weights.source} "
                                    "(a LoRA for another model?)")
            shape = weights.location_shape(location)
            if shape != tuple(delta.shape):
                raise LoraFileError(f"{lora.path}: {component}.{path}: mismatched shapes: {tuple(delta.shape)} in "
                                    f"the LoRA, {shape} at {location.key} in {weights.source}")
    placed: Additions = {}
    for (component, path), delta in summed_deltas(loras).items():
        location = weights.locate(component, path)
        placed.setdefault(location.key, []).append((location.part, delta))
    return placed


def merged_tensor(weights: ModelWeights, key: str, placed: Additions, dtype: torch.dtype) -> Tensor:
    """The base tensor at `key` plus its deltas (added in fp32), cast to `dtype` if floating point."""
    tensor = weights.get(key)
    if key in placed:
        # a copy: safetensors may hand out the same private mapping of the file on every read
        tensor = tensor.to(torch.float32, copy=True)
        for part, delta in placed[key]:
            rows = tensor.shape[0] // 3
            target = tensor if part is None else tensor[part * rows : (part + 1) * rows]
            target += delta.weight()
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _out_dtype(weights: ModelWeights, key: str, dtype: torch.dtype) -> torch.dtype:
    stored = weights.dtype(key)
    return dtype if stored.is_floating_point else stored


def bake(inputs: list[WeightedLora], model: str | Path, *, single_file: Path | None = None,
         diffusers_dir: Path | None = None, dtype: torch.dtype = torch.float16,
         config_dir: str | Path | None = None) -> BakeResult:
    """Merge the LoRAs into `model`, writing `single_file` and/or `diffusers_dir` (a new or empty folder).

    `config_dir`: component configs for turning a single-file base into a diffusers folder
    (default: SDXL's, `train.model.loading.load_base_model`).

    Raises:
        FileNotFoundError, ValueError (LoraFileError, ModelFileError): unreadable LoRAs or model,
            modules missing from the model, mismatched shapes, an output that is an input.
    """
    if single_file is None and diffusers_dir is None:
        raise ValueError("merge --into: give -o OUT.safetensors and/or --diffusers DIR")
    if single_file is not None and single_file.suffix != ".safetensors":
        raise ValueError(f"{single_file}: the merged checkpoint is one .safetensors file")
    model = Path(model)
    loras = [(read_deltas(item.path), item.weight) for item in inputs]
    weights = ModelWeights(model)
    for out in (single_file, diffusers_dir):
        if out is not None and out.exists() and (out.resolve() == model.resolve()
                                                 or any(out.resolve() == lora.path.resolve() for lora, _ in loras)):
            raise ValueError(f"{out}: output would overwrite an input; choose another path")
    if diffusers_dir is not None and diffusers_dir.exists() and (not diffusers_dir.is_dir()
                                                                  or any(diffusers_dir.iterdir())):
        raise ValueError(f"--diffusers {diffusers_dir}: must be a new or empty folder")
    placed = additions(loras, weights)
    metadata = merge_record(loras, model)
    written = []
    if weights.layout == "sgm":
        target = single_file or diffusers_dir.parent / f".{diffusers_dir.name}.merged.safetensors"
        try:
            _sgm_to_sgm(weights, placed, target, dtype, {**weights.metadata(), **metadata})
            if diffusers_dir is not None:
                _single_file_to_diffusers(target, diffusers_dir, dtype, config_dir, metadata)
        finally:
            if single_file is None:
                target.unlink(missing_ok=True)
        written = [path for path in (single_file, diffusers_dir) if path is not None]
    else:
        if single_file is not None:
            _diffusers_to_sgm(weights, placed, single_file, dtype, metadata)
            written.append(single_file)
        if diffusers_dir is not None:
            _diffusers_to_diffusers(weights, placed, diffusers_dir, dtype, metadata)
            written.append(diffusers_dir)
    return BakeResult(sum(len(v) for v in placed.values()), written)


def _sgm_to_sgm(weights: ModelWeights, placed: Additions, out: Path, dtype: torch.dtype,
                metadata: dict[str, str]) -> None:
    specs = [TensorSpec(key, _out_dtype(weights, key, dtype), weights.shape(key))
             for key in weights.keys()]  # noqa: SIM118 - a ModelWeights, not a dict
    save_tensors_streamed(out, specs, lambda spec: merged_tensor(weights, spec.name, placed, dtype), metadata)


def _diffusers_to_diffusers(weights: ModelWeights, placed: Additions, out_dir: Path, dtype: torch.dtype,
                            metadata: dict[str, str]) -> None:
    """Each component's weights merged into one file; every other file (configs, tokenizers) copied."""
    outputs.claim_dir(out_dir)
    for path in sorted(weights.source.rglob("*")):
        relative = path.relative_to(weights.source)
        if path.is_file() and not path.name.endswith((".safetensors", ".bin", ".index.json")):
            outputs.claim_dir((out_dir / relative).parent)
            with outputs.atomic_path(out_dir / relative) as temp:
                shutil.copyfile(path, temp)
    for component, files in weights.files.items():
        keys = weights.keys(component)
        specs = [TensorSpec(key, _out_dtype(weights, key, dtype), weights.shape(key)) for key in keys]
        stem = files[0].name.split(".")[0]
        outputs.claim_dir(out_dir / component)
        save_tensors_streamed(out_dir / component / f"{stem}.safetensors", specs,
                              lambda spec: merged_tensor(weights, spec.name, placed, dtype),
                              {"format": "pt", **metadata})


def _component_config(weights: ModelWeights, component: str) -> dict:
    return json.loads((weights.source / component / "config.json").read_text("utf-8"))


def _diffusers_to_sgm(weights: ModelWeights, placed: Additions, out: Path, dtype: torch.dtype,
                      metadata: dict[str, str]) -> None:
    """A diffusers folder merged and renamed into the SGM layout, tensor by tensor.

    The renaming functions of `train.model.sgm_keys` take state dicts; run on meta tensors they
    give the output's names and shapes without reading a byte. OpenCLIP fuses q/k/v, so the
    second text encoder is converted as a whole (one component, about 1.4 GB in fp16).
    """
    unet_config, vae_config = _component_config(weights, "unet"), _component_config(weights, "vae")  # read once
    converters: dict[str, Callable[[dict], dict]] = {
        "unet": lambda sd: sgm_keys.unet_to_sgm(sd, unet_config),
        "vae": lambda sd: sgm_keys.vae_to_sgm(sd, vae_config),
        "text_encoder": sgm_keys.clip_l_to_sgm,
        "text_encoder_2": sgm_keys.open_clip_to_sgm,
    }
    specs: list[TensorSpec] = []
    sources: dict[str, tuple[str, list[str]]] = {}  # output key -> (component, source keys)
    for component, convert in converters.items():
        keys = weights.keys(component)
        meta = {k: torch.empty(weights.shape(k), dtype=_out_dtype(weights, k, dtype), device="meta") for k in keys}
        if component == "text_encoder_2":
            groups = [keys]
        else:
            groups = [[k] for k in keys]
        for group in groups:
            for name, tensor in convert({k: meta[k] for k in group}).items():
                specs.append(TensorSpec(name, tensor.dtype, tuple(tensor.shape)))
                sources[name] = (component, group)
    cache: dict[str, Tensor] = {}

    def produce(spec: TensorSpec) -> Tensor:
        component, group = sources[spec.name]
        if spec.name not in cache:
            cache.clear()  # one group (one tensor, or the whole second text encoder) at a time
            cache.update(converters[component]({k: merged_tensor(weights, k, placed, dtype) for k in group}))
        return cache[spec.name].contiguous()

    save_tensors_streamed(out, specs, produce, metadata)


def _single_file_to_diffusers(single_file: Path, out_dir: Path, dtype: torch.dtype,
                              config_dir: str | Path | None, metadata: dict[str, str]) -> None:
    """A merged single file saved as a diffusers folder, through diffusers' own SGM conversion;
    `save_pretrained` writes no metadata of ours, so the merge record goes into MERGE_RECORD."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from train.model.loading import load_base_model

    model = load_base_model(str(single_file), config_dir=config_dir and str(config_dir), weight_dtype=dtype,
                            vae_dtype=torch.float32)
    pipe = StableDiffusionXLPipeline(
        vae=model.vae, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2,
        tokenizer=model.tokenizer, tokenizer_2=model.tokenizer_2, unet=model.unet,
        scheduler=EulerDiscreteScheduler.from_config(model.noise_scheduler.config))
    temp = outputs.temp_dir(out_dir)
    try:
        pipe.save_pretrained(temp, safe_serialization=True)
        outputs.write_text(temp / MERGE_RECORD, json.dumps(metadata, indent=2) + "\n")
        with outputs.output_errors(out_dir):
            if out_dir.exists():
                out_dir.rmdir()  # empty: checked before the merge
            temp.rename(out_dir)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
