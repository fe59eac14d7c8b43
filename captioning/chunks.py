"""The work units of `animagine-lora caption`, and captioning them in parallel.

A JSON-lines input is cut into byte ranges that end at line ends; a folder into groups of
images. Captioning a chunk gives a `ChunkResult`: the chunk's output as JSON lines in one bytes
object, the ids and origins of its records, its problems and its summary.

Why byte ranges and one bytes object per chunk: at booru-dump scale (Animagine 4.0 was trained
on 8.4M posts) passing each post's input line to a worker and a per-record object back cost as
much CPU as captioning itself (bench/RESULTS.md, "Captioning"). A worker reads its range from the file
(`os.pread` on a descriptor opened before the fork) and sends back a few large objects, so the
parent only checks ids for duplicates and writes.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from captioning.captioner import Captioner
from captioning.jsonio import dumps_line
from captioning.post import Post, Problem
from captioning.readers import parse_danbooru_line, read_danbooru_json, read_tag_file
from captioning.summary import SUMMARY_FIELDS, CaptionSummary
from captioning.tags import escape_prompt

CHUNK_BYTES = 1 << 20  # about a thousand Danbooru posts: few enough tasks, small enough to balance
CHUNK_IMAGES = 200
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".avif", ".tif", ".tiff"})


class LineRange(NamedTuple):
    """Bytes [start, end) of a JSON-lines file, whole lines; `first_line` numbers the first (1-based)."""

    start: int
    end: int
    first_line: int


class ImageGroup(NamedTuple):
    """Images (with sidecars) under `root`; their ids are paths relative to it."""

    root: Path
    images: list[Path]


class ChunkResult(NamedTuple):
    output: bytes  # one JSON line per captioned record, in input order
    ids: list[str]  # the records' ids, in the same order
    origins: list[str]  # where each record came from ("file:line" or the sidecar), for messages
    problems: list[Problem]  # skipped records and warnings, in input order
    summary: CaptionSummary
    # With --fields: per record, the fields the summary counts (the lines may lack them).
    counted: list[dict] | None = None


# Every field of an output record, in the order written; `--fields` picks some of them.
FIELDS = ("id", "caption", "prompt", "sd_scripts", "head", "body", "tail", "tokens", "cut", "dropped",
          "unknown_tags", "rating", "year", "score_tag", "quality_tag")


def line_ranges(path: Path, chunk_bytes: int | None = None) -> Iterator[LineRange]:
    """Cut a JSON-lines file into ranges of about `chunk_bytes` that end after a newline.

    Reads the file once to count lines (so that messages can name them); a line longer than a
    chunk makes a longer range.
    """
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    start, first_line, pending = 0, 1, b""
    with path.open("rb", buffering=0) as f:
        while block := f.read(chunk_bytes):
            data = pending + block if pending else block
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                pending = data
                continue
            yield LineRange(start, start + cut, first_line)
            first_line += data.count(b"\n", 0, cut)
            start += cut
            pending = data[cut:]
    if pending:  # the last line has no newline
        yield LineRange(start, start + len(pending), first_line)


def image_groups(folder: Path, per_group: int | None = None) -> Iterator[ImageGroup]:
    per_group = per_group or CHUNK_IMAGES
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(folder).parts))  # as prep
    for start in range(0, len(images), per_group):
        yield ImageGroup(folder, images[start:start + per_group])


def output_record(post: Post, captioner: Captioner) -> tuple[dict, list[str]]:
    """The JSON object written for one post, and the captioner's warnings about it."""
    result = captioner.caption(post)
    caption = result.caption
    training = caption.training()
    record = {
        "id": post.id, "caption": training, "prompt": escape_prompt(training), "sd_scripts": caption.sd_scripts(),
        "head": caption.head, "body": caption.body, "tail": caption.tail, "tokens": result.tokens,
        "cut": result.cut, "dropped": result.dropped, "unknown_tags": result.unknown_tags,
        "rating": result.rating, "year": result.year, "score_tag": result.score_tag,
        "quality_tag": result.quality_tag,
    }
    return record, result.warnings


class _ChunkBuilder:
    """Collects one chunk's records and problems, in input order."""

    def __init__(self, captioner: Captioner) -> None:
        self.captioner = captioner
        self.lines: list[bytes] = []
        self.ids: list[str] = []
        self.origins: list[str] = []
        self.problems: list[Problem] = []
        self.summary = CaptionSummary()
        self.counted: list[dict] | None = None if _FIELDS is None else []

    def add(self, parsed: list) -> None:
        """One input record, as a reader gives it: warnings then a Post, or a Problem."""
        summary = self.summary
        summary.read += 1
        post = None
        for item in parsed:
            if type(item) is Post:
                post = item
            else:
                self._problem(item)
        if post is not None:
            record, warnings = output_record(post, self.captioner)
            for warning in warnings:
                self._problem(Problem(post.origin, warning, skipped=False))
            summary.add_record(record)
            if _FIELDS is None:
                self.lines.append(dumps_line(record))
            else:
                self.lines.append(dumps_line({k: record[k] for k in _FIELDS}))
                self.counted.append({k: record[k] for k in SUMMARY_FIELDS})
            self.ids.append(post.id)
            self.origins.append(post.origin)
        elif not any(p.skipped for p in parsed):
            self._problem(Problem(parsed[0].origin if parsed else "?", "no record"))

    def _problem(self, problem: Problem) -> None:
        self.problems.append(problem)
        self.summary.add_problem(problem)

    def result(self) -> ChunkResult:
        return ChunkResult(b"".join(self.lines), self.ids, self.origins, self.problems, self.summary,
                           self.counted)


# Set in the parent before the fork: workers inherit the loaded database, tokenizer and warm
# caches, and the input's open descriptor, instead of rebuilding them from pickles.
_CAPTIONER: Captioner | None = None
_SOURCE: tuple[str, int] | None = None  # (path for messages, open descriptor)
_PREPARE = True  # batch-classify each chunk's tags first, while the caches are cold
_FIELDS: tuple[str, ...] | None = None  # the fields written (None: all)


def caption_chunk(chunk: LineRange | ImageGroup) -> ChunkResult:
    builder = _ChunkBuilder(_CAPTIONER)
    if type(chunk) is LineRange:
        _caption_lines(chunk, builder)
    else:
        for image in chunk.images:
            builder.add(_read_image_sidecar(chunk.root, image))
    return builder.result()


def _caption_lines(chunk: LineRange, builder: _ChunkBuilder) -> None:
    global _PREPARE
    path, fd = _SOURCE
    lines = os.pread(fd, chunk.end - chunk.start, chunk.start).split(b"\n")
    if not lines[-1]:
        lines.pop()  # the piece after the final newline
    parsed_lines = (parse_danbooru_line(line, f"{path}:{number}")
                    for number, line in enumerate(lines, start=chunk.first_line))
    if _PREPARE:
        parsed_lines = list(parsed_lines)
        posts = (item for parsed in parsed_lines for item in parsed if type(item) is Post)
        new_tags = builder.captioner.prepare(posts)
        # Once a chunk brings few new tags the caches are warm: the per-post path is cheaper.
        _PREPARE = new_tags > len(parsed_lines) // 4
    # Otherwise parsed one at a time: with few objects alive, the garbage collector's passes
    # during the chunk stay short (holding a chunk's posts made captioning 1.5x slower).
    for parsed in parsed_lines:
        if parsed:  # [] for a blank line
            builder.add(parsed)


def _read_image_sidecar(root: Path, image: Path) -> list:
    image_id = image.relative_to(root).as_posix()
    try:
        image_id.encode("utf-8")
    except UnicodeEncodeError:
        # Undecodable bytes in the name (os.fsdecode's surrogates) cannot go into a JSON output
        # or a caption file name; one such file must not stop the run.
        return [Problem(ascii(str(image)), "file name is not valid UTF-8: rename the file")]
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


def caption_chunks(chunks: Iterable[LineRange | ImageGroup], captioner: Captioner, workers: int,
                   source: Path | None = None, fields: Sequence[str] | None = None) -> Iterator[ChunkResult]:
    """Caption chunks in input order, in this process or in `workers` forked processes.

    `source` is the JSON-lines file that `LineRange` chunks refer to; `fields` the output
    fields to write (names from FIELDS; None: all).
    """
    global _CAPTIONER, _SOURCE, _PREPARE, _FIELDS
    fd = os.open(source, os.O_RDONLY) if source is not None else -1
    _CAPTIONER, _SOURCE, _PREPARE = captioner, (str(source), fd), True
    _FIELDS = None if fields is None or tuple(fields) == FIELDS else tuple(fields)
    try:
        if workers <= 1:
            yield from map(caption_chunk, chunks)
            return
        # The database and caches are hundreds of thousands of long-lived objects: frozen, the
        # workers' garbage collector neither scans them nor copies their pages on write.
        gc.collect()
        gc.freeze()
        try:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                yield from pool.imap(caption_chunk, chunks)
        finally:
            gc.unfreeze()
    finally:
        _CAPTIONER, _SOURCE, _FIELDS = None, None, None
        if fd >= 0:
            os.close(fd)
