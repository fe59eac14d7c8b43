"""Memory presets: the settings that fit a LoRA run at 1024² into a GPU of a given size.

Each preset is a set of config overrides (TOML path -> value), the same keys a user would edit by
hand: `[train] batch_size`, `gradient_accumulation_steps`, `gradient_checkpointing`,
`[optimizer] name`, `[model] quantize`, `[data] cache_text_outputs`. Every preset keeps an
effective batch of 8 through accumulation, so switching cards does not change the recipe.

What uses memory at 1024², SDXL UNet, attn-mlp r32 (bench/RESULTS.md, "The work and the ceiling"):
- the frozen weights: 4.88 GiB in bf16, about 2.5 in fp8, 1.8 with NF4 linears and fp8 convs;
- activations: about 1 GiB per image with gradient checkpointing, many times that without;
- the LoRA: fp32 weights, gradients and AdamW's two moments (8-bit moments with adamw8bit);
- outside the UNet step: the CUDA context (about 0.5-0.8 GiB) and the text encoders (1.52 GiB in
  bf16, counted as 1.6) unless `data.cache_text_outputs` sends them to the CPU.

`python bench/train_step.py --presets` measures each preset's peak UNet training memory
(`torch.cuda.max_memory_allocated`) on the exact SDXL UNet and checks it against `unet_budget_gib`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class MemoryPreset:
    name: str
    card_gib: int  # the card's memory
    unet_budget_gib: float  # what the UNet step may peak at: the card less context and text encoders
    overrides: dict[str, object] = field(default_factory=dict)  # "section.key" -> value

    def section(self, name: str) -> dict[str, object]:
        """The overrides of one TOML table, e.g. section("train") -> {"batch_size": 4, ...}."""
        prefix = f"{name}."
        return {key[len(prefix):]: value for key, value in self.overrides.items() if key.startswith(prefix)}


def _preset(name: str, card_gib: int, budget: float, *, batch: int, quantize: str, optimizer: str,
            checkpointing: bool = True, cache_text: bool = False) -> MemoryPreset:
    return MemoryPreset(name, card_gib, budget, {
        "train.batch_size": batch,
        "train.gradient_accumulation_steps": 8 // batch,
        "train.gradient_checkpointing": checkpointing,
        "optimizer.name": optimizer,
        "model.quantize": quantize,
        "data.cache_text_outputs": cache_text,
    })


# Budgets: the card less ~0.8 GiB of CUDA context and, where they stay on the GPU, the bf16 text
# encoders (1.52 GiB, counted as 1.6). The 4 and 8 GB presets cache text outputs (no caption shuffle), which sends
# the encoders to the CPU once every caption is encoded; the VAE leaves the GPU after caching.
MEMORY_PRESETS: dict[str, MemoryPreset] = {p.name: p for p in (
    _preset("4gb", 4, 3.2, batch=1, quantize="nf4", optimizer="adamw8bit", cache_text=True),
    _preset("8gb", 8, 7.0, batch=1, quantize="fp8", optimizer="adamw8bit", cache_text=True),
    _preset("12gb", 12, 9.5, batch=2, quantize="none", optimizer="adamw8bit"),
    _preset("16gb", 16, 13.5, batch=4, quantize="none", optimizer="adamw"),
    _preset("24gb", 24, 21.5, batch=8, quantize="none", optimizer="adamw"),
)}

