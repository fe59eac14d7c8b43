"""LoRA adapters on the SDXL base and the files they are saved in.

`adapters` (PEFT LoRA/DoRA, LoKr and LoHa on the UNet and text encoders), `blocks` (sd-scripts'
UNet block numbering: block-wise rank, alpha and lr), `dropout` (sd-scripts' neuron, rank and
module dropout), `fused` (one-addmm LoRA forward), `export` (WebUI/ComfyUI kohya or LyCORIS file and diffusers folder, a run's exporter), `convert`
(WebUI <-> diffusers) with `lycoris_convert` (LoKr file -> diffusers), `files` (reading LoRA
files from elsewhere safely).
May import `model/`, never `data/`, `generate/`, `evaluate/`, `runtime/` or the loop.
"""
