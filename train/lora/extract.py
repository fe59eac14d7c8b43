"""`lora extract`: a LoRA approximating the difference between a fine-tuned model and its base.

For every adapted module (the UNet modules of a target preset, `train.lora.adapters.TARGET_PRESETS`;
the text encoders' projections), the difference W_tuned - W_base is cut by its SVD to the rank a
rule chooses (`train.lora.svd`, `train.lora.lowrank`), as sd-scripts' extract_lora_from_models.py
does. A text encoder is extracted only when it differs from the base by more than a threshold
(the relative Frobenius norm ||W_tuned - W_base|| / ||W_base|| over its modules): fine-tunes
often leave them untouched, and a LoRA of rounding noise only costs loading time. Both models
are read memory-mapped one module at a time (`train.model.weight_files`); each may be an SGM
single file or a diffusers folder.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from train.lora.adapters import TARGET_PRESETS, TEXT_ENCODER_TARGETS
from train.lora.convert import COMPONENTS
from train.lora.deltas import Delta, ModuleKey
from train.lora.lowrank import EnergyReport, low_rank, write_plain_lora
from train.lora.svd import RankRule
from train.model.weight_files import ModelFileError, ModelWeights

DEFAULT_TEXT_ENCODER_THRESHOLD = 1e-4


def _targeted(path: str, targets: list[str]) -> bool:
    # PEFT's rule: a target names the module's last path components.
    return any(path == t or path.endswith("." + t) for t in targets)


@dataclass
class ModulePair:
    key: ModuleKey
    base: object  # weight_files.Location in the base
    tuned: object  # and in the tuned model


def module_pairs(base: ModelWeights, tuned: ModelWeights, component: str, targets: list[str]) -> list[ModulePair]:
    """The targeted modules of `component` in both models, checked for equal shapes.

    Raises:
        ModelFileError: a module of the tuned model missing from the base, or of another shape.
    """
    pairs = []
    for path in sorted(p for p in tuned.modules(component) if _targeted(p, targets)):
        tuned_at, base_at = tuned.locate(component, path), base.locate(component, path)
        if base_at is None:
            raise ModelFileError(f"{base.source}: has no {component}.{path}, which {tuned.source} has "
                                 "(models of different architectures?)")
        if base.location_shape(base_at) != tuned.location_shape(tuned_at):
            raise ModelFileError(f"{tuned.source}: {component}.{path} ({tuned_at.key}): mismatched shapes: "
                                 f"{tuned.location_shape(tuned_at)} here, {base.location_shape(base_at)} in "
                                 f"{base.source}")
        pairs.append(ModulePair((component, path), base_at, tuned_at))
    return pairs


def _difference(base: ModelWeights, tuned: ModelWeights, pair: ModulePair) -> Delta:
    diff = tuned.read(pair.tuned).float() - base.read(pair.base).float()  # (out, in) or (out, in, kh, kw)
    return Delta(tuple(diff.shape), full=diff.reshape(diff.shape[0], -1))


def relative_change(base: ModelWeights, tuned: ModelWeights, pairs: list[ModulePair]) -> float:
    """||W_tuned - W_base||_F / ||W_base||_F over the modules' weights together."""
    change = norm = 0.0
    for pair in pairs:
        a, b = base.read(pair.base).double(), tuned.read(pair.tuned).double()
        change += float((b - a).square().sum())
        norm += float(a.square().sum())
    return math.sqrt(change / norm) if norm > 0 else math.inf


def extract(base_source: str | Path, tuned_source: str | Path, out_path: str | Path, rule: RankRule, *,
            preset: str = "attn-mlp", text_encoder_threshold: float = DEFAULT_TEXT_ENCODER_THRESHOLD,
            dtype: torch.dtype | None = torch.float16) -> EnergyReport:
    """Write the LoRA of `tuned - base` to `out_path`; returns the energy report (with a note per
    text encoder: kept or not, and its relative change).

    Raises:
        FileNotFoundError, ValueError (ModelFileError): unreadable models, different architectures
            or shapes, an output that is an input.
    """
    out_path = Path(out_path)
    if preset not in TARGET_PRESETS:
        raise ValueError(f"--preset {preset!r}: choose one of {', '.join(TARGET_PRESETS)}")
    base, tuned = ModelWeights(base_source), ModelWeights(tuned_source)
    for source in (base.source, tuned.source):
        if out_path.exists() and out_path.resolve() == source.resolve():
            raise ValueError(f"{out_path}: output would overwrite an input; choose another path")
    notes, pairs = [], module_pairs(base, tuned, "unet", TARGET_PRESETS[preset])
    if not pairs:
        raise ModelFileError(f"{tuned.source}: no UNet modules of preset {preset} found")
    for component in COMPONENTS[1:]:
        encoder = module_pairs(base, tuned, component, TEXT_ENCODER_TARGETS)
        change = relative_change(base, tuned, encoder) if encoder else 0.0
        kept = bool(encoder) and change > text_encoder_threshold
        notes.append(f"{component}: relative change {change:.3g} "
                     f"{'>' if kept else '<='} {text_encoder_threshold:g}: {'extracted' if kept else 'left out'}")
        pairs += encoder if kept else []

    def differences() -> Iterator[tuple[ModuleKey, Delta]]:
        for pair in pairs:
            yield pair.key, _difference(base, tuned, pair)

    weights, report = low_rank(differences(), rule)
    write_plain_lora(weights, out_path, dtype=dtype,
                     comment=f"extracted by animagine-lora lora extract: {tuned.source.name} - {base.source.name}",
                     metadata={"ss_sd_model_name": tuned.source.name})
    report.notes = notes
    report.sizes = {"out": out_path.stat().st_size}
    return report
