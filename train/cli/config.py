"""`animagine-lora config from-sd-scripts RECIPE.toml [MORE ...] -o configs/mine.toml`: import a recipe.

Reads an sd-scripts training config (`--config_file` TOML, optionally with its `--dataset_config`
TOML) or a kohya_ss GUI JSON and writes our training config: every option we have is mapped
(with sd-scripts' defaults where ours differ), and every option we do not have is listed with why,
on the terminal and as comments at the end of the written file. The file is validated before it
is written; an existing file is replaced only with `--force`, and never one of the recipes.
Logic: `train.recipe_import`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub = actions.add_parser("from-sd-scripts", help="an sd-scripts TOML or kohya_ss GUI JSON recipe -> our TOML",
                             description="Convert an sd-scripts / kohya_ss recipe into a training config.")
    sub.add_argument("recipes", nargs="+", type=Path, metavar="RECIPE",
                     help="sd-scripts config .toml (and its dataset config .toml), or a kohya_ss GUI .json")
    sub.add_argument("-o", "--out", type=Path, required=True, help="the training config to write (.toml)")
    sub.add_argument("--dataset", help="data.dataset: the prep OUT folder (relative to the written config); "
                                       "with it, epoch counts become steps")
    sub.add_argument("--output-dir", help="output.dir (default: the recipe's output_dir, else runs/NAME)")
    sub.add_argument("--force", action="store_true", help="replace an existing config file")


def run(args: argparse.Namespace) -> int:
    from train.config import ConfigError
    from train.recipe_import import RecipeError, import_recipe, sorted_notes

    out: Path = args.out
    if out.suffix != ".toml":
        logger.error("%s: the config to write must end in .toml", out)
        return 2
    if any(out.resolve() == recipe.resolve() for recipe in args.recipes):
        logger.error("%s: is one of the recipes; write the config elsewhere", out)
        return 2
    if out.exists() and not args.force:
        logger.error("%s: exists; pass --force to replace it", out)
        return 2
    try:
        conversion = import_recipe(list(args.recipes), out, dataset=args.dataset, output_dir=args.output_dir)
    except (RecipeError, ConfigError) as err:
        logger.error("%s", err)
        return 2
    print(f"wrote {out}: {len(conversion.mapped)} settings from the recipe, "
          f"{len(conversion.notes)} recipe options not carried over")
    for note in sorted_notes(conversion):
        print(f"  [{note.kind}] {note.option} = {note.value!r}: {note.why}")
    print(f"next: animagine-lora train {out} --check")
    return 0
