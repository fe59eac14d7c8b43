"""`animagine-lora tag FOLDER -o OUT`: WD v3 tags for every image, as sd-scripts `.txt` sidecars.

OUT mirrors FOLDER's layout (`OUT/sub/name.txt` for `FOLDER/sub/name.png`); nothing is ever
written inside FOLDER. Each `.txt` holds the tags in Animagine order (captioning profile).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from captioning import outputs
from captioning.profile import PROFILE_SOURCES

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from captioning.tagger import DEFAULT_MODEL

    parser.add_argument("folder", help="folder of images (searched recursively)")
    parser.add_argument(
        "-o", "--out", required=True, help="folder for the .txt files (not inside FOLDER)"
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"tagger folder or Hub repo (default {DEFAULT_MODEL})",
    )
    parser.add_argument("--general-threshold", type=float, default=0.35)
    parser.add_argument("--character-threshold", type=float, default=0.85)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--profile", default="animagine-xl-4.0", help="caption profile for tag order"
    )
    parser.add_argument(
        "--aesthetic-model",
        metavar="ID_OR_DIR",
        help="image classifier for the profile's aesthetic tags (animagine-xl-3.1: "
        "shadowlilac/aesthetic-shadow-v2); without it no aesthetic tag is written",
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = PROFILE_SOURCES


def find_images(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from captioning import Captioner, load_profile
    from captioning.aesthetic import AestheticModelError, scorer_for_profile
    from captioning.images import load_rgb
    from captioning.tagger import WDTagger

    folder, out = Path(args.folder).resolve(), Path(args.out).resolve()
    if not folder.is_dir():
        logger.error("%s: not a folder", folder)
        return 2
    if out == folder or out.is_relative_to(folder):
        logger.error(
            "--out %s: must not be inside the input folder %s (originals are never touched)",
            out,
            folder,
        )
        return 2
    outputs.claim_dir(out)  # OutputError (a file, device or FIFO) is reported by the command line
    try:
        tagger = WDTagger.load(
            args.model,
            general_threshold=args.general_threshold,
            character_threshold=args.character_threshold,
            batch_size=args.batch_size,
        )
        captioner = Captioner(load_profile(args.profile), None, None)
    except (OSError, ValueError) as error:
        logger.error("--model %s: %s", args.model, error)
        return 2
    try:
        scorer = scorer_for_profile(args.aesthetic_model, captioner.profile, args.batch_size)
    except AestheticModelError as error:
        logger.error("--aesthetic-model %s", error)
        return 2
    images = find_images(folder)
    if not images:
        logger.error("%s: no images found", folder)
        return 1
    failed = 0
    for start in tqdm(
        range(0, len(images), args.batch_size), desc="tag", unit="batch", disable=None
    ):
        batch, pictures = [], []
        for path in images[start : start + args.batch_size]:
            try:
                pictures.append(load_rgb(path))
                batch.append(path)
            except Exception as error:  # noqa: BLE001 - a bad file is reported, never fatal
                logger.warning("%s: skipped: %s", path, error)
                failed += 1
        scores = scorer.score(pictures) if scorer is not None else [None] * len(pictures)
        for path, post, score in zip(batch, tagger.tag_images(pictures, [str(p) for p in batch]), scores):
            post.aesthetic = score
            target = (out / path.relative_to(folder)).with_suffix(".txt")
            outputs.write_text(target, captioner.caption(post).caption.training() + "\n")
    print(
        f"tagged {len(images) - failed} images into {out}"
        + (f"; {failed} skipped" if failed else "")
    )
    return 0 if not failed else 1

