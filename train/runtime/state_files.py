"""Resume state as JSON plus safetensors, so that loading a checkpoint never unpickles anything.

A state dict (optimizer, LR scheduler, RNG states, an EMA copy, ...) is a tree of dicts, lists,
tuples, numbers, strings, None and tensors. `write_state(folder, name, tree)` stores its tensors
in `NAME.safetensors` and everything else in `NAME.json`, each tensor replaced by
`{"__tensor__": key}`; `read_state(folder, name)` rebuilds the same tree, bit for bit. Tuples and
dicts with non-string keys (an optimizer's `state` is keyed by parameter index) are tagged so
that they come back as they were. Reading uses only `json` and `safetensors`, which parse data and
never run code (unlike `torch.load`/pickle, which accelerate's `save_state` uses).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from train.tensor_files import save_tensors

TENSOR, TUPLE, ITEMS = "__tensor__", "__tuple__", "__items__"
_SCALARS = (bool, int, float, str, type(None))


class StateFileError(ValueError):
    """A state file that is missing, truncated or not what we wrote; the message names it."""


def split_tensors(tree, tensors: dict[str, torch.Tensor], path: str = "state"):
    """`tree` as JSON-able data, its tensors moved into `tensors` (CPU copies) under their tree path.

    Raises:
        TypeError: a value that is neither a container, a scalar nor a tensor (names its path).
    """
    if isinstance(tree, torch.Tensor):
        # A copy: safetensors refuses tensors sharing storage, and views of one buffer do.
        tensors[path] = tree.detach().to("cpu", copy=True).contiguous()
        return {TENSOR: path}
    if isinstance(tree, dict):
        plain = all(isinstance(k, str) for k in tree) and not {TENSOR, TUPLE, ITEMS} & set(tree)
        if plain:
            return {k: split_tensors(v, tensors, f"{path}.{k}") for k, v in tree.items()}
        if not all(isinstance(k, _SCALARS) for k in tree):
            raise TypeError(f"{path}: dict keys must be strings or numbers to be stored in a checkpoint")
        return {ITEMS: [[k, split_tensors(v, tensors, f"{path}.{k}")] for k, v in tree.items()]}
    if isinstance(tree, tuple):
        return {TUPLE: [split_tensors(v, tensors, f"{path}.{i}") for i, v in enumerate(tree)]}
    if isinstance(tree, list):
        return [split_tensors(v, tensors, f"{path}.{i}") for i, v in enumerate(tree)]
    if isinstance(tree, _SCALARS):
        return tree
    raise TypeError(f"{path}: a {type(tree).__name__} cannot be stored in a checkpoint (JSON + tensors only)")


def join_tensors(node, tensors: dict[str, torch.Tensor], source: Path):
    """The inverse of `split_tensors`.

    Raises:
        StateFileError: the JSON names a tensor `NAME.safetensors` does not hold, or is malformed.
    """
    if isinstance(node, list):
        return [join_tensors(v, tensors, source) for v in node]
    if not isinstance(node, dict):
        return node
    if TENSOR in node:
        if node[TENSOR] not in tensors:
            raise StateFileError(f"{source}: tensor {node[TENSOR]!r} missing from the .safetensors file")
        return tensors[node[TENSOR]]
    if TUPLE in node:
        return tuple(join_tensors(v, tensors, source) for v in node[TUPLE])
    if ITEMS in node:
        try:
            return {k: join_tensors(v, tensors, source) for k, v in node[ITEMS]}
        except (TypeError, ValueError):
            raise StateFileError(f"{source}: malformed {ITEMS} entry") from None
    return {k: join_tensors(v, tensors, source) for k, v in node.items()}


def write_state(folder: Path, name: str, tree) -> None:
    """`tree` as `folder/NAME.json` (+ `folder/NAME.safetensors` when it holds tensors).

    Not atomic by itself: checkpoints are written into a temp folder that is renamed when complete.
    """
    tensors: dict[str, torch.Tensor] = {}
    data = split_tensors(tree, tensors)
    if tensors:
        save_tensors(folder / f"{name}.safetensors", tensors, clean=False)
    (folder / f"{name}.json").write_text(json.dumps(data), encoding="utf-8")


def read_state(folder: Path, name: str):
    """The tree `write_state(folder, name, ...)` wrote.

    Raises:
        StateFileError: a file is missing, truncated or malformed (the message names it).
    """
    source = folder / f"{name}.json"
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StateFileError(f"{source}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StateFileError(f"{source}: unreadable or truncated ({err})") from None
    tensors = read_tensors(folder / f"{name}.safetensors") if (folder / f"{name}.safetensors").exists() else {}
    return join_tensors(data, tensors, source)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors on the CPU.

    Raises:
        StateFileError: missing, truncated or not safetensors (a pickle, for one), naming `path`.
    """
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise StateFileError(f"{path}: missing") from None
    except (OSError, SafetensorError, ValueError) as err:
        raise StateFileError(f"{path}: not a complete safetensors file ({err})") from None
