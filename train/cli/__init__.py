"""The `animagine-lora` command line: one subcommand per stage.

Each subcommand lives in its own module exposing `add_arguments(parser)` and
`run(args) -> int`. Modules are imported only when their subcommand runs, so
`animagine-lora caption` never pays for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from captioning.outputs import OutputError
from captioning.terminal import use_safe_formatter

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "caption": ("captioning.cli", "rewrite tags into Animagine tag order"),
    "tag": ("captioning.tagger_cli", "auto-tag untagged images with a WD v3 tagger"),
    "prep": ("train.prep.cli", "build a training dataset from raw images, with a report"),
    "cache": ("train.cache_cli", "encode latents into the dataset's cache"),
    "train": ("train.__main__", "train a LoRA (same as `accelerate launch -m train CONFIG`)"),
    "convert": ("train.lora.convert", "convert LoRA files between WebUI and diffusers formats"),
    "sample": ("train.generate.cli", "generate with a LoRA on Animagine XL 4.0 Opt/Zero at the card's settings"),
    "eval": ("train.evaluate.cli", "evaluate a run's checkpoints side by side and recommend one"),
}


def _chosen_subcommand(argv: list[str]) -> str | None:
    """The first positional argument: the subcommand, if any (options come before it)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    chosen = _chosen_subcommand(argv)
    parser = argparse.ArgumentParser(prog="animagine-lora", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        # Only the chosen subcommand's module is imported to fill in its arguments.
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    use_safe_formatter()  # tags and file names from untrusted files reach these lines
    try:
        return int(args._run(args) or 0)
    except OutputError as error:  # an output refused or a write failed (disk full): one line
        logging.getLogger("animagine_lora").error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
