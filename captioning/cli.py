"""`animagine-lora caption INPUT -o OUTPUT`: rewrite a dataset's tags into Animagine captions.

INPUT is a JSON-lines file of Danbooru posts, or a folder of images with sidecars (Danbooru JSON
`image.jpg.json`/`image.json`, or `image.txt`/`image.caption` tag lists). OUTPUT is JSON lines,
one object per record in input order, or, for a folder, `.txt` captions in a separate folder.
Exit status: 0 all records written, 1 some skipped, 2 a fatal problem (any problem with --strict).
"""

from __future__ import annotations

import argparse
import functools
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import NamedTuple

from captioning.captioner import DEFAULT_MAX_TOKENS, Captioner
from captioning.jsonio import dumps_line
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
from captioning.tags import escape_prompt
from captioning.tokens import DEFAULT_TOKENIZER_REPO, TokenCounter, TokenizerError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".avif", ".tif", ".tiff"})
CHUNK_LINES = 2000  # lines per worker task: large enough to amortise pickling, small for progress
CHUNK_IMAGES = 200
# Inputs this large (about 60k posts) pay for classifying the whole tag database up front,
# once, in the parent: workers inherit the warm caches.
WARM_UP_BYTES = 40 * 2**20


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
        chunks = _image_chunks(args.input)
    else:
        if captioner.profile.percentile_source == "dataset" or args.percentiles == "dataset":
            _fit_percentiles(captioner, args.input)
        chunks = _line_chunks(args.input)
        if args.input.stat().st_size >= WARM_UP_BYTES and captioner.tag_db is not None:
            started = time.perf_counter()
            count = captioner.warm_up()
            logger.info("classified %d database tags in %.1f s before captioning", count, time.perf_counter() - started)
    records = _Accepted(summary, args.strict, args.max_messages).records(_results(chunks, captioner, args.workers))
    try:
        if output_format == "jsonl":
            _write_jsonl(records, args.output, summary)
        else:
            _write_txt(records, args.output, args.txt_style, summary)
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


# ---- records -------------------------------------------------------------------------------------
# Work is done in chunks (of JSON lines or images) so that --workers can spread it over processes:
# a chunk becomes its items in input order (Problems, and a Record per captioned input) plus the
# chunk's summary; the parent only checks duplicate ids and writes.

_WORKER_CAPTIONER: Captioner | None = None  # set in the parent before forking the pool
_PREPARE = True  # batch-classify each chunk's tags first while the caches are cold


class Record(NamedTuple):
    id: str
    origin: str
    line: bytes  # the JSON-lines output object
    caption: str  # training form, for .txt output
    sd_scripts: str
    stats: tuple  # CaptionSummary.record_stats, to take a duplicate back out of the summary


def _record(captioner: Captioner, post: Post, items: list, summary: CaptionSummary) -> None:
    result = captioner.caption(post)
    caption = result.caption
    training = caption.training()
    sd_scripts = caption.sd_scripts()
    line = dumps_line({
        "id": post.id, "caption": training, "prompt": escape_prompt(training), "sd_scripts": sd_scripts,
        "head": caption.head, "body": caption.body, "tail": caption.tail, "tokens": result.tokens,
        "cut": result.cut, "dropped": result.dropped, "unknown_tags": result.unknown_tags,
    })
    for warning in result.warnings:
        problem = Problem(post.origin, warning, skipped=False)
        items.append(problem)
        summary.add_problem(problem)
    stats = summary.add_record(result)
    items.append(Record(post.id, post.origin, line, training, sd_scripts, stats))


def _add_parsed(parsed: list, captioner: Captioner, items: list, summary: CaptionSummary) -> None:
    """Items of one input record (reader output: warnings, then a Post; or a Problem)."""
    summary.read += 1
    post = None
    for item in parsed:
        if isinstance(item, Post):
            post = item
        else:
            items.append(item)
            summary.add_problem(item)
    if post is not None:
        _record(captioner, post, items, summary)
    elif not any(p.skipped for p in parsed):
        problem = Problem(parsed[0].origin if parsed else "?", "no record")
        items.append(problem)
        summary.add_problem(problem)


def _caption_chunk(chunk: tuple) -> tuple[list, CaptionSummary]:
    """Caption one chunk: ("lines", [(origin, bytes)]) or ("images", root, [image paths])."""
    captioner = _WORKER_CAPTIONER
    items: list = []
    summary = CaptionSummary()
    if chunk[0] == "lines":
        global _PREPARE
        parsed_lines = [parsed for origin, line in chunk[1] if (parsed := parse_danbooru_line(line, origin))]
        if _PREPARE:
            new_tags = captioner.prepare(item for parsed in parsed_lines for item in parsed if isinstance(item, Post))
            # Once a chunk brings few new tags the caches are warm: the per-post path is cheaper.
            _PREPARE = new_tags > len(parsed_lines) // 4
        for parsed in parsed_lines:
            _add_parsed(parsed, captioner, items, summary)
    else:
        root = chunk[1]
        for image in chunk[2]:
            _add_parsed(_read_image_sidecar(root, image), captioner, items, summary)
    return items, summary


def _read_image_sidecar(root: Path, image: Path) -> list:
    image_id = image.relative_to(root).as_posix()
    sidecar = _sidecar(image)
    if sidecar is None:
        return [Problem(str(image), "no sidecar (.json, .txt or .caption) beside the image")]
    if sidecar.suffix == ".json":
        return list(read_danbooru_json(sidecar, image_id))
    return list(read_tag_file(sidecar, image_id))


def _sidecar(image: Path) -> Path | None:
    for candidate in (image.with_name(image.name + ".json"), image.with_suffix(".json"),
                      image.with_suffix(".txt"), image.with_suffix(".caption")):
        if candidate.is_file():
            return candidate
    return None


def _line_chunks(path: Path) -> Iterator[tuple]:
    with path.open("rb") as f:
        numbered = ((f"{path}:{n}", line) for n, line in enumerate(f, start=1))
        while chunk := list(islice(numbered, CHUNK_LINES)):
            yield ("lines", chunk)


def _image_chunks(folder: Path) -> Iterator[tuple]:
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    for start in range(0, len(images), CHUNK_IMAGES):
        yield ("images", folder, images[start:start + CHUNK_IMAGES])


def _results(chunks: Iterator[tuple], captioner: Captioner, workers: int) -> Iterator[tuple[list, CaptionSummary]]:
    global _WORKER_CAPTIONER, _PREPARE
    _WORKER_CAPTIONER, _PREPARE = captioner, True
    if workers <= 1:
        yield from map(_caption_chunk, chunks)
        return
    # fork: workers inherit the loaded database, tokenizer and caches instead of reloading them.
    context = multiprocessing.get_context("fork")
    with context.Pool(workers) as pool:
        yield from pool.imap(_caption_chunk, chunks)


# ---- writers ------------------------------------------------------------------------------------

class _StrictStop(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


class _Accepted:
    """Checks duplicate ids across chunks, logs problems (capped), merges the summaries."""

    def __init__(self, summary: CaptionSummary, strict: bool, max_messages: int) -> None:
        self.summary, self.strict, self.max_messages = summary, strict, max_messages
        self.seen: set[str] = set()
        self.messages = 0

    def records(self, results) -> Iterator[list[Record]]:
        from tqdm import tqdm

        with tqdm(desc="captioning", unit=" records", disable=not sys.stderr.isatty()) as progress:
            for items, chunk_summary in results:
                self.summary.merge(chunk_summary)
                progress.update(chunk_summary.read)
                yield self._chunk(items)

    def _chunk(self, items: list) -> list[Record]:
        kept = []
        seen = self.seen
        for item in items:
            if type(item) is Record:
                if item.id not in seen:
                    seen.add(item.id)
                    kept.append(item)
                    continue
                problem = Problem(item.origin, f"duplicate id {item.id!r} (first record kept)")
                self.summary.remove_record(item.stats)
                self.summary.add_problem(problem)
                item = problem
            self._report(item)
        return kept

    def _report(self, problem: Problem) -> None:
        if self.strict:
            raise _StrictStop(problem)
        self.messages += 1
        if self.max_messages <= 0 or self.messages <= self.max_messages:
            logger.warning("%s", problem)
        elif self.messages == self.max_messages + 1:
            logger.warning("more problems: counted in the summary only (--max-messages 0 shows all)")


def _write_jsonl(records: Iterator[list[Record]], output: Path, summary: CaptionSummary) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in records:
                f.write(b"".join(r.line for r in chunk))
                summary.written += len(chunk)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_txt(records: Iterator[list[Record]], output: Path, style: str, summary: CaptionSummary) -> None:
    """One `.txt` per image, mirroring the input's sub-folders; each file written atomically."""
    for chunk in records:
        for record in chunk:
            target = (output / record.id).with_suffix(".txt")
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write((record.sd_scripts if style == "sd-scripts" else record.caption) + "\n")
            os.replace(tmp, target)
            summary.written += 1
