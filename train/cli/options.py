"""Command-line options more than one subcommand takes, and the bounds of numbers on the command line.

Outside the bounds a run only burns time or memory (steps, batch, size) or gives garbage images
with exit 0 (a NaN or infinite cfg or strength), so they are refused when parsed.
"""

from __future__ import annotations

import argparse
import math

from train.names import NOISE_DEVICES, PREDICTION_TYPES, SAMPLER_CHOICES, SCHEDULERS

MAX_STEPS = 1000
MAX_BATCH_SIZE = 64
MAX_CFG = 100.0
MAX_STRENGTH = 10.0  # negative strengths are legitimate (slider LoRAs), so the bound is |s|
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range; WebUI seeds are 0 .. 2**32 - 1


def bounded_int(low: int, high: int):
    """An argparse `type` accepting integers in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}")
        return value

    return parse


def bounded_float(low: float, high: float):
    """An argparse `type` accepting finite numbers in [low, high] (no nan, no inf)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"{text} must be a finite number in {low:g}..{high:g}")
        return value

    return parse


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    """--sampler, --scheduler, --noise-device (shared by `sample` and `eval`)."""
    parser.add_argument("--sampler", choices=SAMPLER_CHOICES, default="euler_ancestral",
                        help="ComfyUI's sampler names (default euler_ancestral, the card's Euler a); "
                             "diffusers-euler-a: diffusers' pipeline scheduler instead")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="normal", help="ComfyUI's scheduler (default normal)")
    parser.add_argument("--noise-device", choices=NOISE_DEVICES, default="gpu",
                        help="ancestral noise generator: gpu = the sampling device, as ComfyUI (default); "
                             "cpu = the same images on any machine")


def add_prediction_arguments(parser: argparse.ArgumentParser) -> None:
    """--prediction-type, --zero-terminal-snr (shared by `sample` and `eval`): what the base model
    predicts, read from the model by default as training reads it (`train.model.prediction`)."""
    parser.add_argument("--prediction-type", choices=("auto", *PREDICTION_TYPES), default="auto",
                        help="auto (default): the model's scheduler config, or a single file's v_pred key; "
                             "set it as model.prediction_type was set for training when that was not auto")
    parser.add_argument("--zero-terminal-snr", choices=("auto", "true", "false"), default="auto",
                        help="auto (default): as the model says (ztsnr key, rescale_betas_zero_snr); "
                             "as train.zero_terminal_snr was set for training otherwise")


def zero_terminal_snr_choice(value: str) -> bool | str:
    """`--zero-terminal-snr` as `load_base_model` takes it: "auto", True or False."""
    return value if value == "auto" else value == "true"
