"""Checkpoints compared side by side: validation loss, grids, tag fidelity, a recommendation.

`validation` (deterministic fixed-noise loss), `compare` (discover checkpoints, score, recommend),
`report` (table, CSV, JSON, plots, HTML), `clip_score` (optional CLIP scores). May import `generate/`, `lora/`, `data/` and `model/`, never `runtime/` or the loop.
"""
