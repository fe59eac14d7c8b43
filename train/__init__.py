"""Training, model loading, LoRA files, generation, evaluation and the command line.

The flow, one subpackage per stage (the README draws it the same way)::

    prep/ ──► data/ ──► loop.py ──► lora/ ──► generate/ ──► evaluate/
    raw images   rows, latents,   the recipe:   adapters,    samples on    validation loss,
    → dataset    bucket batches,  builders +    WebUI and    Opt at the    grids, tag fidelity,
                 text encoding    one loop      diffusers    card's        the best checkpoint
                                                files        settings
                          model/: loading, SGM keys, the tiny SDXL, the quantized base

On top sit the command line (`cli.py`, `__main__.py`, `cache_cli.py`, `demo.py`), the config
schema (`config.py`), the loop (`loop.py`) and what the loop runs with (`runtime/`: optimizers,
checkpoints, tracking, speed switches, memory presets). Imports point down only: the top, then
`generate/` and `evaluate/`, then `lora/` and `data/`, then `model/`. `diffusion.py` is pure
math that imports nothing from `train`, so every layer may use it; `prep/` uses only
`captioning` and libraries.
"""
