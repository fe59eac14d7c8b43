"""Block-wise LoRA settings for the SDXL UNet: which block a module is in, its rank, alpha and lr.

sd-scripts numbers SDXL's UNet blocks by their original SGM names (networks/lora.py,
`get_block_index`): `input_blocks.N` is down block N (0-8), `middle_block.N` mid block N (0-2),
`output_blocks.N` up block N (0-8); the time and label embeddings and the output layer belong to no
block (our target presets never adapt them). Its `block_dims` / `block_alphas` (23 entries with
those two) and `down_lr_weight` / `mid_lr_weight` / `up_lr_weight` are the config's
`lora.block_dims`, `lora.block_alphas` and `lora.block_lr` (`train.config.BlockValues`), and a
block whose rank or lr multiplier is 0 has no LoRA modules (sd-scripts' `remove_block_dims_and_alphas`).

Modules are mapped through `train.model.sgm_keys.unet_module_map`, so the numbering follows the
UNet's config (the tiny test UNet has fewer blocks, each still named as SDXL's would be).

Ranks and alphas reach PEFT as `rank_pattern` / `alpha_pattern` (full module paths, the keys
diffusers and our converter read back) and `exclude_modules` (rank 0); the kohya export then
writes each module's own `.alpha` and its rank is its tensors' shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from train.config import BlockValues
from train.config import LoraConfig as AdapterSettings
from train.model import sgm_keys

SGM_PARTS = {"input_blocks": "down", "middle_block": "mid", "output_blocks": "up"}


def unet_block(module_path: str, block_map: dict[str, str]) -> tuple[str, int] | None:
    """("down" | "mid" | "up", index) of a diffusers UNet module path, or None outside the blocks.

    `block_map` is `sgm_keys.unet_module_map(unet.config)`.
    """
    try:
        sgm = sgm_keys.unet_module_name_to_sgm(module_path, block_map)
    except KeyError:
        return None
    head, _, rest = sgm.partition(".")
    part = SGM_PARTS.get(head)
    if part is None:
        return None
    return part, int(rest.split(".", 1)[0])


def block_value(values: BlockValues | None, block: tuple[str, int] | None, default: float) -> float:
    """The value `values` gives `block` (a (part, index) pair), or `default` where it gives none."""
    if values is None or block is None:
        return default
    per_block = values.per_block(block[0])
    return default if per_block is None else per_block[block[1]]


@dataclass
class BlockLayout:
    """Per-module rank and alpha where they differ from the `[lora]` table's, and the modules left out."""

    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)


def unet_block_layout(module_paths: list[str], unet_config: dict, spec: AdapterSettings) -> BlockLayout:
    """Rank, alpha and presence of each targeted UNet module under `spec`'s block settings.

    A module is left out where its block's rank (`block_dims`) or lr multiplier (`block_lr`) is 0.

    Args:
        module_paths: the paths of the modules the preset targets.
        unet_config: the UNet's config dict (for the SGM block numbering).
    """
    layout = BlockLayout()
    if spec.block_dims is None and spec.block_alphas is None and spec.block_lr is None:
        return layout
    block_map = sgm_keys.unet_module_map(dict(unet_config))
    for path in module_paths:
        block = unet_block(path, block_map)
        rank = int(block_value(spec.block_dims, block, spec.rank))
        if rank == 0 or block_value(spec.block_lr, block, 1.0) == 0:
            layout.excluded.append(path)
            continue
        alpha = block_value(spec.block_alphas, block, spec.alpha)
        if rank != spec.rank:
            layout.rank_pattern[path] = rank
        if alpha != spec.alpha:
            layout.alpha_pattern[path] = alpha
    return layout


def lr_multipliers(module_paths: list[str], unet_config: dict, block_lr: BlockValues | None) -> dict[str, float]:
    """Module path -> lr multiplier of its block (1 outside the blocks, or everywhere without `block_lr`)."""
    if block_lr is None:
        return {path: 1.0 for path in module_paths}
    block_map = sgm_keys.unet_module_map(dict(unet_config))
    return {path: block_value(block_lr, unet_block(path, block_map), 1.0) for path in module_paths}


def multiplier_of(param_name: str, multipliers: dict[str, float]) -> float:
    """The lr multiplier of a parameter (`<module path>.lora_A.default.weight`, `<path>.lokr_w1`,
    ...) from `lr_multipliers`' table: that of the longest module path it lies in (1 if none)."""
    path = param_name
    while path:
        if path in multipliers:
            return multipliers[path]
        path = path.rpartition(".")[0]
    return 1.0
