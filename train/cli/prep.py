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
    parser.add_argument("-o", "--out", help="output folder (replaced atomically); not needed with --dry-run")
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
        "--max-area", type=_area, metavar="WxH|PIXELS",
        help="bucket area, e.g. 1536x1536 (default 1024x1024, the card's): the card's aspect ratios at it",
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
    add_curation_arguments(parser)


# ---- tag curation, aesthetic tags and the dry run (recipe keys [edit], [curation]) ----------------


def tag_list(text: str) -> list[str]:
    """`a, b c, d` -> ["a", "b c", "d"] (tags never contain commas: captions are comma-separated)."""
    return [tag.strip() for tag in text.split(",") if tag.strip()]


def replacement(text: str) -> tuple[str, str]:
    """`OLD=NEW` -> (OLD, NEW), split at the last `=` (so `=_==smile` replaces the tag `=_=`)."""
    old, sep, new = text.rpartition("=")
    if not sep or not old.strip() or not new.strip():
        raise argparse.ArgumentTypeError(f"expected OLD=NEW, got {text!r}")
    return old.strip(), new.strip()


def add_curation_arguments(parser: argparse.ArgumentParser) -> None:
    from captioning.profile import PROFILE_SOURCES

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = PROFILE_SOURCES
    group = parser.add_argument_group(
        "tag curation (added to the recipe's [edit] and [curation] tables; see docs/prep.md)"
    )
    group.add_argument(
        "--dry-run", type=int, nargs="?", const=5, metavar="N",
        help="print the tag changes and the first N captions (default 5) before and after curation; "
        "reads tags only, writes nothing",
    )
    group.add_argument(
        "--trigger", help="trigger tag for a SOURCE that is not a recipe: put in the head as a "
        "character tag, and what constant features are folded into",
    )
    group.add_argument(
        "--fold-threshold", type=float,
        help="fold a general tag into a character when at least this share of its images carry it (default 0.8)",
    )
    group.add_argument(
        "--keep-features", action="store_true", default=None,
        help="keep frequent features in the captions (decisions are still reported)",
    )
    group.add_argument(
        "--fold-exempt", type=tag_list, action="extend", metavar="TAGS", help="tags never folded (comma-separated)"
    )
    group.add_argument(
        "--fold-min-images", type=int, help="characters with fewer images fold nothing (default 10)"
    )
    group.add_argument(
        "--remove-tags", type=tag_list, action="extend", metavar="TAGS", help="tags to remove (comma-separated)"
    )
    group.add_argument(
        "--replace-tags", type=replacement, action="append", metavar="OLD=NEW", help="replace a tag (repeatable)"
    )
    group.add_argument(
        "--remove-categories", type=tag_list, action="extend", metavar="CATEGORIES",
        help="remove every tag of these categories: general, artist, copyright, character, meta",
    )
    group.add_argument(
        "--add-tags", type=tag_list, action="extend", metavar="TAGS", help="tags added to every image"
    )
    group.add_argument(
        "--aesthetic-model", metavar="ID_OR_DIR",
        help="image classifier for the profile's aesthetic tags (animagine-xl-3.1: "
        "shadowlilac/aesthetic-shadow-v2); without it no aesthetic tag is written",
    )


def apply_curation_args(base: dict, args: argparse.Namespace) -> None:
    """Command-line curation options over the recipe data: scalars replace the recipe's values,
    tag lists and replacements are added to its [edit] rules and exempt list."""
    curation = base.setdefault("curation", {})
    for key in ("fold_threshold", "keep_features", "fold_min_images"):
        if getattr(args, key, None) is not None:
            curation[key] = getattr(args, key)
    if args.fold_exempt:
        curation["fold_exempt"] = [*curation.get("fold_exempt", []), *args.fold_exempt]
    edit = base.setdefault("edit", {})
    for key in ("remove_tags", "remove_categories", "add_tags"):
        if getattr(args, key, None):
            edit[key] = [*edit.get(key, []), *getattr(args, key)]
    if args.replace_tags:
        edit["replace_tags"] = {**edit.get("replace_tags", {}), **dict(args.replace_tags)}
    if args.aesthetic_model:
        base.setdefault("caption", {})["aesthetic_model"] = args.aesthetic_model


def _area(text: str) -> int:
    """`--max-area`: `1536x1536` or a pixel count, as an int (argparse reports a ValueError)."""
    width, sep, height = text.lower().partition("x")
    return int(width) * int(height) if sep else int(text)


DATASET_OPTIONS = (
    "min_side",
    "buckets",
    "max_area",
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
        source = {"name": name, "path": args.source, "repeats": args.repeats}
        if args.trigger:
            source["caption"] = {"trigger": args.trigger}
        base = {"sources": [source]}
        origin = "command line"
    if args.source.endswith(".toml") and args.trigger:
        raise RecipeError(f"--trigger: {args.source} is a recipe; set `trigger` in its [sources.caption] tables")
    apply_curation_args(base, args)
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
        if args.dry_run is not None:
            from train.prep.dry_run import dry_run

            dry_run(recipe, captions=args.dry_run, shard_index=args.shard_index, num_shards=args.num_shards)
            return 0
        if not args.out:
            raise RecipeError("-o/--out: the output folder is required (or --dry-run to preview)")
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
