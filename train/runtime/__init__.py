"""What the training loop runs with, beside the model and the data.

`optim` (optimizer and schedule tables, parameter groups), `checkpoint` (train state, atomic checkpoints, resume),
`state_files` (resume state as JSON + safetensors, never pickles), `run_dir` (one run per output
folder: lock, refusal, `--overwrite`),
`tracking` (metrics, draws, trackers), `speed` (the `[speed]` switches), `memory_presets` (settings
per GPU size, and their cost at larger training sizes), `nonfinite` (stopping on a NaN loss or out of memory), `ema` (the LoRA weights'
moving average). Used by the loop and the command line; may import `lora/`, `data/` and `model/`.
"""
