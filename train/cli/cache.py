"""`animagine-lora cache CONFIG.toml | DATASET_DIR [--check]`: encode every image's latents ahead of training.

With a training config, the model, dataset, resolution scale and flip setting come from it; with a
prep OUT folder, pass `--model` (and optionally `--resolution-scale`, `--flip`). Rows of every
split are cached (validation rows too). Several GPUs split the work:
`accelerate launch -m train.cli cache CONFIG.toml`. Already cached latents are skipped, so it is
safe to rerun; the trainer also caches whatever is missing on start.
"""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="training config .toml, or a prep OUT folder")
    parser.add_argument("--model", help="base model (Hub id, diffusers folder, .safetensors); for a folder source")
    parser.add_argument("--resolution-scale", type=float, default=None, help="as data.resolution_scale (default 1)")
    parser.add_argument("--flip", action="store_true", default=None, help="also cache horizontally flipped latents")
    parser.add_argument("--vae-dtype", choices=["fp32", "bf16"], default=None, help="VAE precision (default fp32)")
    parser.add_argument("--check", action="store_true", help="say what would be encoded and exit (loads no model)")


def _settings(args: argparse.Namespace):
    """(ModelConfig, dataset dir, scale, flip) from a config file or the options.

    Raises:
        ConfigError: the config cannot be used.
        ValueError: a dataset folder without --model.
    """
    from train.config import ModelConfig, load_config

    if args.source.endswith(".toml"):
        config = load_config(args.source)
        model = config.model
        if args.model:
            model = model.model_copy(update={"source": args.model})
        scale = args.resolution_scale or config.data.resolution_scale
        flip = config.data.flip if args.flip is None else args.flip
        dataset = config.data.dataset
    else:
        if not args.model:
            raise ValueError(f"{args.source}: a dataset folder needs --model (or pass a training config)")
        model, dataset = ModelConfig(source=args.model), args.source
        scale, flip = args.resolution_scale or 1.0, bool(args.flip)
    if args.vae_dtype:
        model = model.model_copy(update={"vae_dtype": args.vae_dtype})
    return model, dataset, scale, flip


def run(args: argparse.Namespace) -> int:
    try:
        model, dataset, scale, flip = _settings(args)
    except ValueError as err:  # ConfigError is a ValueError
        logger.error("%s", err)
        return 2
    if args.check:
        from train.preflight import cache_plan

        plan = cache_plan(model, dataset, scale=scale, flip=flip)
        print(plan.render())
        return 2 if plan.problems else 0
    return _cache(model, dataset, scale, flip)


def _cache(model, dataset: str, scale: float, flip: bool) -> int:
    from accelerate import PartialState

    from train.data.latents import LatentCache, cache_latents
    from train.data.rows import load_rows
    from train.model.loading import load_model

    try:
        rows = load_rows(dataset, split=None)  # every split: validation rows are cached too
    except (FileNotFoundError, ValueError) as err:
        logger.error("%s", err)
        return 2
    state = PartialState()
    base = load_model(model, state.device)
    cache = LatentCache(dataset, base.vae_fingerprint, base.vae.config.scaling_factor, scale)
    try:
        encoded = cache_latents(rows, base.vae, cache, flip=flip, rank=state.process_index,
                                world_size=state.num_processes, progress=state.is_local_main_process)
    except OSError as err:  # names the image and its dataset row
        logger.error("%s", err)
        return 2
    state.wait_for_everyone()
    logger.info("process %d encoded %d latents; cache: %s", state.process_index, encoded, cache.root)
    return 0
