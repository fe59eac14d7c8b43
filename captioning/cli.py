"""`animagine-lora caption INPUT -o OUTPUT`: rewrite a dataset's tags into Animagine captions.

INPUT is a JSON-lines file of Danbooru posts, or a folder of images with sidecars (Danbooru JSON
`image.jpg.json`/`image.json`, or `image.txt`/`image.caption` tag lists). OUTPUT is JSON lines,
one object per record in input order, or, for a folder, `.txt` captions in a separate folder.
Exit status: 0 all records written, 1 some skipped, 2 a fatal problem (any problem with --strict).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from captioning import jsonio, outputs
from captioning.captioner import DEFAULT_MAX_TOKENS, Captioner
from captioning.chunks import FIELDS, ChunkResult, caption_chunks, image_groups, line_ranges
from captioning.outputs import OutputError
from captioning.post import Post, Problem
from captioning.profile import DEFAULT_PROFILE, PROFILE_SOURCES, ProfileError, load_profile
from captioning.readers import read_danbooru_jsonl
from captioning.summary import CaptionSummary
from captioning.tag_db import TagDatabase, TagDatabaseError, load_tag_database
from captioning.tokens import SHIPPED_CLIP_BPE, TokenCounter, TokenizerError, TokenizerOfflineError

logger = logging.getLogger(__name__)

# Inputs this large (about 60k posts) pay for classifying the whole tag database up front,
# once, in the parent: workers inherit the warm caches.
WARM_UP_BYTES = 40 * 2**20


class CaptionCliError(Exception):
    """A fatal problem (exit status 2), reported as one line."""


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
    try:
        with _seekable(args.input) as source:
            args.input = source
            return _run(args)
    except (CaptionCliError, OutputError) as error:
        logger.error("%s", error)
        return 2


@contextlib.contextmanager
def _seekable(path: Path) -> Iterator[Path]:
    """`path`, or for a pipe (`/dev/stdin`, `<(cmd)`) a temporary copy of what it streams.

    Workers read byte ranges of the input with `os.pread`, which a pipe cannot serve, and the
    dataset percentiles read it twice; so a stream is first copied to a regular file.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CaptionCliError(f"{path}: input not found") from None
    except OSError as error:
        raise CaptionCliError(f"{path}: cannot read the input: {error.strerror}") from None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        yield path
        return
    if not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode)):
        raise CaptionCliError(f"{path}: not a file, folder or pipe")
    with tempfile.TemporaryDirectory(prefix="animagine-caption-") as folder:
        copy = Path(folder) / "stdin.jsonl"
        try:
            with open(path, "rb") as stream, open(copy, "wb") as out:
                shutil.copyfileobj(stream, out, 1 << 20)
        except OSError as error:
            raise CaptionCliError(f"{path}: cannot read the input stream: {error.strerror}") from None
        logger.info("%s: not a regular file; read it into a temporary copy first", path)
        yield copy


def _run(args: argparse.Namespace) -> int:
    output_format = args.format or ("txt" if args.input.is_dir() and args.output.suffix != ".jsonl" else "jsonl")
    if output_format == "txt" and not args.input.is_dir():
        raise CaptionCliError(f"{args.input}: --format txt needs a folder of images as input")
    if output_format == "txt" and getattr(args, "fields", None):
        raise CaptionCliError("--fields selects JSON-lines fields; --txt-style picks the .txt content")
    _check_output(args.input, args.output, output_format)
    captioner = build_captioner(args)
    summary = CaptionSummary()
    if captioner.tag_db is not None:
        summary.tag_sources = list(captioner.tag_db.sources)
    if args.input.is_dir():
        chunks, source = image_groups(args.input), None
    else:
        if captioner.profile.percentile_source == "dataset" or args.percentiles == "dataset":
            _fit_percentiles(captioner, args.input)
        chunks, source = line_ranges(args.input), args.input
        if args.input.stat().st_size >= WARM_UP_BYTES and captioner.tag_db is not None:
            started = time.perf_counter()
            count = captioner.warm_up()
            logger.info("classified %d database tags in %.1f s before captioning", count, time.perf_counter() - started)
    results = caption_chunks(chunks, captioner, args.workers, source, getattr(args, "fields", None))
    outputs = _Accepted(summary, args.strict, args.max_messages).outputs(results)
    try:
        if output_format == "jsonl":
            _write_jsonl(outputs, args.output, summary)
        else:
            _write_txt(outputs, args.output, args.txt_style, summary)
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
    try:
        tag_db = _load_tag_db(args.tags_db)
    except TagDatabaseError as error:
        raise CaptionCliError(str(error)) from None
    if tag_db.problems and args.strict:
        raise CaptionCliError(f"--strict: {tag_db.problems[0]}")
    counter = None if args.max_tokens == 0 and not (args.tokenizer or args.clip_bpe) else _token_counter(args)
    return Captioner(profile, tag_db, counter, args.max_tokens)


def _token_counter(args: argparse.Namespace) -> TokenCounter:
    """--tokenizer, else --clip-bpe, else the CLIP vocabulary shipped with the package."""
    try:
        if args.tokenizer:
            return TokenCounter.from_pretrained(args.tokenizer)
        return _counter_from_bpe(args.clip_bpe or SHIPPED_CLIP_BPE)
    except TokenizerOfflineError as error:
        raise CaptionCliError(str(error)) from None  # already names what to pass
    except TokenizerError as error:
        raise CaptionCliError(f"{error}; pass --tokenizer DIR or --clip-bpe "
                              "bpe_simple_vocab_16e6.txt.gz, or leave both out for the shipped "
                              "vocabulary (--max-tokens 0: no budget)") from None


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


# Loaded once per process and file version: repeated runs in one process (tests, notebooks)
# skip re-reading the 140k-row database and rebuilding the tokenizer.
@functools.lru_cache(maxsize=4)
def _cached_tag_db(key: tuple[str, int, int]) -> TagDatabase:
    return load_tag_database(key[0])


def _load_tag_db(path: Path | None) -> TagDatabase:
    """The shipped database, or --tags-db's (merged over it when it is a WD tag list)."""
    if path is None:
        return load_tag_database()
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
    """Refuse an output that overlaps the input; claim it (OutputError for a device or FIFO)."""
    source, target = source.resolve(), output.resolve()
    if output_format == "jsonl":
        if target == source:
            raise CaptionCliError(f"{output}: the output would overwrite the input")
        outputs.claim_file(output)
        return
    if target == source or source in target.parents:
        raise CaptionCliError(f"{output}: refusing to write captions into the input folder {source}; "
                              "choose a separate output folder")
    outputs.claim_dir(output)
    if output.is_dir():
        outputs.remove_stale_temps_under(output)  # `.txt` temps of a killed earlier run


def _fit_percentiles(captioner: Captioner, path: Path) -> None:
    posts = (item for item in read_danbooru_jsonl(path) if isinstance(item, Post))
    cuts = captioner.fit_percentiles(posts)
    logger.info("score percentiles from %s: %s", path, {r: {f"p{k}": round(v, 1) for k, v in c.items()} for r, c in cuts.items()})


# ---- writers ------------------------------------------------------------------------------------

class _StrictStop(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


class _Accepted:
    """Checks ids for duplicates across chunks, logs problems (capped), merges the summaries."""

    def __init__(self, summary: CaptionSummary, strict: bool, max_messages: int) -> None:
        self.summary, self.strict, self.max_messages = summary, strict, max_messages
        self.seen: set[str] = set()
        self.messages = 0

    def outputs(self, results: Iterator[ChunkResult]) -> Iterator[bytes]:
        """Each chunk's JSON lines, duplicates removed."""
        from tqdm import tqdm

        with tqdm(desc="captioning", unit=" records", disable=not sys.stderr.isatty()) as progress:
            for result in results:
                self.summary.merge(result.summary)
                progress.update(result.summary.read)
                for problem in result.problems:
                    self._report(problem)
                yield self._unique(result)

    def _unique(self, result: ChunkResult) -> bytes:
        fresh = set(result.ids)
        if len(fresh) == len(result.ids) and self.seen.isdisjoint(fresh):  # the usual case, at C speed
            self.seen |= fresh
            return result.output
        kept = []
        lines = result.output.split(b"\n")
        counted = result.counted or [None] * len(result.ids)
        for record_id, origin, line, fields in zip(result.ids, result.origins, lines, counted, strict=False):
            if record_id not in self.seen:
                self.seen.add(record_id)
                kept.append(line + b"\n")
                continue
            self.summary.add_record(fields or jsonio.loads(line), sign=-1)
            problem = Problem(origin, f"duplicate id {record_id!r} (first record kept)")
            self.summary.add_problem(problem)
            self._report(problem)
        return b"".join(kept)

    def _report(self, problem: Problem) -> None:
        if self.strict:
            raise _StrictStop(problem)
        self.messages += 1
        if self.max_messages <= 0 or self.messages <= self.max_messages:
            logger.warning("%s", problem)
        elif self.messages == self.max_messages + 1:
            logger.warning("more problems: counted in the summary only (--max-messages 0 shows all)")


def _write_jsonl(lines_of_chunks: Iterator[bytes], output: Path, summary: CaptionSummary) -> None:
    with outputs.atomic_open(output, "wb") as f:
        for lines in lines_of_chunks:
            f.write(lines)
            summary.written += lines.count(b"\n")


def _write_txt(lines_of_chunks: Iterator[bytes], output: Path, style: str, summary: CaptionSummary) -> None:
    """One `.txt` per image, mirroring the input's sub-folders; each file written atomically."""
    field = "sd_scripts" if style == "sd-scripts" else "caption"
    for lines in lines_of_chunks:
        for line in lines.splitlines():
            record = jsonio.loads(line)
            target = (output / record["id"]).with_suffix(".txt")
            outputs.write_text(target, record[field] + "\n", clean=False)  # cleaned in _check_output
            summary.written += 1
