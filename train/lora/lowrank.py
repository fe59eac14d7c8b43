"""Deltas -> a plain kohya LoRA of chosen rank, with the energy table `resize`, `merge --rank`
and `extract` print.

Each module's delta is cut by `train.lora.svd.truncate`; the file stores `down` and `up` with
an `.alpha` such that loaders' `alpha / r * up @ down` at strength 1.0 is the truncated delta.
A module that came from a plain LoRA keeps its alpha / r ratio (a file trained at alpha = r / 2
is resized to alpha = k / 2, as its users expect); every other module gets alpha = k (scale 1).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from train.lora.convert import COMPONENTS, LoraFile, LoraModule, LoraWeights, write_webui
from train.lora.deltas import Delta, ModuleKey
from train.lora.svd import RankRule, truncate


@dataclass
class ModuleCut:
    key: ModuleKey
    old_rank: int
    new_rank: int
    energy: float  # ||D||_F^2
    kept: float  # ||D_k||_F^2

    @property
    def share(self) -> float:
        return self.kept / self.energy if self.energy > 0 else 1.0


@dataclass
class EnergyReport:
    """What a low-rank cut kept, module by module, and the files' sizes (bytes)."""

    cuts: list[ModuleCut]
    sizes: dict[str, int] = field(default_factory=dict)  # label ("in", "out", ...) -> bytes
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The table: per component, modules, old and new rank, energy kept (min, median, total)."""
        header = f"{'component':<16}{'modules':>8}{'old rank':>12}{'new rank':>14}{'kept min':>10}" \
                 f"{'median':>8}{'total':>8}"
        rows = [header, "-" * len(header)]
        groups = [(c, [m for m in self.cuts if m.key[0] == c]) for c in COMPONENTS]
        for label, cuts in [*groups, ("all", self.cuts)]:
            if not cuts:
                continue
            shares = [m.share for m in cuts]
            energy = sum(m.energy for m in cuts)
            total = sum(m.kept for m in cuts) / energy if energy > 0 else 1.0
            old = _span([m.old_rank for m in cuts])
            new = _span([m.new_rank for m in cuts], median=True)
            rows.append(f"{label:<16}{len(cuts):>8}{old:>12}{new:>14}{min(shares):>10.4f}"
                        f"{statistics.median(shares):>8.4f}{total:>8.4f}")
        sizes = ", ".join(f"{label} {_mb(size)}" for label, size in self.sizes.items())
        return rows + ([f"file size: {sizes}"] if sizes else []) + self.notes


def _span(values: Iterable[int], median: bool = False) -> str:
    values = sorted(values)
    if values[0] == values[-1]:
        return str(values[0])
    middle = f" ~{statistics.median(values):g}" if median else ""
    return f"{values[0]}-{values[-1]}{middle}"


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def low_rank(deltas: Iterable[tuple[ModuleKey, Delta]], rule: RankRule, *, ranks: dict[ModuleKey, int] | None = None,
             ratios: dict[ModuleKey, float] | None = None) -> tuple[LoraWeights, EnergyReport]:
    """Each (key, delta) cut to the rule's rank, as kohya LoRA modules, and the energy report.

    `deltas` may be a generator: each delta is dropped once cut, so a whole model's differences
    never sit in memory together. `ranks`: the modules' ranks before the cut, for the table
    (default: the delta's own rank). `ratios`: alpha / r per module to keep (default 1: alpha = k).
    """
    weights: LoraWeights = {}
    cuts = []
    for key, delta in deltas:
        cut = truncate(delta, rule)
        ratio = (ratios or {}).get(key, 1.0)
        k = cut.rank
        down = cut.down.reshape(k, *delta.shape[1:])  # (k, in) or (k, in, kh, kw)
        up = (cut.up / ratio).reshape(delta.shape[0], k, *([1, 1] if len(delta.shape) == 4 else []))
        component, path = key
        weights.setdefault(component, {})[path] = LoraModule(down.contiguous(), up.contiguous(), ratio * k)
        cuts.append(ModuleCut(key, (ranks or {}).get(key, delta.rank), k, cut.energy, cut.kept))
    return weights, EnergyReport(cuts)


def write_plain_lora(weights: LoraWeights, path: Path, *, dtype: torch.dtype | None, comment: str,
                     metadata: dict[str, str] | None = None) -> Path:
    """A kohya/WebUI LoRA file (diffusers block names, `.alpha` per module) written atomically."""
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: the output LoRA is one .safetensors file")
    write_webui(LoraFile("webui", weights, metadata or {}), path, dtype=dtype, resolution=1024, source="",
                comment=comment)
    return path
