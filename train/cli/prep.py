"""`animagine-lora prep SOURCE_OR_RECIPE.toml -o OUT`: build a training dataset, with a report.

SOURCE is a folder (sd-scripts / gallery-dl / untagged / Hugging Face imagefolder), a parquet
file, a Hub dataset id, or a recipe `.toml`. Command-line options override the recipe.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from train.prep.recipe import RecipeError, load_recipe, parse_recipe, resolve_paths

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", help="image folder, dataset folder/parquet/Hub id, or recipe .toml"
    )
    parser.add_argument("-o", "--out", required=True, help="output folder (replaced atomically)")
    parser.add_argument(
        "--tags-db", help="tag database: tagcomplete CSV (replaces the shipped one) or WD selected_tags.csv (added to it)"
    )
    parser.add_argument(
        "--profile", help="caption profile name or TOML path (default animagine-xl-4.0)"
    )
    counter = parser.add_mutually_exclusive_group()
    counter.add_argument("--clip-bpe", help="CLIP BPE merges (.txt.gz) for the token budget")
    counter.add_argument("--tokenizer", help="tokenizer folder or Hub id for the token budget")
    parser.add_argument("--max-tokens", type=int, help="caption token budget (default 225)")
    parser.add_argument(
        "--min-side", type=int, help="reject images whose shorter side is smaller (default 512)"
    )
    parser.add_argument(
        "--buckets", choices=["card", "all"], help="aspect bucket set (default card)"
    )
    parser.add_argument(
        "--near-dup", action="store_true", default=None, help="also drop near-duplicates (pHash)"
    )
    parser.add_argument(
        "--near-dup-distance", type=int, help="pHash Hamming distance for --near-dup (default 4)"
    )
    parser.add_argument(
        "--max-image-pixels", type=int, help="decompression-bomb limit (default Pillow's)"
    )
    parser.add_argument(
        "--val-fraction", type=float, help="fraction of images marked split=val (default 0)"
    )
    parser.add_argument(
        "--tagger", help="WD v3 tagger folder or Hub repo: auto-tag untagged images"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=max(1, (os.cpu_count() or 1) - 1),
        help="validation worker processes",
    )
    parser.add_argument(
        "--shard-index", type=int, default=0, help="this machine's shard (see docs/prep.md)"
    )
    parser.add_argument("--num-shards", type=int, default=1, help="number of shards")
    parser.add_argument(
        "--repeats", type=int, default=1, help="repeats for a SOURCE that is not a recipe"
    )
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if the output is up to date"
    )


DATASET_OPTIONS = (
    "min_side",
    "buckets",
    "near_dup",
    "near_dup_distance",
    "max_image_pixels",
    "val_fraction",
)
CAPTION_OPTIONS = ("tags_db", "profile", "clip_bpe", "tokenizer", "max_tokens", "tagger")


def recipe_from_args(args: argparse.Namespace):
    """The recipe file (or a one-source recipe for a folder) with command-line overrides applied."""
    if args.source.endswith(".toml"):
        base = load_recipe(args.source).model_dump()
        origin = args.source
    else:
        name = Path(args.source.rstrip("/")).name or "source"
        base = {"sources": [{"name": name, "path": args.source, "repeats": args.repeats}]}
        origin = "command line"
    for group, keys in (("dataset", DATASET_OPTIONS), ("caption", CAPTION_OPTIONS)):
        for key in keys:
            value = getattr(args, key)
            if value is not None:
                base.setdefault(group, {})[key] = value
    recipe = parse_recipe(base, origin)
    return resolve_paths(recipe, Path.cwd())


def run(args: argparse.Namespace) -> int:
    from train.prep.pipeline import RunOptions, prepare

    try:
        recipe = recipe_from_args(args)
        result = prepare(
            recipe,
            Path(args.out),
            RunOptions(
                workers=args.workers,
                shard_index=args.shard_index,
                num_shards=args.num_shards,
                force=args.force,
            ),
        )
    except RecipeError as error:
        logger.error("%s", error)
        return 2
    if result.up_to_date:
        print(f"{result.out}: up to date")
    elif result.rows == 0:
        logger.error("%s: no usable images; see %s", args.source, result.out / "report.html")
        return 1
    return 0
