"""The frozen SDXL base: loading, file layouts, the tiny test model, compressed storage.

`loading` (Hub id, diffusers folder or single `.safetensors` file), `sgm_keys` (diffusers ↔
single-file key maps), `weight_files` (a model's weights by module, memory-mapped, from either
layout), `tiny` (the real architecture at toy width, built from `sdxl_configs/`),
`quantize` (fp8 / NF4 frozen UNet). The bottom layer: imports nothing else from `train`.
"""
