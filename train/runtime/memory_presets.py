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

Larger training sizes (prep's `--max-area`, `data.resolution_scale` above 1) cost activations:
`activation_gib` estimates them from the 1 GiB per image at 1024² above, in proportion to the area
(with SDPA's memory-efficient attention, activation memory is linear in latent pixels), and
`at_area` gives a preset's settings at a larger area: a smaller batch with more accumulation
(the same effective batch of 8), and how much more than at 1024² the step needs when even batch
1 does not fit in what the preset spends on activations there. These are estimates, not
measurements.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from train.names import CARD_AREA


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



# Square sides of the sizes users train at; a bucket of the same area costs the same.
TRAINING_SIDES = (1024, 1152, 1280, 1408, 1536)
ACTIVATION_GIB_PER_IMAGE = 1.0  # at 1024², gradient checkpointing on (see the module docstring)


def activation_gib(area: int, batch: int = 1) -> float:
    """Estimated activation memory of a UNet training step on `batch` images of `area` pixels (GiB)."""
    return ACTIVATION_GIB_PER_IMAGE * batch * area / CARD_AREA


@dataclass(frozen=True)
class SizedPreset:
    """A memory preset's settings at a training area, and what it needs beyond its 1024² budget."""

    preset: MemoryPreset  # with train.batch_size / gradient_accumulation_steps for this area
    area: int
    extra_gib: float  # activation memory beyond what the preset spends at 1024² (0: it fits)


def at_area(preset: MemoryPreset, area: int) -> SizedPreset:
    """`preset` for images of `area` pixels: the batch halved (accumulation doubled, so the
    effective batch stays 8) until its activations fit in what the preset spends on them at
    1024²; at batch 1, the GiB still missing."""
    base = int(preset.overrides["train.batch_size"])
    allowed = activation_gib(CARD_AREA, base)
    batch = base
    while batch > 1 and activation_gib(area, batch) > allowed + 1e-9:
        batch //= 2
    effective = base * int(preset.overrides["train.gradient_accumulation_steps"])
    overrides = {**preset.overrides, "train.batch_size": batch, "train.gradient_accumulation_steps": effective // batch}
    return SizedPreset(dataclasses.replace(preset, overrides=overrides), area,
                       max(0.0, activation_gib(area, batch) - allowed))
