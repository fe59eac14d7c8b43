"""`animagine-lora caption INPUT -o OUTPUT`: rewrite a dataset's tags into Animagine captions.

INPUT is a JSON-lines file of Danbooru posts, or a folder of images with sidecars (Danbooru JSON
`image.jpg.json`/`image.json`, or `image.txt`/`image.caption` tag lists). OUTPUT is JSON lines,
one object per record in input order, or, for a folder, `.txt` captions in a separate folder.
Exit status: 0 all records written, 1 some skipped, 2 a fatal problem (any problem with --strict).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import multiprocessing
import os
import sys
import tempfile
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from captioning.captioner import DEFAULT_MAX_TOKENS, Captioner
from captioning.post import Post, Problem
from captioning.profile import DEFAULT_PROFILE, ProfileError, load_profile
from captioning.readers import (
    parse_danbooru_line,
    read_danbooru_json,
    read_danbooru_jsonl,
    read_tag_file,
)
from captioning.summary import CaptionSummary
from captioning.tag_db import TagDatabase, TagDatabaseError, fetch_tag_database
from captioning.tokens import DEFAULT_TOKENIZER_REPO, TokenCounter, TokenizerError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".avif", ".tif", ".tiff"})
CHUNK_LINES = 2000  # lines per worker task: large enough to amortise pickling, small for progress


class CaptionCliError(Exception):
    """A fatal problem (exit status 2), reported as one line."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="JSON-lines file of Danbooru posts, or a folder of images with sidecars")
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="output .jsonl file, or a folder for .txt captions (--format txt)")
    parser.add_argument("--profile", default=DEFAULT_PROFILE, help="built-in profile name or a .toml file")
    parser.add_argument("--tags-db", type=Path, help="tag database CSV (tagcomplete danbooru.csv or WD selected_tags.csv); "
                        "default: fetched from the Hub into the cache when online")
    parser.add_argument("--tokenizer", help="CLIP tokenizer folder (or a model folder with tokenizer/, or a Hub id)")
    parser.add_argument("--clip-bpe", type=Path, help="CLIP BPE merges (bpe_simple_vocab_16e6.txt.gz) to build the tokenizer offline")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help="CLIP token budget per caption; body tags are dropped to fit (0: no budget)")
    parser.add_argument("--percentiles", choices=("table", "dataset"),
                        help="score cut points: the profile's table, or computed from INPUT per rating")
    parser.add_argument("--workers", type=int, default=1, help="processes for JSON-lines input (order is kept)")
    parser.add_argument("--max-messages", type=int, default=100,
                        help="problems logged one per line before the rest are only counted (0: all)")
    parser.add_argument("--strict", action="store_true", help="any problem (even a warning) is fatal: exit 2")
    parser.add_argument("--format", choices=("jsonl", "txt"),
                        help="jsonl (default), or txt: one caption file per image (folder input only)")
    parser.add_argument("--txt-style", choices=("caption", "sd-scripts"), default="caption",
                        help="txt content: the training caption, or `head, ||| body, ||| tail` for "
                             "sd-scripts' keep_tokens_separator")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except CaptionCliError as error:
        logger.error("%s", error)
        return 2


def _run(args: argparse.Namespace) -> int:
    if not args.input.exists():
        raise CaptionCliError(f"{args.input}: input not found")
    output_format = args.format or ("txt" if args.input.is_dir() and args.output.suffix != ".jsonl" else "jsonl")
    if output_format == "txt" and not args.input.is_dir():
        raise CaptionCliError(f"{args.input}: --format txt needs a folder of images as input")
    _check_output(args.input, args.output, output_format)
    captioner = build_captioner(args)
    summary = CaptionSummary()
    if args.input.is_dir():
        records = _folder_records(args.input, captioner, summary)
    else:
        if captioner.profile.percentile_source == "dataset" or args.percentiles == "dataset":
            _fit_percentiles(captioner, args.input)
        records = _jsonl_records(args.input, captioner, args.workers, summary)
    try:
        if output_format == "jsonl":
            _write_jsonl(records, args.output, summary, args.strict, args.max_messages)
        else:
            _write_txt(records, args.output, args.txt_style, summary, args.strict, args.max_messages)
    except _StrictStop as stop:
        logger.error("--strict: %s", stop.problem)
        return 2
    summary.print()
    return 1 if summary.skipped_total else 0


def build_captioner(args: argparse.Namespace) -> Captioner:
    """Profile, tag database and token counter from the command line."""
    try:
        profile = load_profile(args.profile)
    except ProfileError as error:
        raise CaptionCliError(str(error)) from None
    if args.tags_db is not None:
        try:
            tag_db = _load_tag_db(args.tags_db)
        except TagDatabaseError as error:
            raise CaptionCliError(str(error)) from None
        if tag_db.problems and args.strict:
            raise CaptionCliError(f"--strict: {tag_db.problems[0]}")
    else:
        try:
            tag_db = TagDatabase.load(fetch_tag_database())
        except TagDatabaseError as error:
            logger.warning("no tag database (%s): flat tags are not categorised and go in the body", error)
            tag_db = None
    counter = None if args.max_tokens == 0 and not (args.tokenizer or args.clip_bpe) else _token_counter(args)
    return Captioner(profile, tag_db, counter, args.max_tokens)


def _token_counter(args: argparse.Namespace) -> TokenCounter:
    """--tokenizer, else --clip-bpe, else the base model's tokenizer from the Hub."""
    try:
        if args.tokenizer:
            return TokenCounter.from_pretrained(args.tokenizer)
        if args.clip_bpe:
            return _counter_from_bpe(args.clip_bpe)
        return TokenCounter.from_pretrained(DEFAULT_TOKENIZER_REPO)
    except TokenizerError as error:
        raise CaptionCliError(f"{error}; offline, pass --tokenizer DIR or --clip-bpe "
                              "bpe_simple_vocab_16e6.txt.gz (or --max-tokens 0 for no budget)") from None


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


# Loaded once per process and file version: repeated runs in one process (tests, notebooks)
# skip re-reading the 140k-row database and rebuilding the tokenizer.
@functools.lru_cache(maxsize=4)
def _cached_tag_db(key: tuple[str, int, int]) -> TagDatabase:
    return TagDatabase.load(key[0])


def _load_tag_db(path: Path) -> TagDatabase:
    if not path.is_file():
        raise TagDatabaseError(f"{path}: tag database not found")
    return _cached_tag_db(_file_key(path))


@functools.lru_cache(maxsize=2)
def _cached_counter(key: tuple[str, int, int]) -> TokenCounter:
    return TokenCounter.from_bpe(key[0])


def _counter_from_bpe(path: Path) -> TokenCounter:
    if not path.is_file():
        raise TokenizerError(f"{path}: CLIP BPE file not found")
    return _cached_counter(_file_key(path))


def _check_output(source: Path, output: Path, output_format: str) -> None:
    source, target = source.resolve(), output.resolve()
    if output_format == "jsonl":
        if target == source:
            raise CaptionCliError(f"{output}: the output would overwrite the input")
        if target.is_dir():
            raise CaptionCliError(f"{output}: is a folder; give a .jsonl file name")
        return
    if target == source or source in target.parents:
        raise CaptionCliError(f"{output}: refusing to write captions into the input folder {source}; "
                              "choose a separate output folder")
    if target.exists() and not target.is_dir():
        raise CaptionCliError(f"{output}: exists and is not a folder")


def _fit_percentiles(captioner: Captioner, path: Path) -> None:
    posts = (item for item in read_danbooru_jsonl(path) if isinstance(item, Post))
    cuts = captioner.fit_percentiles(posts)
    logger.info("score percentiles from %s: %s", path, {r: {f"p{k}": round(v, 1) for k, v in c.items()} for r, c in cuts.items()})


# ---- records: (id, origin, output object | None, problems) in input order ---------------------

_WORKER_CAPTIONER: Captioner | None = None  # set in the parent before forking the pool


def _caption_post(captioner: Captioner, post: Post) -> dict:
    result = captioner.caption(post)
    caption = result.caption
    return {
        "id": post.id, "caption": caption.training(), "prompt": caption.prompt(),
        "sd_scripts": caption.sd_scripts(), "head": list(caption.head), "body": list(caption.body),
        "tail": list(caption.tail), "tokens": result.tokens, "cut": result.cut,
        "dropped": result.dropped, "unknown_tags": result.unknown_tags, "warnings": result.warnings,
        "_origin": post.origin, "_stats": (result.rating, result.year, result.score_tag, result.quality_tag),
    }


def _caption_lines(chunk: list[tuple[str, bytes]]) -> list[tuple[list[Problem], dict | None]]:
    """Parse and caption a chunk of JSON lines: per line, its problems and its output object."""
    captioner = _WORKER_CAPTIONER
    out = []
    for origin, line in chunk:
        items = parse_danbooru_line(line, origin)
        if not items:
            continue
        problems = [i for i in items if isinstance(i, Problem)]
        posts = [i for i in items if isinstance(i, Post)]
        out.append((problems, _caption_post(captioner, posts[0]) if posts else None))
    return out


def _chunks(path: Path) -> Iterator[list[tuple[str, bytes]]]:
    with path.open("rb") as f:
        numbered = ((f"{path}:{n}", line) for n, line in enumerate(f, start=1))
        while chunk := list(islice(numbered, CHUNK_LINES)):
            yield chunk


def _jsonl_records(path: Path, captioner: Captioner, workers: int, summary: CaptionSummary):
    global _WORKER_CAPTIONER
    _WORKER_CAPTIONER = captioner
    if workers <= 1:
        for chunk in _chunks(path):
            yield from _caption_lines(chunk)
        return
    # fork: workers inherit the loaded database, tokenizer and caches instead of reloading them.
    context = multiprocessing.get_context("fork")
    with context.Pool(workers) as pool:
        for results in pool.imap(_caption_lines, _chunks(path)):
            yield from results


def _folder_records(folder: Path, captioner: Captioner, summary: CaptionSummary):
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        image_id = image.relative_to(folder).as_posix()
        sidecar = _sidecar(image)
        if sidecar is None:
            yield [Problem(str(image), "no sidecar (.json, .txt or .caption) beside the image")], None
            continue
        reader = read_danbooru_json(sidecar, image_id) if sidecar.suffix == ".json" else read_tag_file(sidecar, image_id)
        items = list(reader)
        problems = [i for i in items if isinstance(i, Problem)]
        posts = [i for i in items if isinstance(i, Post)]
        yield problems, (_caption_post(captioner, posts[0]) if posts else None)


def _sidecar(image: Path) -> Path | None:
    for candidate in (image.with_name(image.name + ".json"), image.with_suffix(".json"),
                      image.with_suffix(".txt"), image.with_suffix(".caption")):
        if candidate.is_file():
            return candidate
    return None


# ---- writers ------------------------------------------------------------------------------------

class _StrictStop(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


def _accepted(records, summary: CaptionSummary, strict: bool, max_messages: int) -> Iterator[dict]:
    """Records to write, after duplicate-id checks, with everything counted in the summary."""
    from tqdm import tqdm

    seen: set[str] = set()
    messages = 0
    for problems, record in tqdm(records, desc="captioning", unit=" records", disable=not sys.stderr.isatty()):
        if record is not None and record["id"] in seen:
            problems = [*problems, Problem(record["_origin"], f"duplicate id {record['id']!r} (first record kept)")]
            record = None
        if record is not None:
            problems = problems + [Problem(record["_origin"], w, skipped=False) for w in record["warnings"]]
        for problem in problems:
            if strict:
                raise _StrictStop(problem)
            messages += 1
            if max_messages <= 0 or messages <= max_messages:
                logger.warning("%s", problem)
            elif messages == max_messages + 1:
                logger.warning("more problems: counted in the summary only (--max-messages 0 shows all)")
        summary.add(problems, record)
        if record is not None:
            seen.add(record["id"])
            yield record


def _public(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("_")}


def _write_jsonl(records, output: Path, summary: CaptionSummary, strict: bool, max_messages: int) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in _accepted(records, summary, strict, max_messages):
                f.write(json.dumps(_public(record), ensure_ascii=False) + "\n")
                summary.written += 1
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_txt(records, output: Path, style: str, summary: CaptionSummary, strict: bool,
               max_messages: int) -> None:
    """One `.txt` per image, mirroring the input's sub-folders; each file written atomically."""
    key = "sd_scripts" if style == "sd-scripts" else "caption"
    for record in _accepted(records, summary, strict, max_messages):
        target = (output / record["id"]).with_suffix(".txt")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(record[key] + "\n")
        os.replace(tmp, target)
        summary.written += 1
