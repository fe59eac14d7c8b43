"""`accelerate launch -m train CONFIG [--resume latest|PATH]`, also `animagine-lora train CONFIG`.

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
        run_dir = train(config, resume=args.resume)
    except TrainingStopped as err:
        logger.error("%s", err)
        return 1
    except OutputError as err:
        logger.error("%s", err)
        return 2
    except (FileNotFoundError, ValueError) as err:
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
