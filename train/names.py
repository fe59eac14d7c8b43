"""The names every layer agrees on, written once: no torch, no diffusers, no I/O.

What lives here is a contract between modules that would otherwise each keep a copy: the model
repositories and the model card's settings, the sampler and scheduler names, the precision names,
the prepped dataset's columns, the checkpoint folder name. Importing this module costs nothing, so
the config schema (`train.config`) and the command line use it without loading torch. Where a
table here must match an implementation (the sampler names against `train.generate.k_samplers`),
a test says so.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------- models

ZERO_REPO = "cagliostrolab/animagine-xl-4.0-zero"  # the pretrained base: what LoRAs are trained on
OPT_REPO = "cagliostrolab/animagine-xl-4.0"  # the refined model (its diffusers folders are Opt)
OPT_FILE = "animagine-xl-4.0-opt.safetensors"  # the Opt single file in OPT_REPO
ZERO_FILE = "animagine-xl-4.0-zero.safetensors"  # the Zero single file in ZERO_REPO
# `--model` / `sample.opt_model` aliases -> Hub ids; "opt-file" is the Opt single file, downloaded.
MODEL_ALIASES = {"opt": OPT_REPO, "zero": ZERO_REPO}
OPT_FILE_ALIAS = "opt-file"
# The component configs of SDXL, shipped: a single-file model without `config_dir` is read with these.
SDXL_CONFIG_DIR = Path(__file__).resolve().parent / "model" / "sdxl_configs"


def looks_like_path(source: str) -> bool:
    """True when a model source names a file or folder rather than a Hub id ("owner/name") or an
    alias ("opt"): it starts with `.`, `/` or `~`, has a backslash, or ends in a checkpoint suffix.

    A bare relative name such as `models/zero` reads as a Hub id; callers that can look at the
    disk treat an existing path as a path whatever its form (`train.model.loading`).
    """
    return source.startswith((".", "/", "~")) or source.endswith((".safetensors", ".ckpt")) or "\\" in source


# ---------------------------------------------------------------- the model card's settings

CARD_STEPS = 28
CARD_CFG = 5.0
CARD_NEGATIVE = (
    "lowres, bad anatomy, bad hands, text, error, missing finger, extra digits, fewer digits, cropped, "
    "worst quality, low quality, low score, bad score, average score, signature, watermark, username, blurry"
)
# (width, height), from the model card.
CARD_RESOLUTIONS = (
    (1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216),
    (1344, 768), (768, 1344), (1536, 640), (640, 1536),
)
CARD_AREA = 1024 * 1024  # the card's training area: every bucket above is about this many pixels
SIZE_ALIASES = {"square": (1024, 1024), "portrait": (832, 1216), "landscape": (1216, 832)}
MAX_SIDE = 4096  # 4x SDXL's training side: beyond it memory explodes and images are noise


def scale_bucket(width: int, height: int, scale: float, step: int = 64) -> tuple[int, int]:
    """A bucket (width, height) scaled to `scale`² times its area, on the `step` grid.

    Of the grid sizes near (width * scale, height * scale) whose area is at most
    width * height * scale², the one closest in aspect ratio (log space) to width / height, the
    larger on a tie: the card's 1152x896 at scale 1.25 is 1408x1088 (and 896x1152 is 1088x1408). A
    bucket on the grid is returned unchanged at scale 1. Used by prep's `--max-area` and by `data.resolution_scale` > 1.
    """
    if width < height:  # portrait buckets mirror landscape ones exactly
        return scale_bucket(height, width, scale, step)[::-1]
    target = width * height * scale * scale
    aspect = math.log(width / height)
    candidates = []
    for k in range(-1, 3):
        w = (int(width * scale // step) + k) * step
        if w < step:
            continue
        h_max = int(target // w // step) * step
        candidates += [(w, h) for h in (h_max, h_max - step) if h >= step]
    if not candidates:
        raise ValueError(f"bucket {width}x{height} at scale {scale}: smaller than one {step}-pixel step")
    return min(candidates, key=lambda b: (round(abs(math.log(b[0] / b[1]) - aspect), 9), -b[0] * b[1]))


def parse_size(text: str) -> tuple[int, int]:
    """`"832x1216"`, `"portrait"`, `"landscape"` or `"square"` -> (width, height).

    Sizes off the card's table are allowed (tests use 64x64) but logged: the model degrades there.

    Raises:
        ValueError: not WxH with positive multiples of 8 up to MAX_SIDE, nor an alias.
    """
    key = text.strip().lower()
    if key in SIZE_ALIASES:
        return SIZE_ALIASES[key]
    parts = key.split("x")
    try:
        width, height = (int(p) for p in parts)
    except ValueError:
        raise ValueError(
            f"size {text!r}: expected WIDTHxHEIGHT (e.g. 832x1216) or one of {sorted(SIZE_ALIASES)}"
        ) from None
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise ValueError(f"size {text!r}: width and height must be positive multiples of 8 (the VAE's factor)")
    if max(width, height) > MAX_SIDE:
        raise ValueError(f"size {text!r}: at most {MAX_SIDE} pixels a side (SDXL is trained near 1024x1024)")
    if (width, height) not in CARD_RESOLUTIONS:
        logger.info("size %dx%d is not in the model card's resolution table", width, height)
    return width, height


# ---------------------------------------------------------------- UNet blocks

# sd-scripts' block-wise settings (`down_lr_weight`, `block_dims`, ...) index the SDXL UNet's SGM
# blocks: input_blocks.0-8 ("down"), middle_block.0-2 ("mid"), output_blocks.0-8 ("up"); the
# `lora.block_*` keys take lists of these lengths (implemented by train.lora.blocks).
UNET_BLOCK_COUNTS = {"down": 9, "mid": 3, "up": 9}


# ---------------------------------------------------------------- sampling

# ComfyUI's sampler and scheduler names, implemented by train.generate.k_samplers (a test checks).
SAMPLERS = ("euler_ancestral", "euler", "dpmpp_2m")
SCHEDULERS = ("normal", "karras")
DIFFUSERS_SAMPLER = "diffusers-euler-a"  # diffusers' own pipeline scheduler instead of ComfyUI's loop
SAMPLER_CHOICES = (*SAMPLERS, DIFFUSERS_SAMPLER)
NOISE_DEVICES = ("gpu", "cpu")  # where ancestral noise is drawn: the sampling device (ComfyUI) or the CPU
# The validation loss's timesteps: each held-out image is noised at every one of these.
VALIDATION_TIMESTEPS = (100, 300, 500, 700, 900)

# ---------------------------------------------------------------- the training loss

PREDICTION_TYPES = ("epsilon", "v_prediction")  # what the UNet predicts (train.diffusion.training_target)
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")  # sd-scripts' --loss_type (train.diffusion.elementwise_loss)
HUBER_SCHEDULES = ("snr", "exponential", "constant")  # sd-scripts' --huber_schedule (train.diffusion.huber_threshold)
# Top-level keys of a single-file checkpoint marking a v-prediction model and its zero-terminal-SNR
# schedule (NoobAI-XL v-pred carries both; ComfyUI's SDXL loader reads them, `ztsnr` only with `v_pred`).
V_PRED_KEY = "v_pred"
ZTSNR_KEY = "ztsnr"

# ---------------------------------------------------------------- precision

DTYPE_NAMES = ("bf16", "fp16", "fp32")  # train.model.loading.TORCH_DTYPES maps them to torch dtypes

# ---------------------------------------------------------------- the prepped dataset

# Written by `animagine-lora prep` (train.prep.writer), read by the trainer (train.data.rows) and
# `eval`: column -> Arrow type ("list" is a list of strings).
DATASET_COLUMNS: dict[str, str] = {
    "id": "string",
    "image_path": "string",
    "sha256": "string",
    "width": "int32",
    "height": "int32",
    "bucket_width": "int32",
    "bucket_height": "int32",
    "resize_width": "int32",
    "resize_height": "int32",
    "crop_left": "int32",
    "crop_top": "int32",
    "caption_head": "list",
    "caption_body": "list",
    "caption_tail": "list",
    "repeats": "int32",
    "rating": "string",
    "score": "int64",
    "year": "int32",
    "source": "string",
    "split": "string",
    "metadata": "string",
    # The loss mask (train.masked_loss): the image itself when it has alpha, its `name.mask.png`,
    # or null. The trainer composites alpha images on white as always and reads the mask from here.
    "mask_path": "string",
}
# Columns the trainer needs; the others are optional (datasets prepped before them read as None).
TRAINING_COLUMNS = ("id", "image_path", "sha256", "width", "height", "bucket_width", "bucket_height",
                    "resize_width", "resize_height", "crop_left", "crop_top",
                    "caption_head", "caption_body", "caption_tail", "repeats", "source", "split")
OPTIONAL_TRAINING_COLUMNS = ("mask_path",)
DATASET_DIR = "dataset"  # the Arrow dataset inside prep's OUT folder
PREP_MANIFEST = "manifest.json"  # marks a folder prep wrote (prep refuses to replace any other)

# ---------------------------------------------------------------- training runs

CHECKPOINT_DIR_RE = re.compile(r"^checkpoint-(\d{6,})$")  # RUN/checkpoint-000123
CHECKPOINT_COMPLETE = "train_state.json"  # written last: a checkpoint without it is incomplete


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"
