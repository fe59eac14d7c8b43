"""`animagine-lora caption INPUT -o OUTPUT`: rewrite a dataset's tags into Animagine captions.

INPUT is a JSON-lines file of Danbooru posts, or a folder of images with sidecars (Danbooru JSON
`image.jpg.json`/`image.json`, or `image.txt`/`image.caption` tag lists). OUTPUT is JSON lines,
one object per record in input order, or, for a folder, `.txt` captions in a separate folder.
Exit status: 0 all records written, 1 some skipped, 2 a fatal problem (any problem with --strict).
Imports no torch: captioning a million posts starts in under a second.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from captioning.batch import CaptionJob, run_job
from captioning.captioner import DEFAULT_MAX_TOKENS
from captioning.chunks import FIELDS
from captioning.profile import DEFAULT_PROFILE, PROFILE_SOURCES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = PROFILE_SOURCES
    parser.add_argument("input", type=Path, help="JSON-lines file of Danbooru posts, or a folder of images with sidecars")
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="output .jsonl file, or a folder for .txt captions (--format txt)")
    parser.add_argument("--profile", default=DEFAULT_PROFILE, help="built-in profile name or a .toml file")
    parser.add_argument("--tags-db", type=Path,
                        help="tag database CSV: a tagcomplete danbooru.csv replaces the shipped Danbooru "
                             "database, a WD selected_tags.csv adds its tags to it (default: the shipped one)")
    parser.add_argument("--tokenizer", help="CLIP tokenizer folder (or a model folder with tokenizer/, or a Hub id)")
    parser.add_argument("--clip-bpe", type=Path,
                        help="CLIP BPE merges (bpe_simple_vocab_16e6.txt.gz) to build the tokenizer from "
                             "(default: the copy shipped with the package)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help="CLIP token budget per caption; body tags are dropped to fit (0: no budget)")
    parser.add_argument("--percentiles", choices=("table", "dataset"),
                        help="score cut points: the profile's table (default: the published Danbooru "
                             "percentiles p5..p95 per rating), or computed from INPUT per rating")
    parser.add_argument("--workers", type=int, default=1, help="processes for JSON-lines input (order is kept)")
    parser.add_argument("--max-messages", type=int, default=100,
                        help="problems logged one per line before the rest are only counted (0: all)")
    parser.add_argument("--strict", action="store_true", help="any problem (even a warning) is fatal: exit 2")
    parser.add_argument("--format", choices=("jsonl", "txt"),
                        help="jsonl (default), or txt: one caption file per image (folder input only)")
    parser.add_argument("--txt-style", choices=("caption", "sd-scripts"), default="caption",
                        help="txt content: the training caption, or `head, ||| body, ||| tail` for "
                             "sd-scripts' keep_tokens_separator")
    parser.add_argument("--fields", type=parse_fields,
                        help=f"comma-separated fields of each JSON line (default: all of {','.join(FIELDS)})")


def parse_fields(text: str) -> tuple[str, ...]:
    """`id,caption,...` -> the field names, checked against FIELDS (argparse reports the error)."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in FIELDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown field(s) {', '.join(unknown) or '(none given)'}; choose from {','.join(FIELDS)}")
    return names


def run(args: argparse.Namespace) -> int:
    return run_job(CaptionJob(
        input=args.input, output=args.output, profile=args.profile, tags_db=args.tags_db, tokenizer=args.tokenizer,
        clip_bpe=args.clip_bpe, max_tokens=args.max_tokens, percentiles=args.percentiles, workers=args.workers,
        max_messages=args.max_messages, strict=args.strict, format=args.format, txt_style=args.txt_style,
        fields=args.fields))
