"""Writing safetensors files the way every output is written: atomically, with the umask's mode.

`safetensors.torch.save_file` creates its file with mode 0600 and in place, so a crash leaves half a
file and a ComfyUI server running as another user cannot read the result. `save_tensors` writes
through `captioning.outputs.atomic_path` instead: a temporary file beside the target, the mode a
new file gets under the user's umask (0644 under 022), then a rename.
"""

from __future__ import annotations

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
