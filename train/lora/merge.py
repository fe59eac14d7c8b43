"""`lora merge`: several LoRAs, each at a weight, into one LoRA.

The merged delta of a module is sum_i w_i * delta_i. Exactly, for plain LoRAs: the factors are
concatenated (up = [w_1 s_1 up_1, w_2 s_2 up_2, ...], down = [down_1; down_2; ...], s_i = alpha_i / r_i),
so the rank is the sum of the ranks and alpha = rank (scale 1). With a rank rule, the summed delta
is cut by its SVD (`train.lora.lowrank`), which also takes LyCORIS inputs. Merging into a base
model is `train.lora.bake`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from train.lora.convert import LoraModule, LoraWeights
from train.lora.deltas import Delta, LoraDeltas, ModuleKey, read_deltas
from train.lora.files import LoraFileError
from train.lora.lowrank import low_rank, write_plain_lora
from train.lora.svd import RankRule


@dataclass(frozen=True)
class WeightedLora:
    """A LoRA file and the weight (strength) it is merged at."""

    path: Path
    weight: float = 1.0


def parse_weighted(text: str) -> WeightedLora:
    """`a.safetensors:0.7` -> (a.safetensors, 0.7); without `:WEIGHT`, weight 1.

    Raises:
        ValueError: a weight that is not a finite number.
    """
    head, sep, tail = text.rpartition(":")
    if not sep or "/" in tail or not head:  # no weight (or a ':' inside the path)
        return WeightedLora(Path(text))
    try:
        weight = float(tail)
    except ValueError:
        return WeightedLora(Path(text))
    if not math.isfinite(weight):
        raise ValueError(f"{text}: weight {tail} must be a finite number")
    return WeightedLora(Path(head), weight)


def summed_deltas(loras: list[tuple[LoraDeltas, float]]) -> dict[ModuleKey, Delta]:
    """sum_i w_i * delta_i per module: factored (ranks concatenated) where every term is factored.

    Raises:
        LoraFileError: a module whose shape differs between files (naming both files and the key).
    """
    terms: dict[ModuleKey, list[tuple[Delta, float, Path]]] = {}
    for lora, weight in loras:
        for key, delta in lora.deltas.items():
            first = terms.setdefault(key, [])
            if first and first[0][0].shape != delta.shape:
                raise LoraFileError(f"{lora.path}: {key[0]}.{key[1]}: mismatched shapes: {tuple(delta.shape)} here, "
                                    f"{tuple(first[0][0].shape)} in {first[0][2]}")
            first.append((delta, weight, lora.path))
    merged = {}
    for key, parts in terms.items():
        shape = parts[0][0].shape
        if all(d.factored for d, _, _ in parts):
            merged[key] = Delta(shape, up=torch.cat([d.up * w for d, w, _ in parts], dim=1),
                                down=torch.cat([d.down for d, _, _ in parts], dim=0))
        else:  # built when used: one module's full matrix at a time
            merged[key] = Delta(shape, make=partial(_weighted_sum, [(d, w) for d, w, _ in parts]))
    return merged


def _weighted_sum(terms: list[tuple[Delta, float]]) -> torch.Tensor:
    return sum(delta.matrix() * weight for delta, weight in terms)


def exact_modules(deltas: dict[ModuleKey, Delta]) -> LoraWeights:
    """Factored deltas as kohya modules at alpha = rank (scale 1)."""
    weights: LoraWeights = {}
    for (component, path), delta in deltas.items():
        k = delta.rank
        down = delta.down.reshape(k, *delta.shape[1:])
        up = delta.up.reshape(delta.shape[0], k, *([1, 1] if len(delta.shape) == 4 else []))
        weights.setdefault(component, {})[path] = LoraModule(down.contiguous(), up.contiguous(), float(k))
    return weights


def merge_loras(inputs: list[WeightedLora], out_path: str | Path, *, rule: RankRule | None = None,
                dtype: torch.dtype | None = torch.float16) -> list[str]:
    """Write the merged LoRA to `out_path`; returns the lines to print (the energy table with a rule).

    Raises:
        FileNotFoundError, ValueError (LoraFileError): an unreadable input (named with its key),
            mismatched shapes, a LyCORIS input without a rank rule, output = an input.
    """
    out_path = Path(out_path)
    if not inputs:
        raise ValueError("merge: give at least one LoRA")
    loras = [(read_deltas(item.path), item.weight) for item in inputs]
    for lora, _ in loras:
        if out_path.exists() and out_path.resolve() == lora.path.resolve():
            raise ValueError(f"{out_path}: output would overwrite the input; choose another path")
        if rule is None and lora.kind != "lora":
            raise LoraFileError(f"{lora.path}: a LyCORIS ({lora.kind}) file has no exact plain-LoRA form; "
                                "merge with --rank or --energy")
    deltas = summed_deltas(loras)
    names = " + ".join(f"{w:g} x {lora.path.name}" for lora, w in loras)
    comment = f"merged by animagine-lora lora merge: {names}"
    metadata = {"ss_merged_from": names}
    if rule is None:
        write_plain_lora(exact_modules(deltas), out_path, dtype=dtype, comment=comment, metadata=metadata)
        ranks = sorted({d.rank for d in deltas.values()})
        lines = [f"{len(deltas)} modules, exact merge, rank {ranks[0]}" + (f"-{ranks[-1]}" if len(ranks) > 1 else "")]
    else:
        weights, report = low_rank(deltas.items(), rule)
        write_plain_lora(weights, out_path, dtype=dtype, comment=comment, metadata=metadata)
        report.sizes = {**{lora.path.name: lora.path.stat().st_size for lora, _ in loras},
                        "out": out_path.stat().st_size}
        lines = report.lines()
    return lines + ([] if rule is not None else [f"file size: out {out_path.stat().st_size / 1e6:.1f} MB"])
