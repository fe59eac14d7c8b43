"""Images from the base model with a LoRA, at the Animagine XL 4.0 card's settings.

`sampling` (pipeline, LoRA loading, grids, PNG output), `prompts` (card settings, prompt order),
`hook` (sample grids during training), `cli` (the `sample` command). May import `lora/`,
`data/` and `model/`, never `evaluate/`, `runtime/` or the loop.
"""
