"""`accelerate launch -m train CONFIG [--resume latest|PATH | --overwrite]`, also `animagine-lora train CONFIG`.

One process per GPU under `accelerate launch` (DDP, FSDP or DeepSpeed as `accelerate config`
chose); a plain `python -m train` runs one process.
"""

from __future__ import annotations

import argparse
import logging
import sys

from captioning.terminal import use_safe_formatter

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


def run(args: argparse.Namespace) -> int:
    from captioning.outputs import OutputError
    from train.config import ConfigError, load_config
    from train.loop import TrainingStopped, train

    try:
        config = load_config(args.config)
    except ConfigError as err:
        logger.error("%s", err)
        return 2
    try:
        if args.overwrite and args.resume:
            raise ValueError("--overwrite starts a fresh run; it cannot be combined with --resume")
        run_dir = train(config, resume=args.resume, overwrite=args.overwrite, resume_inexact=args.resume_inexact)
    except TrainingStopped as err:
        logger.error("%s", err)
        return 1
    except (OutputError, OSError, ValueError) as err:  # bad input: every message names the file or key
        logger.error("%s", err)
        return 2
    logger.info("done: LoRA files in %s", run_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    use_safe_formatter()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
