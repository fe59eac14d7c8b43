"""`lora resize`: a LoRA (plain or LyCORIS) rewritten as a plain kohya LoRA of lower rank.

Every module's delta (`train.lora.deltas`) is replaced by its best approximation at the rank the
rule chooses (`train.lora.svd`), so a LoKr or LoHa result becomes a file every loader reads,
diffusers included. See `train.lora.lowrank` for the alpha convention of the output.
"""

from __future__ import annotations

from pathlib import Path

import torch

from train.lora.deltas import read_deltas
from train.lora.lowrank import EnergyReport, low_rank, write_plain_lora
from train.lora.svd import RankRule


def resize(in_path: str | Path, out_path: str | Path, rule: RankRule, *, dtype: torch.dtype | None = torch.float16) -> EnergyReport:
    """Write `out_path`, the LoRA at `in_path` cut to `rule`'s rank; returns the energy report.

    Raises:
        FileNotFoundError, ValueError (LoraFileError): unreadable input (named, with the key),
            output that would overwrite the input, or a rule that does not fit.
    """
    out_path = Path(out_path)
    lora = read_deltas(in_path)
    if out_path.exists() and out_path.resolve() == lora.path.resolve():
        raise ValueError(f"{out_path}: output would overwrite the input; choose another path")
    weights, report = low_rank(lora.deltas.items(), rule, ranks=lora.ranks, ratios=lora.alpha_ratios)
    write_plain_lora(weights, out_path, dtype=dtype, metadata=lora.metadata,
                     comment=f"resized from {lora.path.name} ({lora.kind}) by animagine-lora lora resize")
    report.sizes = {"in": lora.path.stat().st_size, "out": out_path.stat().st_size}
    return report

