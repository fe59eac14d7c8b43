"""The frozen SDXL base: loading, file layouts, the test models, compressed storage.

`loading` (Hub id, diffusers folder or single `.safetensors` file), `sgm_keys` (diffusers ↔
single-file key maps), `weight_files` (a model's weights by module, memory-mapped, from either
layout), `tiny` (the real architecture at toy width, built from `sdxl_configs/`), `random_sdxl`
(the exact architecture with seeded random weights, as one SGM file), `quantize` (fp8 / NF4 frozen
UNet), `prediction` (what the model predicts, ε or v, and on which noise schedule: read from the
model, or the config's override). The bottom layer: imports nothing else from `train`.
"""
