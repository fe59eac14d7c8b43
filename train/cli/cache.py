"""`animagine-lora cache CONFIG.toml | DATASET_DIR`: encode every image's latents ahead of training.

With a training config, the model, dataset, resolution scale and flip setting come from it; with a
prep OUT folder, pass `--model` (and optionally `--resolution-scale`, `--flip`). Rows of every
split are cached (validation rows too). Several GPUs split the work:
`accelerate launch -m train.cache_cli CONFIG.toml`. Already cached latents are skipped, so it is
safe to rerun; the trainer also caches whatever is missing on start.
"""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="training config .toml, or a prep OUT folder")
    parser.add_argument("--model", help="base model (Hub id, diffusers folder, .safetensors); for a folder source")
    parser.add_argument("--resolution-scale", type=float, default=None, help="as data.resolution_scale (default 1)")
    parser.add_argument("--flip", action="store_true", default=None, help="also cache horizontally flipped latents")
    parser.add_argument("--vae-dtype", choices=["fp32", "bf16"], default=None, help="VAE precision (default fp32)")


def _settings(args: argparse.Namespace):
    """(ModelConfig, dataset dir, scale, flip) from a config file or the options."""
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
    from accelerate import PartialState

    from train.config import ConfigError
    from train.data.latents import LatentCache, cache_latents
    from train.data.rows import load_rows
    from train.loop import build_model

    try:
        model, dataset, scale, flip = _settings(args)
        rows = [row for split in ("train", "val") for row in _split_rows(load_rows, dataset, split)]
        if not rows:
            raise ValueError(f"{dataset}: the dataset has no rows")
    except (ConfigError, FileNotFoundError, ValueError) as err:
        logger.error("%s", err)
        return 2
    state = PartialState()
    base = build_model(model, state.device)
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


def _split_rows(load_rows, dataset: str, split: str) -> list[dict]:
    try:
        return load_rows(dataset, split)
    except ValueError as err:
        if "no rows with split" in str(err):
            return []
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.cache_cli", description=__doc__.splitlines()[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
