"""The exact SDXL architecture with seeded random weights, as one SGM single file.

The UNet, both text encoders and the VAE are built from the shipped configs
(`train/model/sdxl_configs/`, SDXL 1.0 base = Animagine XL 4.0's layout): 2.57B + 0.82B + 0.08B
parameters, 6.9 GB in bf16. Random weights run at the speed of the real checkpoint and have every
module the real one has, so a test or benchmark on them sees the real module counts, memory and
FLOPs without downloading anything.

Memory stays near one component: each is created on the meta device (no storage), its file
layout (names, shapes, dtypes) is read from the meta tensors, the safetensors header is written
for all four, and then one component at a time is allocated in the target dtype, initialised,
renamed to SGM keys (`train.model.sgm_keys`), streamed into the file and freed.

Initialisation (`init_tensor`): each tensor from its own generator, seeded by the build seed and
the tensor's name, so a tensor's values do not depend on build order or on the other components.
Linear and conv weights ~ N(0, 1/fan_in) (LeCun: activations keep their scale through the
stack), embeddings ~ N(0, 0.02²) (CLIP's init), norm weights 1, biases 0. Values are drawn in
fp32 and rounded to the file's dtype.

    python -m train.model.random_sdxl OUT.safetensors [--seed 0] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from train.model import sgm_keys
from train.names import SDXL_CONFIG_DIR
from train.tensor_files import TensorSpec, save_tensors_streamed

logger = logging.getLogger(__name__)

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EMBEDDING_STD = 0.02
_NORMS = (nn.GroupNorm, nn.LayerNorm)


def component_config(component: str) -> dict:
    """The shipped diffusers/transformers config of one SDXL component."""
    return json.loads((SDXL_CONFIG_DIR / component / "config.json").read_text("utf-8"))


def _text_config(component: str) -> CLIPTextConfig:
    config = component_config(component)
    config.pop("torch_dtype", None)  # the dtype is chosen by the caller
    return CLIPTextConfig(**config)


def build_empty(component: str) -> nn.Module:
    """One SDXL component on the meta device: every module and shape, no storage."""
    with init_empty_weights():
        if component == "unet":
            return UNet2DConditionModel.from_config(component_config("unet"))
        if component == "vae":
            return AutoencoderKL.from_config(component_config("vae"))
        if component == "text_encoder":
            return CLIPTextModel(_text_config("text_encoder"))
        if component == "text_encoder_2":
            return CLIPTextModelWithProjection(_text_config("text_encoder_2"))
    raise ValueError(f"component {component!r}: choose from {COMPONENTS}")


def to_sgm(component: str, model: nn.Module) -> dict[str, Tensor]:
    """The component's state dict under its SGM single-file keys (meta tensors stay meta)."""
    state = model.state_dict()
    if component == "unet":
        return sgm_keys.unet_to_sgm(state, dict(model.config))
    if component == "vae":
        return sgm_keys.vae_to_sgm(state, dict(model.config))
    if component == "text_encoder":
        return sgm_keys.clip_l_to_sgm(state)
    return sgm_keys.open_clip_to_sgm(state)


def tensor_seed(seed: int, name: str) -> int:
    """The generator seed of one named tensor: stable across runs, processes and build order."""
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63


def init_tensor(tensor: Tensor, kind: str, name: str, seed: int) -> None:
    """Fill `tensor` in place by its role (`kind`: linear, embedding, norm or bias); see the module
    docstring. Draws in fp32 on the CPU, so the values are the same whatever `tensor`'s dtype."""
    with torch.no_grad():
        if kind == "norm":
            tensor.fill_(1.0)
        elif kind == "bias":
            tensor.zero_()
        else:
            fan_in = math.prod(tensor.shape[1:]) if tensor.ndim > 1 else tensor.numel()
            std = EMBEDDING_STD if kind == "embedding" else fan_in**-0.5
            generator = torch.Generator().manual_seed(tensor_seed(seed, name))
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)


def _kind(module: nn.Module, param_name: str, param: Tensor) -> str:
    if isinstance(module, _NORMS):
        return "norm" if param_name == "weight" else "bias"
    if isinstance(module, nn.Embedding) or param.ndim == 1 and param_name != "bias":
        # nn.Embedding, and bare vectors such as a class embedding: small normal values.
        return "embedding"
    if param_name == "bias":
        return "bias"
    return "linear"


def initialise(model: nn.Module, prefix: str, seed: int) -> None:
    """Seeded values for every parameter of `model` (named `prefix.<path>` for their seeds).

    Tensors are filled on a thread per core: one draw runs on one core, and each tensor's own
    generator makes the result independent of which thread fills it when.
    """
    jobs = []
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{prefix}.{module_name}.{param_name}" if module_name else f"{prefix}.{param_name}"
            jobs.append((param.data, _kind(module, param_name, param), full))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for done in [pool.submit(init_tensor, tensor, kind, name, seed) for tensor, kind, name in jobs]:
            done.result()


def materialise(component: str, dtype: torch.dtype, seed: int) -> nn.Module:
    """One component allocated on the CPU in `dtype` and initialised from `seed`."""
    model = build_empty(component)
    buffers = {name: b.clone() for name, b in model.named_buffers() if b.device.type != "meta"}
    # nn.Module.to: diffusers' own `to` warns about casting. On meta the cast costs nothing, so
    # storage is allocated in `dtype` directly.
    nn.Module.to(model, dtype).to_empty(device="cpu")
    for name, value in buffers.items():  # real buffers (CLIP's position ids) survive to_empty
        module_name, _, buffer_name = name.rpartition(".")
        getattr(model.get_submodule(module_name), buffer_name).copy_(value)
    initialise(model, component, seed)
    model.requires_grad_(False)
    return model


def write_streamed(path: Path, layout: list[TensorSpec], tensors: Iterable[tuple[str, Tensor]],
                   metadata: dict[str, str]) -> Path:
    """Write a safetensors file whose tensors arrive one by one, in `layout` order, atomically
    (`train.tensor_files.save_tensors_streamed`: memory holds one tensor).

    Raises:
        ValueError: a tensor that does not match its `layout` entry, too few or too many tensors
            (nothing is left at `path`).
        OutputError: the file cannot be written.
    """
    arriving = iter(tensors)

    def produce(spec: TensorSpec) -> Tensor:
        name, tensor = next(arriving, (None, None))
        if name != spec.name:
            raise ValueError(f"{path}: tensor {name!r} where the header says {spec.name!r}")
        if spec is layout[-1] and next(arriving, None) is not None:
            raise ValueError(f"{path}: more tensors than the header's {len(layout)}")
        return tensor

    return save_tensors_streamed(path, layout, produce, metadata)


def _component_tensors(dtype: torch.dtype, seed: int) -> Iterator[tuple[str, Tensor]]:
    for component in COMPONENTS:
        model = materialise(component, dtype, seed)
        tensors = to_sgm(component, model)
        del model  # the SGM dict holds what the file needs
        yield from tensors.items()
        logger.info("random SDXL: %s written", component)
        del tensors


def build_random_sdxl(path: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the exact SDXL architecture with seeded random weights to `path` as one SGM
    `.safetensors` file (what `train.model.loading.load_base_model` and A1111/ComfyUI load).

    The same seed and dtype give the same bytes. Peak memory is about one component
    (the UNet: 5.1 GB in bf16) plus one tensor in fp32.
    """
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype {dtype}: choose from {', '.join(sorted(DTYPES))}")
    layout = []
    for component in COMPONENTS:
        meta = to_sgm(component, nn.Module.to(build_empty(component), dtype))
        layout += [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in meta.items()]
    metadata = {"format": "pt", "random_sdxl_seed": str(seed)}
    return write_streamed(Path(path), layout, _component_tensors(dtype, seed), metadata)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the .safetensors file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    build_random_sdxl(args.out, seed=args.seed, dtype=DTYPES[args.dtype])
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
