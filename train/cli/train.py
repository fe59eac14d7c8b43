"""`animagine-lora train CONFIG [--resume latest|PATH | --overwrite] [--check]`.

The same as `accelerate launch -m train CONFIG`: one process per GPU under `accelerate launch`
(DDP, FSDP or DeepSpeed as `accelerate config` chose), one process otherwise. `--check` validates
the config and says what the run would do (model, dataset, steps, adapter, output folder) without
loading anything heavy.
"""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training config .toml (see configs/)")
    parser.add_argument("--resume", metavar="latest|PATH",
                        help="continue from the newest complete checkpoint in output.dir, or from PATH")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh even if output.dir holds another run: its files are moved into "
                             "output.dir/replaced-DATE-TIME/ (nothing is deleted)")
    parser.add_argument("--resume-inexact", action="store_true",
                        help="resume even from a checkpoint without its random-state files (not bit-exact)")
    parser.add_argument("--check", action="store_true",
                        help="validate the config, say what the run would do, and exit (loads no model)")


def run(args: argparse.Namespace) -> int:
    from train.config import ConfigError, load_config

    if args.overwrite and args.resume:
        logger.error("--overwrite starts a fresh run; it cannot be combined with --resume")
        return 2
    try:
        config = load_config(args.config)
    except ConfigError as err:
        logger.error("%s", err)
        return 2
    if args.check:
        from train.preflight import train_plan

        plan = train_plan(config, resume=args.resume, overwrite=args.overwrite)
        print(f"{args.config}: valid\n{plan.render()}")
        return 2 if plan.problems else 0
    return _train(config, args)


def _train(config, args: argparse.Namespace) -> int:
    from train.loop import train
    from train.runtime.nonfinite import TrainingStopped

    try:
        run_dir = train(config, resume=args.resume, overwrite=args.overwrite, resume_inexact=args.resume_inexact)
    except TrainingStopped as err:
        logger.error("%s", err)
        return 1
    except (OSError, ValueError) as err:  # bad input: every message names the file or key
        logger.error("%s", err)
        return 2
    logger.info("done: LoRA files in %s", run_dir)
    return 0
