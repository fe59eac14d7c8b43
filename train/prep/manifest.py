"""`OUT/manifest.json`: the marker of a prep output, and what prep decided that later stages use.

Prep writes it into every output folder: `format` is how prep recognises a folder it may replace
(nothing else is taken as ours: a folder that merely holds a `report.json` may be the user's),
and `trigger_features` records, per character (or trigger) tag, the general tags folded into it
(captioning.curation), so the trainer can write them into the LoRA's metadata
(`train.lora.trigger`) and `sample` can say what a trigger already means. No torch or datasets
import here: the trainer and `sample` read it cheaply.
"""

from __future__ import annotations

import json
from pathlib import Path

from captioning import outputs
from train.names import PREP_MANIFEST

MANIFEST_FORMAT = "animagine-lora prep"


def write_manifest(folder: Path, format_version: int, trigger_features: dict[str, list[str]]) -> None:
    manifest = {"format": MANIFEST_FORMAT, "format_version": format_version,
                "trigger_features": trigger_features}
    outputs.write_text(folder / PREP_MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def read_manifest(out: str | Path) -> dict | None:
    """The manifest of a prep output, or None when `out` is not one (any format version)."""
    try:
        manifest = json.loads((Path(out) / PREP_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT:
        return manifest
    return None


def is_prep_output(out: str | Path) -> bool:
    """Whether `out` holds the manifest prep writes (any format version: a re-prep upgrades it)."""
    return read_manifest(out) is not None


def trigger_features(out: str | Path) -> dict[str, list[str]]:
    """{trigger tag: [tags folded into it]} recorded by prep in `out` (display forms); empty for
    an output that folded nothing, or that was prepped before folding existed."""
    manifest = read_manifest(out) or {}
    found = manifest.get("trigger_features")
    if not isinstance(found, dict):
        return {}
    return {str(k): [str(t) for t in v] for k, v in found.items() if isinstance(v, list)}
