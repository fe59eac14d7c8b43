"""LoRA adapters on the SDXL base and the files they are saved in.

`adapters` (PEFT LoRA/DoRA on the UNet and text encoders), `fused` (one-addmm LoRA forward),
`export` (WebUI/ComfyUI kohya file and diffusers folder), `convert` (the `convert` command).
May import `model/`, never `data/`, `generate/`, `evaluate/`, `runtime/` or the loop.
"""
