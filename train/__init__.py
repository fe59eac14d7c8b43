"""Training, model loading, LoRA files, generation, evaluation and the command line.

The flow, one subpackage per stage (the README draws it the same way)::

    prep/ ──► data/ ──► loop.py ──► lora/ ──► generate/ ──► evaluate/
    raw images   rows, latents,   the recipe:   adapters,    samples on    validation loss,
    → dataset    bucket batches,  setup + one   WebUI and    Opt at the    grids, tag fidelity,
                 text encoding    loop          diffusers    card's        the best checkpoint
                                                files        settings
                          model/: loading, SGM keys, the tiny SDXL, the quantized base

On top sit the command line (`cli/`, one module per subcommand; `python -m train` is `train`), the
recipe (`loop.py`, with the loss of a micro-batch in `loss.py`), the `--check` preflight
(`preflight.py`), the sd-scripts / kohya_ss recipe importer (`recipe_import.py`) and what the loop runs with (`runtime/`: optimizers, checkpoints, tracking, speed
switches, memory presets). Imports point down only (tests/test_layout.py): the top, then
`runtime/`, then `evaluate/`, then `generate/`, then `lora/` and `data/`, then `model/`. Below
everything, importable from every layer: `names.py` (the contracts every layer shares: repository
ids, sampler names, dataset columns, checkpoint names; no imports), `config.py` (the config schema;
pydantic and `names` only), `diffusion.py` (pure math) and `tensor_files.py` (safetensors written
atomically). `prep/` uses only `captioning`, those and libraries.
"""
