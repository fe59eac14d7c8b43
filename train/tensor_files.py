"""Writing safetensors files the way every output is written: atomically, with the umask's mode.

`safetensors.torch.save_file` creates its file with mode 0600 and in place, so a crash leaves half a
file and a ComfyUI server running as another user cannot read the result. `save_tensors` writes
through `captioning.outputs.atomic_path` instead: a temporary file beside the target, the mode a
new file gets under the user's umask (0644 under 022), then a rename. `save_tensors_streamed` writes a
file tensor by tensor (a merged SDXL checkpoint without holding its 7 GB state dict).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from captioning import outputs


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                 *, clean: bool = True) -> Path:
    """Write `tensors` (and header `metadata`) to `path` atomically; returns the path.

    `clean=False` skips looking for stale temporaries beside it (see `captioning.outputs.claim_file`):
    for writers of many files into one folder.

    Raises:
        OutputError: `path` cannot be an output (a folder, a device) or the write failed (disk full).
    """
    with outputs.atomic_path(path, clean=clean) as temp:
        save_file(tensors, str(temp), metadata=metadata)
    return Path(path)


# torch dtype -> the safetensors header's name for it (safetensors' format spec).
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
TORCH_DTYPE_OF = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
# How pickle checkpoints start: torch.save's zip archive, or a bare pickle (protocol 2+ opcode 0x80).
# Named in errors, never loaded.
PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")


@dataclass(frozen=True)
class TensorSpec:
    """What the header says of one tensor before its bytes are produced."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def save_tensors_streamed(path: str | Path, specs: Sequence[TensorSpec], produce: Callable[[TensorSpec], torch.Tensor],
                          metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file one tensor at a time: memory holds one tensor, not the state dict.

    The header (names, dtypes, shapes, byte offsets; safetensors' layout: an 8-byte little-endian
    header length, the JSON header padded with spaces to 8 bytes, then the tensors' bytes in
    header order) is written first from `specs`; then `produce(spec)` is called for each spec in
    order and must return a tensor of exactly that dtype and shape. Atomic, like `save_tensors`.

    Raises:
        ValueError: a produced tensor that does not match its spec (nothing is left at `path`).
        OutputError: `path` cannot be an output, or the write failed.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with outputs.atomic_open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        for spec in specs:
            tensor = produce(spec)
            if tensor.dtype != spec.dtype or tuple(tensor.shape) != tuple(spec.shape):
                raise ValueError(f"{path}: {spec.name} produced {tensor.dtype} {tuple(tensor.shape)}, the header "
                                 f"says {spec.dtype} {tuple(spec.shape)}")
            handle.write(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return Path(path)
