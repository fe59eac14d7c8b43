"""LoRA adapters on the SDXL base and the files they are saved in.

`adapters` (PEFT LoRA/DoRA, LoKr and LoHa on the UNet and text encoders), `blocks` (sd-scripts'
UNet block numbering: block-wise rank, alpha and lr), `dropout` (sd-scripts' neuron, rank and
module dropout), `fused` (one-addmm LoRA forward), `export` (WebUI/ComfyUI kohya or LyCORIS file
and diffusers folder, a run's exporter), `convert` (WebUI <-> diffusers) with `lycoris_convert`
(LoKr file -> diffusers; LoKr/LoHa files -> PEFT adapters), `files` (reading LoRA files from
elsewhere safely). The LoRA tools: `deltas` (what any LoRA file adds to each layer), `svd`
(truncation and kept energy), `lowrank` (deltas -> a plain LoRA of chosen rank, the energy table),
`resize`, `merge`, `bake` (merging into a base model) and `extract`.
May import `model/`, never `data/`, `generate/`, `evaluate/`, `runtime/` or the loop.
"""
