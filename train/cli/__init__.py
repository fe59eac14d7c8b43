"""The `animagine-lora` command line: one subcommand per stage, one module per subcommand.

Each module here (`caption.py`, `prep.py`, `train.py`, ...) exposes `add_arguments(parser)` and
`run(args) -> int` (0 done, 1 done with problems, 2 bad input), and nothing else reads `argparse`:
the library modules take typed arguments. Only the chosen subcommand's module is imported, so
`animagine-lora caption` never pays for torch. Logging is set up once, in `main`.

`python -m train CONFIG` (what `accelerate launch -m train CONFIG` runs) is `animagine-lora train
CONFIG`; `accelerate launch -m train.cli COMMAND ...` runs any subcommand on every process (`cache`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from captioning.outputs import OutputError
from captioning.terminal import use_safe_formatter

# name -> one-line help; the module is train.cli.<name>.
COMMANDS: dict[str, str] = {
    "caption": "rewrite tags into Animagine tag order",
    "tag": "auto-tag untagged images with a WD v3 tagger",
    "prep": "build a training dataset from raw images, with a report",
    "cache": "encode latents into the dataset's cache",
    "train": "train a LoRA (same as `accelerate launch -m train CONFIG`)",
    "convert": "convert LoRA files between WebUI and diffusers formats",
    "lora": "resize, merge (into one LoRA or a base model) or extract LoRAs",
    "sample": "generate with a LoRA on Animagine XL 4.0 Opt/Zero at the card's settings",
    "eval": "evaluate a run's checkpoints side by side and recommend one",
    "demo": "the whole path on a tiny SDXL-architecture model, on CPU (what `make demo` runs)",
    "config": "import an sd-scripts / kohya_ss training recipe as a config (config from-sd-scripts)",
}
logger = logging.getLogger("animagine_lora")


def setup_logging(verbose: bool = False) -> None:
    """Log lines as `LEVEL module: message`, control characters escaped (tags and file names
    from untrusted files reach these lines)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    use_safe_formatter()


def _chosen(argv: list[str]) -> str | None:
    """The first positional argument: the subcommand, if any (options come before it)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    chosen = _chosen(argv)
    parser = argparse.ArgumentParser(prog="animagine-lora", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # only the chosen subcommand's module is imported to fill in its arguments
            module = importlib.import_module(f"train.cli.{name}")
            module.add_arguments(sub)
            sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.run(args) or 0)
    except OutputError as error:  # an output refused or a write failed (disk full): one line
        logger.error("%s", error)
        return 2
