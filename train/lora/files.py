"""Opening LoRA files from elsewhere: safetensors only, checked before anything is trusted.

A LoRA downloaded from Civitai or the Hub is untrusted input. Only `.safetensors` is read
(a header of JSON and raw tensor bytes, no code); a pickle checkpoint (`.ckpt`, `.pt`, `.bin`:
`torch.save`'s zip or a bare pickle) is refused before any byte of it is unpickled, since
unpickling runs whatever code the file names. `sample`, `eval` and `convert` open files here.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from train.tensor_files import PICKLE_MAGIC

LORA_DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight")
LORA_UP_SUFFIXES = (".lora_up.weight", ".lora_B.weight", ".lora.up.weight")


class LoraFileError(ValueError):
    """A LoRA file that cannot be used; the message names the file (and the key, if one)."""


def read_header(path: str | Path) -> tuple[list[str], dict[str, str]]:
    """The tensor names and the metadata of a safetensors file, without reading the tensors.

    Raises:
        LoraFileError: missing, unreadable, a pickle checkpoint, or not a complete safetensors file
            (truncated downloads fail here: the header promises bytes the file lacks).
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            start = handle.read(8)
    except OSError as err:
        raise LoraFileError(f"{path}: cannot read: {err.strerror or err}") from None
    # safetensors first: its 8-byte header length can itself start with 0x80 (a 640-byte header),
    # so the pickle magic only names what a file that is not safetensors probably is.
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys()), dict(handle.metadata() or {})
    except (OSError, SafetensorError) as err:
        if start.startswith(PICKLE_MAGIC):
            raise LoraFileError(f"{path}: a pickle checkpoint (.ckpt/.pt), not .safetensors; it is not "
                                "loaded, since unpickling can run code. Ask for a .safetensors file") from None
        raise LoraFileError(f"{path}: not a readable .safetensors file ({err})") from None


def lora_modules(path: str | Path) -> set[str]:
    """Module names of a LoRA file (the part before `.lora_down.weight`/`.lora_A.weight`).

    Raises:
        LoraFileError: unreadable, not a LoRA (e.g. a full model checkpoint), or a module with a
            down/A matrix but no up/B matrix (or the reverse).
    """
    keys, _ = read_header(path)
    down = {k[: -len(s)] for k in keys for s in LORA_DOWN_SUFFIXES if k.endswith(s)}
    up = {k[: -len(s)] for k in keys for s in LORA_UP_SUFFIXES if k.endswith(s)}
    if not down and not up and any(".lokr_" in k or ".hada_" in k for k in keys):
        # diffusers' SDXL loader takes only keys with "lora" in them (diffusers 0.42).
        raise LoraFileError(f"{path}: a LyCORIS (LoKr/LoHa) file, which diffusers cannot load on SDXL; use it in "
                            "ComfyUI/Forge/A1111, or `animagine-lora convert` a LoKr file to a diffusers folder")
    if not down and not up:
        hint = " (it looks like a full model checkpoint)" if any(
            k.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner.")) for k in keys
        ) else ""
        raise LoraFileError(f"{path}: not a LoRA file, no lora_down/lora_A tensors{hint}")
    if down != up:
        missing = sorted(down ^ up)
        raise LoraFileError(f"{path}: {len(missing)} module(s) lack their up or down matrix, e.g. {missing[0]}")
    return down


def check_pair(where: str, down: Tensor, up: Tensor, alpha: float) -> None:
    """One module's matrices and alpha, before they are written anywhere.

    `down` is (r, in) or (r, in, kh, kw), `up` (out, r) or (out, r, 1, 1); loaders scale
    `up @ down` by alpha / r, so alpha must be a finite positive number.

    Raises:
        LoraFileError: naming `where` (file and module) and what is wrong.
    """
    for name, tensor in (("down", down), ("up", up)):
        if not torch.is_floating_point(tensor):
            raise LoraFileError(f"{where}: {name} matrix has dtype {tensor.dtype}; LoRA weights are floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise LoraFileError(f"{where}: {name} matrix holds NaN or infinite values")
    if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0]:
        raise LoraFileError(f"{where}: mismatched shapes: down {tuple(down.shape)}, up {tuple(up.shape)} "
                            "(up must be (out, r) for down (r, in))")
    if up.ndim == 4 and up.shape[2:] != (1, 1):
        raise LoraFileError(f"{where}: up matrix {tuple(up.shape)} must be (out, r, 1, 1) for a conv LoRA")
    if not (math.isfinite(alpha) and alpha > 0):
        raise LoraFileError(f"{where}: alpha {alpha} must be a finite positive number")
