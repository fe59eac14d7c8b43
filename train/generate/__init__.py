"""Images from the base model with a LoRA, at the Animagine XL 4.0 card's settings.

`sampling` (pipeline, LoRA loading, generate, grids, PNG output), `comfy_sampling` (ComfyUI's
KSampler loop over the UNet) and `k_samplers` (its sigmas, schedulers and samplers), `prompts`
(the card's prompt order and quality tail), `emphasis` (the `(tag:1.2)` syntax) and `prompt_encoding` (weighted
embeddings), `workflow` (the ComfyUI API graph), `hook` (sample grids during training). May import
`lora/`, `data/` and `model/`, never `evaluate/`, `runtime/` or the loop.
"""
