"""The prep pipeline: sources -> validation -> dedupe -> captions -> buckets -> dataset + report.

`prepare()` is the whole stage as a chain of named steps. Everything that can be checked without
touching images (recipe, source paths, tag database, tokenizer, tagger) is checked first, so an
unusable configuration stops before any work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from captioning import (
    Captioner,
    Post,
    TagDatabase,
    TokenCounter,
    load_profile,
    normalize_tag,
    outputs,
)
from captioning.images import load_mask
from captioning.tag_db import load_tag_database
from captioning.tokens import SHIPPED_CLIP_BPE
from train.names import DATASET_DIR, PREP_MANIFEST
from train.prep import sources as src
from train.prep.buckets import bucket_set, closest_bucket, place
from train.prep.dedupe import Deduplicator
from train.prep.recipe import CaptionOptions, Recipe, RecipeError, Source, recipe_to_toml
from train.prep.report import PrepStats, print_summary, write_reports
from train.prep.validate import ImageInfo, ValidateOptions, validate_many
from train.prep.writer import RowSpool, make_temp_dir, publish, write_dataset

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the row schema or the meaning of a column changes
# Written into every OUT: the marker by which prep recognises a folder it may replace. Nothing
# else is taken as ours (a folder that merely holds a `report.json` may be the user's).
MANIFEST_FORMAT = "animagine-lora prep"
IMAGE_CACHE = "image_cache"  # under OUT: images that were embedded as bytes in a dataset


@dataclass(frozen=True)
class RunOptions:
    workers: int = 1
    shard_index: int = 0
    num_shards: int = 1
    force: bool = False
    tagger_batch_size: int = 8
    show_summary: bool = True


@dataclass
class PrepResult:
    out: Path
    up_to_date: bool
    rows: int
    stats: PrepStats | None


@dataclass
class CaptionTools:
    """Everything captioning needs, loaded once before any image work."""

    options: CaptionOptions
    tag_db: TagDatabase | None
    token_counter: TokenCounter | None
    tagger: object | None  # captioning.tagger.WDTagger
    _captioners: dict = dataclasses.field(default_factory=dict)

    def captioner(self, profile: str, max_tokens: int) -> Captioner:
        key = (profile, max_tokens)
        if key not in self._captioners:
            self._captioners[key] = Captioner(
                load_profile(profile), self.tag_db, self.token_counter, max_tokens
            )
        return self._captioners[key]

    def category_name(self, tag: str) -> str:
        if self.tag_db is None:
            return "uncategorised"
        category = self.tag_db.category(self.tag_db.resolve(normalize_tag(tag)))
        return category.name.lower() if category is not None else "unknown"


def load_caption_tools(options: CaptionOptions, sources: list[Source]) -> CaptionTools:
    """Tag database, token counter, tagger and every profile named; RecipeError naming the field."""

    def checked(field_name: str, loader, value):
        try:
            return loader(value)
        except Exception as error:  # noqa: BLE001 - any failure here means an unusable setting
            raise RecipeError(f"caption.{field_name}: cannot load {value!r}: {error}") from None

    # Default: the database and vocabulary shipped with `captioning` (a WD tag list adds to it).
    tag_db = checked("tags_db", load_tag_database, options.tags_db)
    if options.tokenizer:
        counter = checked("tokenizer", TokenCounter.from_pretrained, options.tokenizer)
    else:
        counter = checked("clip_bpe", TokenCounter.from_bpe, options.clip_bpe or SHIPPED_CLIP_BPE)
    tagger = None
    if options.tagger:
        from captioning.tagger import WDTagger

        tagger = checked(
            "tagger",
            lambda v: WDTagger.load(
                v,
                general_threshold=options.general_threshold,
                character_threshold=options.character_threshold,
            ),
            options.tagger,
        )
    tools = CaptionTools(options, tag_db, counter, tagger)
    for index, profile in enumerate([options.profile] + [s.caption.profile for s in sources]):
        if profile is not None:
            where = "caption.profile" if index == 0 else f"sources.{index - 1}.caption.profile"
            try:
                load_profile(profile)
            except Exception as error:  # noqa: BLE001 - reported as an unusable setting
                raise RecipeError(f"{where}: cannot load profile {profile!r}: {error}") from None
    return tools


def check_sources(recipe: Recipe) -> list[str]:
    """The kind of each source ("folder" | "hf"); RecipeError naming the source field."""
    kinds = []
    names = set()
    for index, source in enumerate(recipe.sources):
        if source.name in names:
            raise RecipeError(f"sources.{index}.name: duplicate source name {source.name!r}")
        names.add(source.name)
        try:
            kind = src.detect_kind(source.path)
        except FileNotFoundError as error:
            raise RecipeError(f"sources.{index}.path: {error}") from None
        if (
            source.type != "auto"
            and source.type != kind
            and not (source.type == "hf" and kind == "folder")
        ):
            raise RecipeError(
                f"sources.{index}.type: {source.path} looks like {kind!r}, not {source.type!r}"
            )
        kinds.append("hf" if source.type == "hf" else kind)
    return kinds


def check_output(out: Path, recipe: Recipe) -> None:
    """Refuse an OUT that would overwrite anything but a previous prep result.

    OUT is replaced as a whole, so it must not be (or contain, or lie inside) a source, and an
    existing non-empty OUT must be a previous prep output (it has our `manifest.json`).
    Raises RecipeError, or OutputError for a device, FIFO or a parent that is a file.
    """
    for index, source in enumerate(recipe.sources):
        path = Path(source.path).resolve()
        if not path.exists():
            continue  # a Hub id
        if path.is_relative_to(out) or out.parent.is_relative_to(path):
            raise RecipeError(f"--out {out}: overlaps source {index} ({path}); write it elsewhere")
    outputs.claim_dir(out)
    if out.is_dir() and any(out.iterdir()) and not is_prep_output(out):
        raise RecipeError(
            f"--out {out}: exists and is not a prep output (no {PREP_MANIFEST} written by prep); "
            "choose a new or empty folder"
        )


def is_prep_output(out: Path) -> bool:
    """Whether `out` holds the manifest prep writes (any format version: a re-prep upgrades it)."""
    try:
        manifest = json.loads((out / PREP_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT


def write_manifest(folder: Path) -> None:
    manifest = {"format": MANIFEST_FORMAT, "format_version": FORMAT_VERSION}
    outputs.write_text(folder / PREP_MANIFEST, json.dumps(manifest, indent=2) + "\n")


def fingerprint(recipe: Recipe, run: RunOptions) -> str:
    """Hash of everything the result depends on: input files (path, size, mtime), options, code."""
    digest = hashlib.sha256()
    digest.update(
        f"v{FORMAT_VERSION}\n{recipe_to_toml(recipe)}\n{run.shard_index}/{run.num_shards}\n".encode()
    )
    caption = recipe.caption
    profiles = [caption.profile] + [s.caption.profile for s in recipe.sources if s.caption.profile]
    paths = (
        [s.path for s in recipe.sources]
        + [p for p in (caption.tags_db, caption.clip_bpe, caption.tokenizer, caption.tagger) if p]
        + [p for p in profiles if Path(p).exists()]
    )  # profile TOML files; built-in names are code
    for line in src.listing_fingerprint(paths):
        digest.update(line.encode("utf-8") + b"\n")
    return digest.hexdigest()


def is_up_to_date(out: Path, expected: str) -> bool:
    try:
        report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        report.get("fingerprint") == expected and (out / DATASET_DIR).is_dir() and is_prep_output(out)
    )


def unit_hash(text: str) -> float:
    """Deterministic value in [0, 1) for `text` (the train/val split)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def _records(
    recipe: Recipe, kinds: list[str], out: Path, temp: Path, run: RunOptions, stats: PrepStats
) -> Iterator[tuple[src.Record, str]]:
    """(record, path to read it from now) for this shard; listing problems go to `stats`."""
    for source, kind in zip(recipe.sources, kinds):
        if kind == "folder":
            listing = src.walk_folder(Path(source.path), source.name, source.repeats)
        else:
            listing = src.read_hf(
                source.path, source.split, source.name, source.repeats, out / IMAGE_CACHE
            )
        found = 0
        for item in listing:
            if isinstance(item, src.Rejected):
                stats.reject(item.path, item.reason)
                continue
            if run.num_shards > 1 and src.shard_of(item.id, run.num_shards) != run.shard_index:
                continue
            found += 1
            stats.warnings.extend(item.warnings)
            read_path = item.image_path
            if item.image_bytes is not None:
                # Embedded bytes: written into the output's cache, never inside the input.
                read_path = str(temp / IMAGE_CACHE / Path(item.image_path).name)
                Path(read_path).parent.mkdir(exist_ok=True)
                Path(read_path).write_bytes(item.image_bytes)
                item.image_bytes = None
            stats.read += 1
            yield item, read_path
        if not found:
            stats.reject(source.path, f"no images found (source {source.name!r})")
            logger.warning("source %r (%s): no images found", source.name, source.path)


def _untagged_post(record: src.Record, tags: list[str]) -> Post:
    return Post(
        id=record.id,
        origin=record.image_path,
        tags={},
        uncategorised=tags,
        rating=None,
        score=None,
        created_at=None,
        metadata={},
    )


@dataclass
class RowBuilder:
    """Caption, bucket and split for each kept image -> one dataset row; fills `stats`."""

    recipe: Recipe
    tools: CaptionTools
    stats: PrepStats

    def __post_init__(self) -> None:
        self.sources = {s.name: s for s in self.recipe.sources}
        self.buckets = bucket_set(self.recipe.dataset.buckets)

    def post_of(self, record: src.Record) -> Post:
        """The record's tags plus the source's extra tags and (untagged) folder class tokens."""
        extras = list(self.sources[record.source].caption.extra_tags) + record.extra_tags
        if record.post is None:
            self.stats.untagged += not extras
            return _untagged_post(record, extras)
        return dataclasses.replace(
            record.post, uncategorised=list(record.post.uncategorised) + extras
        )

    def row(self, record: src.Record, info: ImageInfo) -> dict:
        post = self.post_of(record)
        source = self.sources[record.source]
        captioner = self.tools.captioner(
            source.caption.profile or self.recipe.caption.profile,
            source.caption.max_tokens or self.recipe.caption.max_tokens,
        )
        result = captioner.caption(post)
        bucket = closest_bucket(info.width, info.height, self.buckets)
        placement = place(info.width, info.height, bucket)
        year = post.created_at.year if post.created_at is not None else None
        split = "val" if unit_hash(record.id) < self.recipe.dataset.val_fraction else "train"
        self._count(record, post, result, f"{bucket[0]}x{bucket[1]}", year, split)
        return {
            "id": record.id,
            "image_path": record.image_path,
            "sha256": info.sha256,
            "width": info.width,
            "height": info.height,
            **dataclasses.asdict(placement),
            "caption_head": list(result.caption.head),
            "caption_body": list(result.caption.body),
            "caption_tail": list(result.caption.tail),
            "repeats": record.repeats,
            "rating": post.rating,
            "score": post.score,
            "year": year,
            "source": record.source,
            "split": split,
            "metadata": json.dumps(post.metadata, ensure_ascii=False, default=str, sort_keys=True),
            "mask_path": self.mask_path(record, info),
        }

    def mask_path(self, record: src.Record, info: ImageInfo) -> str | None:
        """The file holding the image's loss mask: its `name.mask.png` (which must be readable and
        the image's size), else the image itself when it has alpha, else None. Counted in the report."""
        path = None
        if record.mask_path is not None:
            try:
                size = load_mask(record.mask_path).size
            except (OSError, ValueError) as error:
                size, reason = None, f"unreadable: {error}"
            else:
                reason = f"is {size[0]}x{size[1]}, the image {info.width}x{info.height}"
            if size == (info.width, info.height):
                path = record.mask_path
            else:
                self.stats.warnings.append(f"{record.id}: mask {src.display_path(record.mask_path)} ignored: {reason}")
        if path is None and info.has_alpha:
            path = record.image_path
        self.stats.masked += path is not None
        return path

    def _count(self, record, post: Post, result, bucket: str, year: int | None, split: str) -> None:
        stats = self.stats
        stats.token_lengths.append(result.tokens)
        stats.captions_cut += bool(result.cut)
        stats.unknown_tags.update(result.unknown_tags)
        stats.warnings.extend(f"{record.id}: {w}" for w in result.warnings[:5])
        stats.head_tags.update(result.caption.head)
        for category, tags in post.tags.items():
            stats.add_tags(category.name.lower(), tags)
        for tag in post.uncategorised:
            stats.add_tags(self.tools.category_name(tag), [normalize_tag(tag)])
        stats.buckets[bucket] += 1
        stats.splits[split] += 1
        if post.rating:
            stats.ratings[post.rating] += 1
        if year is not None:
            stats.years[year] += 1
        if post.score is not None:
            stats.scores.append(post.score)


def _build(
    recipe: Recipe,
    kinds: list[str],
    out: Path,
    temp: Path,
    run: RunOptions,
    tools: CaptionTools,
    stats: PrepStats,
) -> int:
    """Listing -> validation -> dedupe -> (auto-tag) -> rows -> Arrow; returns the row count."""
    builder = RowBuilder(recipe, tools, stats)
    options = ValidateOptions(min_side=recipe.dataset.min_side, phash=recipe.dataset.near_dup)
    dedupe = Deduplicator(recipe.dataset.near_dup, recipe.dataset.near_dup_distance)
    spool = RowSpool(temp / "rows.jsonl")
    untagged: list[tuple[src.Record, str, ImageInfo]] = []  # waiting for a tagger batch

    def tag_pending() -> None:
        posts = tools.tagger.tag_files([read_path for _, read_path, _ in untagged])
        for (record, _, info), tagged in zip(untagged, posts):
            stats.auto_tagged += 1
            record.post = dataclasses.replace(tagged, id=record.id)
            spool.append(builder.row(record, info))
        untagged.clear()

    def keep(record: src.Record, read_path: str, info: ImageInfo) -> None:
        if record.post is None and tools.tagger is not None:
            untagged.append((record, read_path, info))
            if len(untagged) >= run.tagger_batch_size:
                tag_pending()
            return
        spool.append(builder.row(record, info))

    # Folder images (no bytes held) wait here until the end, so that a better exact copy found
    # later (captioned, more repeats) can still take their place; sha256 -> the copy kept so far.
    deferred: dict[str, tuple[src.Record, str, ImageInfo]] = {}
    listed = _records(recipe, kinds, out, temp, run, stats)
    results = validate_many(
        listed,
        path_of=lambda pair: pair[1],
        options=options,
        workers=run.workers,
        max_image_pixels=recipe.dataset.max_image_pixels,
    )
    for (record, read_path), info in tqdm(results, desc="prep", unit="img", disable=None):
        if isinstance(info, str):
            stats.reject(src.display_path(record.image_path), info)
            continue
        replaceable = record.image_bytes is None
        rank = (record.post is not None, record.repeats) if replaceable else None
        duplicate = dedupe.check(record.id, info.sha256, info.phash, rank)
        if duplicate is not None:
            stats.duplicates.append(tuple(duplicate))
            if duplicate.kept == record.id:  # this copy replaces the one kept so far
                deferred[info.sha256] = (record, read_path, info)
            continue
        stats.kept += 1
        if replaceable:
            deferred[info.sha256] = (record, read_path, info)
        else:
            keep(record, read_path, info)
    for kept in deferred.values():
        keep(*kept)
    if untagged:
        tag_pending()
    spool.close()
    with outputs.output_errors(out):  # a full disk: one line naming OUT, the old OUT intact
        rows = write_dataset(spool.path, temp / DATASET_DIR, temp / "arrow_cache")
    spool.path.unlink()
    shutil.rmtree(temp / "arrow_cache", ignore_errors=True)
    return rows


def prepare(recipe: Recipe, out: Path, run: RunOptions = RunOptions()) -> PrepResult:
    """Build the dataset for `recipe` at `out` (see the module docstring)."""
    if run.num_shards < 1 or not 0 <= run.shard_index < run.num_shards:
        raise RecipeError(f"--shard-index: must be in [0, {run.num_shards}) with --num-shards >= 1")
    out = Path(out).resolve()
    kinds = check_sources(recipe)
    check_output(out, recipe)
    expected = fingerprint(recipe, run)
    if not run.force and is_up_to_date(out, expected):
        logger.info("%s is up to date (inputs and options unchanged); --force rebuilds", out)
        return PrepResult(out, True, 0, None)
    tools = load_caption_tools(recipe.caption, recipe.sources)
    stats = PrepStats()
    temp = make_temp_dir(out)
    try:
        rows = _build(recipe, kinds, out, temp, run, tools, stats)
        with outputs.output_errors(out):
            outputs.write_text(temp / "recipe.toml", recipe_to_toml(recipe))
            write_reports(
                stats,
                temp,
                {
                    "fingerprint": expected,
                    "format_version": FORMAT_VERSION,
                    "shard": {"index": run.shard_index, "num_shards": run.num_shards},
                },
            )
            write_manifest(temp)
            publish(temp, out)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if run.show_summary:
        print_summary(stats, out)
    return PrepResult(out, False, rows, stats)
