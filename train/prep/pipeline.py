"""The prep pipeline: sources -> validation -> dedupe -> curation -> captions -> buckets -> dataset + report.

`prepare()` is the whole stage as a chain of named steps. Everything that can be checked without
touching images (recipe, source paths, tag database, tokenizer, tagger, aesthetic model) is
checked first, so an unusable configuration stops before any work.

Rows are built in two passes, because folding a character's features into its tag needs the
share of each tag over all of the character's images: the first pass validates, dedupes,
auto-tags, scores aesthetics and applies the edit rules, spooling each image's tags to disk
while counting features; the second folds, captions and writes the rows (train.prep.curate).
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
    Category,
    Post,
    TagDatabase,
    TokenCounter,
    load_profile,
    normalize_tag,
    outputs,
)
from captioning.curation import Change
from captioning.images import load_mask
from captioning.tag_db import load_tag_database
from captioning.tags import display_tag
from captioning.tokens import SHIPPED_CLIP_BPE
from train.names import DATASET_DIR, PREP_MANIFEST
from train.prep import sources as src
from train.prep.buckets import bucket_set, closest_bucket, place
from train.prep.curate import Curator
from train.prep.dedupe import Deduplicator
from train.prep.gallery import GALLERY_MAX, THUMBS, GalleryItem, struck_tags, thumb_name
from train.prep.manifest import is_prep_output, write_manifest
from train.prep.recipe import CaptionOptions, Recipe, RecipeError, Source, recipe_to_toml
from train.prep.report import PrepStats, print_summary, write_reports
from train.prep.validate import ImageInfo, ValidateOptions, validate_many
from train.prep.writer import RowSpool, Spool, make_temp_dir, publish, write_dataset

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the row schema or the meaning of a column changes
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
    aesthetic: object | None = None  # captioning.aesthetic.AestheticScorer
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


def load_caption_tools(options: CaptionOptions, sources: list[Source], models: bool = True) -> CaptionTools:
    """Tag database, token counter, tagger, aesthetic model and every profile named; RecipeError
    naming the field. `models=False` leaves the tagger and the aesthetic model out (dry run)."""

    def checked(field_name: str, loader, value):
        try:
            return loader(value)
        except Exception as error:  # noqa: BLE001 - any failure here means an unusable setting
            raise RecipeError(f"caption.{field_name}: cannot load {value!r}: {error}") from None

    for index, profile in enumerate([options.profile] + [s.caption.profile for s in sources]):
        if profile is not None:
            where = "caption.profile" if index == 0 else f"sources.{index - 1}.caption.profile"
            try:
                load_profile(profile)
            except Exception as error:  # noqa: BLE001 - reported as an unusable setting
                raise RecipeError(f"{where}: cannot load profile {profile!r}: {error}") from None

    # Default: the database and vocabulary shipped with `captioning` (a WD tag list adds to it).
    tag_db = checked("tags_db", load_tag_database, options.tags_db)
    if options.tokenizer:
        counter = checked("tokenizer", TokenCounter.from_pretrained, options.tokenizer)
    else:
        counter = checked("clip_bpe", TokenCounter.from_bpe, options.clip_bpe or SHIPPED_CLIP_BPE)
    tagger = aesthetic = None
    if options.aesthetic_model and models:
        from captioning.aesthetic import scorer_for_profile

        # The recipe's profile gives the bands and the scored label (it is checked above).
        aesthetic = checked("aesthetic_model", lambda v: scorer_for_profile(v, load_profile(options.profile)),
                            options.aesthetic_model)
    if options.tagger and models:
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
    tools = CaptionTools(options, tag_db, counter, tagger, aesthetic)
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
        + [p for p in (caption.tags_db, caption.clip_bpe, caption.tokenizer, caption.tagger,
                       caption.aesthetic_model) if p]
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
    recipe: Recipe, kinds: list[str], out: Path, temp: Path | None, run: RunOptions, stats: PrepStats
) -> Iterator[tuple[src.Record, str]]:
    """(record, path to read it from now) for this shard; listing problems go to `stats`.
    Embedded image bytes are written under `temp` (none when `temp` is None: the dry run)."""
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
            if item.image_bytes is not None and temp is not None:
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
    """Curation, caption, bucket and split for each kept image -> one dataset row; fills `stats`.

    `stage` is the first pass (edit rules, feature counts; the image's tags spooled as JSON),
    `row` the second (fold, caption, count); `Curator.decide` runs between them.
    """

    recipe: Recipe
    tools: CaptionTools
    stats: PrepStats

    def __post_init__(self) -> None:
        self.sources = {s.name: s for s in self.recipe.sources}
        self.buckets = bucket_set(self.recipe.dataset.buckets, self.recipe.dataset.max_area)
        self.curator = Curator(self.recipe, self.tools.tag_db)

    def post_of(self, record: src.Record) -> Post:
        """The record's tags plus the source's extra tags, trigger and (untagged) folder class tokens."""
        caption = self.sources[record.source].caption
        extras = list(caption.extra_tags) + record.extra_tags
        if record.post is None:
            self.stats.untagged += not extras and not caption.trigger
            post = _untagged_post(record, extras)
        else:
            post = dataclasses.replace(record.post, uncategorised=list(record.post.uncategorised) + extras)
        if caption.trigger:
            # The trigger is a character tag: it goes to the head and features fold into it.
            tags = dict(post.tags)
            tags[Category.CHARACTER] = [normalize_tag(caption.trigger), *tags.get(Category.CHARACTER, [])]
            post = dataclasses.replace(post, tags=tags)
        return post

    def stage(self, record: src.Record, info: ImageInfo, aesthetic: float | None) -> dict:
        """The first pass for one image: everything but the caption, and its edited tags."""
        post = self.post_of(record)
        self._count_input(post)
        post, changes = self.curator.edit(record.source, post)
        if aesthetic is not None:
            post = dataclasses.replace(post, aesthetic=aesthetic,
                                       metadata={**post.metadata, "aesthetic_score": round(aesthetic, 4)})
        self.curator.observe(post)
        bucket = closest_bucket(info.width, info.height, self.buckets)
        year = post.created_at.year if post.created_at is not None else None
        row = {
            "id": record.id,
            "image_path": record.image_path,
            "sha256": info.sha256,
            "width": info.width,
            "height": info.height,
            **dataclasses.asdict(place(info.width, info.height, bucket)),
            "repeats": record.repeats,
            "rating": post.rating,
            "score": post.score,
            "year": year,
            "source": record.source,
            "split": "val" if unit_hash(record.id) < self.recipe.dataset.val_fraction else "train",
            "metadata": json.dumps(post.metadata, ensure_ascii=False, default=str, sort_keys=True),
            "mask_path": self.mask_path(record, info),
        }
        notes = ["auto-tagged"] if "tagger" in post.metadata else []  # captioning.tagger's record
        notes += ["untagged"] if record.post is None else []
        return {"row": row, "post": post.to_json(), "changes": [list(c) for c in changes], "notes": notes}

    def row(self, staged: dict) -> tuple[dict, GalleryItem]:
        """The second pass for one image: the folded, captioned dataset row and its gallery card."""
        row = staged["row"]
        post, folded = self.curator.fold(Post.from_json(staged["post"]))
        source = self.sources[row["source"]]
        captioner = self.tools.captioner(
            source.caption.profile or self.recipe.caption.profile,
            source.caption.max_tokens or self.recipe.caption.max_tokens,
        )
        result = captioner.caption(post)
        row = {**row, "caption_head": list(result.caption.head), "caption_body": list(result.caption.body),
               "caption_tail": list(result.caption.tail)}
        self._count(row, result)
        changes = [Change(*c) for c in staged["changes"]] + folded
        problems = list(staged["notes"])
        problems += ["cut"] if result.cut else []
        problems += ["unknown"] if result.unknown_tags else []
        problems += ["warnings"] if result.warnings else []
        item = GalleryItem(
            id=row["id"], thumb=thumb_name(row["id"]), source=row["source"], path=src.display_path(row["image_path"]),
            width=row["width"], height=row["height"], bucket_width=row["bucket_width"],
            bucket_height=row["bucket_height"], resize_width=row["resize_width"], resize_height=row["resize_height"],
            crop_left=row["crop_left"], crop_top=row["crop_top"], repeats=row["repeats"], split=row["split"],
            mask=src.display_path(row["mask_path"]) if row["mask_path"] else None,
            head=row["caption_head"], body=row["caption_body"], tail=row["caption_tail"], tokens=result.tokens,
            characters=[display_tag(c) for c in self.curator.characters(post)],
            struck=struck_tags(changes, result.dropped), problems=problems,
        )
        return row, item

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

    def _count_input(self, post: Post) -> None:
        """The input tags by category, as the sources (and tagger) gave them, before curation;
        flat tags under their canonical name (aliases followed), so `blonde` counts as `blonde_hair`."""
        for category, tags in post.tags.items():
            self.stats.add_tags(category.name.lower(), tags)
        resolver = self.curator.resolver
        for tag in post.uncategorised:
            self.stats.add_tags(self.tools.category_name(tag), [resolver.canonical(tag)])

    def _count(self, row: dict, result) -> None:
        stats = self.stats
        stats.token_lengths.append(result.tokens)
        stats.captions_cut += bool(result.cut)
        stats.unknown_tags.update(result.unknown_tags)
        stats.warnings.extend(f"{row['id']}: {w}" for w in result.warnings[:5])
        stats.head_tags.update(result.caption.head)
        stats.caption_tags.update(result.caption.tags)
        for part in ("head", "body", "tail"):
            for tag in getattr(result.caption, part):
                stats.tag_parts.setdefault(tag, part)
        stats.cut_tags.update(result.dropped)
        stats.buckets[f"{row['bucket_width']}x{row['bucket_height']}"] += 1
        stats.splits[row["split"]] += 1
        if row["rating"]:
            stats.ratings[row["rating"]] += 1
        if row["year"] is not None:
            stats.years[row["year"]] += 1
        if row["score"] is not None:
            stats.scores.append(row["score"])


class _Batch:
    """Kept images waiting for the models that run in batches (WD tagger, aesthetic classifier)."""

    def __init__(self, tools: CaptionTools, builder: RowBuilder, stage: Spool, size: int) -> None:
        self.tools, self.builder, self.stage, self.size = tools, builder, stage, size
        self.pending: list[tuple[src.Record, str, ImageInfo]] = []

    def add(self, record: src.Record, read_path: str, info: ImageInfo) -> None:
        self.pending.append((record, read_path, info))
        if len(self.pending) >= self.size:
            self.flush()

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        if not pending:
            return
        untagged = [(record, path) for record, path, _ in pending if record.post is None]
        if untagged and self.tools.tagger is not None:
            for (record, _), tagged in zip(untagged, self.tools.tagger.tag_files([path for _, path in untagged])):
                self.builder.stats.auto_tagged += 1
                record.post = dataclasses.replace(tagged, id=record.id)
        scores: list[float | None] = [None] * len(pending)
        if self.tools.aesthetic is not None:
            scores = self.tools.aesthetic.score_files([path for _, path, _ in pending])
        for (record, _, info), score in zip(pending, scores):
            self.stage.append(self.builder.stage(record, info, score))


def _build(
    recipe: Recipe,
    kinds: list[str],
    out: Path,
    temp: Path,
    run: RunOptions,
    tools: CaptionTools,
    stats: PrepStats,
) -> int:
    """Listing -> validation -> dedupe -> (auto-tag, aesthetic) -> edits -> fold -> rows -> Arrow;
    returns the row count."""
    builder = RowBuilder(recipe, tools, stats)
    (temp / THUMBS).mkdir()
    options = ValidateOptions(min_side=recipe.dataset.min_side, phash=recipe.dataset.near_dup,
                              thumb_dir=str(temp / THUMBS))
    dedupe = Deduplicator(recipe.dataset.near_dup, recipe.dataset.near_dup_distance)
    stage = Spool(temp / "staged.jsonl")
    batch = _Batch(tools, builder, stage, run.tagger_batch_size)

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
        thumb_of=lambda pair: thumb_name(pair[0].id),
    )
    for (record, read_path), info in tqdm(results, desc="prep", unit="img", disable=None):
        if isinstance(info, str):
            stats.reject(src.display_path(record.image_path), info, thumb_name(record.id))
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
            batch.add(record, read_path, info)
    for kept in deferred.values():
        batch.add(*kept)
    batch.flush()
    stage.close()

    stats.fold = builder.curator.decide()
    stats.edits = builder.curator.counts
    spool = RowSpool(temp / "rows.jsonl")
    for staged in stage:
        row, item = builder.row(staged)
        spool.append(row)
        if len(stats.gallery) < GALLERY_MAX:
            stats.gallery.append(item)
    stage.path.unlink()
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
            write_manifest(temp, FORMAT_VERSION, stats.fold.trigger_features() if stats.fold else {})
            publish(temp, out)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if run.show_summary:
        print_summary(stats, out)
    return PrepResult(out, False, rows, stats)
