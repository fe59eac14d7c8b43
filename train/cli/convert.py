"""`animagine-lora convert IN OUT`: convert SDXL LoRA files between the WebUI and diffusers formats.

Reads a kohya/WebUI file (diffusers or original SGM block names, as sd-scripts writes) or a
diffusers `pytorch_lora_weights.safetensors` (file or its folder), and writes the other format
(or `--to` the one asked for); a LyCORIS LoKr file converts to diffusers. See `train.lora.convert`.

Examples:
    animagine-lora convert my_lora.safetensors my_lora_diffusers/            # WebUI -> diffusers
    animagine-lora convert my_lora_diffusers/ my_lora.safetensors --alpha 8  # diffusers -> WebUI
    animagine-lora convert sd_scripts.safetensors renamed.safetensors --to webui  # SGM -> diffusers names
"""

from __future__ import annotations

import argparse
import logging

from train.names import DTYPE_NAMES

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="LoRA .safetensors (WebUI or diffusers) or a diffusers LoRA folder")
    parser.add_argument("output", help="a .safetensors file (webui) or a folder (diffusers)")
    parser.add_argument("--to", choices=("webui", "diffusers"), help="default: the other format")
    parser.add_argument("--alpha", type=float,
                        help="training alpha for modules whose file does not record one (default: r)")
    parser.add_argument("--dtype", choices=("keep", *DTYPE_NAMES), default="keep", help="tensor dtype of the output")
    parser.add_argument("--resolution", type=int, default=1024, help="training resolution for WebUI metadata")


def run(args: argparse.Namespace) -> int:
    from train.lora.convert import convert
    from train.model.loading import TORCH_DTYPES

    try:
        out = convert(args.input, args.output, to=args.to, alpha=args.alpha,
                      dtype=TORCH_DTYPES.get(args.dtype), resolution=args.resolution)
    except (FileNotFoundError, ValueError) as err:
        logger.error("%s", err)
        return 1
    logger.info("wrote %s", out)
    return 0
