"""Listing the records of a dataset source, streamed one image at a time.

Three on-disk layouts are read by one folder walker, per image, from whichever sidecar is present:
gallery-dl (`name.jpg.json` or `name.json`, a Danbooru post), sd-scripts (`name.txt` /
`name.caption`, flat tags; `N_name` first-level folders repeat their images N times and, as in
sd-scripts, lend `name` as the caption of images without a sidecar) and untagged images.
Hugging Face datasets (`imagefolder` with metadata.jsonl/metadata.csv, parquet files, or a Hub id)
are read with the `datasets` library in streaming mode, images undecoded.

Nothing here decodes images (that is the parallel validation stage); everything yields either a
`Record` or a `Rejected` with the path and reason, never raises on bad input.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from captioning import Category, Post
from captioning.readers import read_danbooru_json, read_tag_file
from train.prep.recipe import MAX_REPEATS

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif"}
)
SIDECAR_SUFFIXES = (".json", ".txt", ".caption")
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
TAG_COLUMNS = ("tags", "tag_string", "text", "caption", "prompt")
DANBOORU_FIELDS = {
    "tag_string_general": Category.GENERAL,
    "tag_string_artist": Category.ARTIST,
    "tag_string_copyright": Category.COPYRIGHT,
    "tag_string_character": Category.CHARACTER,
    "tag_string_meta": Category.META,
}
RATINGS = {
    "g": "g",
    "general": "g",
    "s": "s",
    "sensitive": "s",
    "q": "q",
    "questionable": "q",
    "e": "e",
    "explicit": "e",
}


@dataclass
class Record:
    """One image to validate and caption."""

    id: str  # unique within the dataset: source name + relative path (or row index)
    image_path: str  # absolute path of the original, or of the cached copy of embedded bytes
    source: str
    repeats: int
    post: Post | None  # None: no tags at all (auto-tag or report)
    extra_tags: list[str] = field(default_factory=list)  # folder class tokens, recipe extra tags
    image_bytes: bytes | None = None  # embedded image (parquet) still to be written to the cache
    warnings: list[str] = field(default_factory=list)  # sidecar problems that did not reject it
    mask_path: str | None = None  # `name.mask.png` beside the image: its loss mask (train.masked_loss)


MASK_SUFFIX = ".mask.png"


def is_mask_name(name: str) -> bool:
    return name.lower().endswith(MASK_SUFFIX)


@dataclass(frozen=True)
class Rejected:
    path: str
    reason: str


def display_path(path: str | os.PathLike) -> str:
    """A printable path even when the name is not valid UTF-8 (surrogate-escaped bytes)."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shard_of(record_id: str, num_shards: int) -> int:
    """Deterministic shard of a record: sha1 of its id modulo `num_shards`.

    Hashing the id (not the listing position) keeps a record on the same shard when other files
    are added or removed, and needs no coordination between machines.
    """
    return int.from_bytes(hashlib.sha1(record_id.encode("utf-8")).digest()[:8], "big") % num_shards


# ---------------------------------------------------------------- folders


def _scan(directory: str) -> tuple[list[os.DirEntry], list[os.DirEntry], list[Rejected]]:
    """Files and sub-folders of `directory` (sorted), plus entries that cannot be stat'ed."""
    files, folders, rejected = [], [], []
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as error:
        return [], [], [Rejected(display_path(directory), f"cannot list folder: {error.strerror}")]
    for entry in entries:
        if entry.name.startswith("."):  # .thumbnails/, .git/, ._x.png: skipped, as sd-scripts' glob does
            continue
        if not _is_utf8(entry.name):
            rejected.append(Rejected(display_path(entry.path), "file name is not valid UTF-8"))
            continue
        try:
            is_dir = entry.is_dir()
            is_file = entry.is_file()
            entry.stat()
        except OSError as error:  # symlink loops (ELOOP), permission errors
            rejected.append(Rejected(entry.path, f"cannot stat: {error.strerror}"))
            continue
        if is_dir:
            folders.append(entry)
        elif is_file:
            files.append(entry)
        elif entry.is_symlink():
            rejected.append(Rejected(entry.path, "broken symbolic link"))
    return files, folders, rejected


def _sidecar_post(sidecar: Path, image_id: str) -> tuple[Post | None, list[str]] | Rejected:
    """(post, warnings) from a sidecar; (None, [...]) for an empty one; Rejected if unreadable.

    An empty caption file means "no tags" to sd-scripts users (the image still trains), so it
    makes the image untagged rather than rejected.
    """
    try:
        if not sidecar.read_bytes().strip():
            return None, [f"{sidecar}: empty sidecar, image treated as untagged"]
        if sidecar.suffix == ".json":
            results = list(read_danbooru_json(sidecar))
        else:
            results = list(read_tag_file(sidecar, image_id))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return Rejected(str(sidecar), f"unreadable sidecar: {error}")
    posts = [r for r in results if isinstance(r, Post)]
    problems = [str(r) for r in results if not isinstance(r, Post)]
    if not posts:
        return Rejected(str(sidecar), "unreadable sidecar: " + ("; ".join(problems) or "no post"))
    return posts[0], problems


def capped_repeats(repeats: int, where: str) -> int:
    """`repeats`, at most MAX_REPEATS (logged: the folder name is most likely a typo)."""
    if repeats <= MAX_REPEATS:
        return repeats
    logger.warning("%s: %d repeats capped at %d (recipe.MAX_REPEATS); rename the folder to "
                   "choose fewer", display_path(where), repeats, MAX_REPEATS)
    return MAX_REPEATS


def walk_folder(root: Path, source: str, repeats: int = 1) -> Iterator[Record | Rejected]:
    """Every image below `root` with its sidecar, in sorted order; folder symlink loops are cut."""
    root = Path(root).resolve()
    seen_folders: set[tuple[int, int]] = set()
    stack: list[tuple[str, int, list[str]]] = [(str(root), repeats, [])]
    while stack:
        directory, folder_repeats, class_tokens = stack.pop()
        stat = os.stat(directory)
        if (stat.st_dev, stat.st_ino) in seen_folders:
            yield Rejected(directory, "symbolic link loop: folder already visited")
            continue
        seen_folders.add((stat.st_dev, stat.st_ino))
        files, folders, rejected = _scan(directory)
        yield from rejected
        yield from _folder_records(root, files, source, folder_repeats, class_tokens)
        for folder in reversed(folders):  # reversed: the stack pops them in sorted order
            match = REPEAT_FOLDER.match(folder.name) if directory == str(root) else None
            if match:
                tokens = [t.strip() for t in match.group(2).split(",") if t.strip()]
                stack.append((folder.path, capped_repeats(repeats * int(match.group(1)), folder.path), tokens))
            else:
                stack.append((folder.path, folder_repeats, class_tokens))


def _folder_records(
    root: Path, files: list[os.DirEntry], source: str, repeats: int, class_tokens: list[str]
) -> Iterator[Record | Rejected]:
    by_name = {entry.name: entry for entry in files}
    claimed: set[str] = set()
    # `name.mask.png` is the loss mask of `name.*`, not an image of its own.
    images = [e for e in files if Path(e.name).suffix.lower() in IMAGE_SUFFIXES and not is_mask_name(e.name)]
    for entry in images:
        stem = Path(entry.name).stem
        mask = by_name.get(stem + MASK_SUFFIX)
        claimed.update([mask.name] if mask else [])
        candidates = [entry.name + ".json", stem + ".json", stem + ".txt", stem + ".caption"]
        present = [name for name in candidates if name in by_name]
        claimed.update(present)
        relative = (
            Path(entry.path).relative_to(root).as_posix()
            if Path(entry.path).is_relative_to(root)
            else entry.name
        )
        record_id = f"{source}/{relative}"
        post: Post | None = None
        warnings: list[str] = []
        if present:
            result = _sidecar_post(Path(by_name[present[0]].path), record_id)
            if isinstance(result, Rejected):
                yield Rejected(entry.path, result.reason + f" ({result.path})")
                continue
            post, warnings = result
        yield Record(
            id=record_id,
            image_path=os.path.abspath(entry.path),
            source=source,
            repeats=repeats,
            post=post,
            extra_tags=[] if post is not None else list(class_tokens),
            warnings=warnings,
            mask_path=os.path.abspath(mask.path) if mask else None,
        )
    for entry in files:
        suffix = Path(entry.name).suffix.lower()
        if (suffix in SIDECAR_SUFFIXES or is_mask_name(entry.name)) and entry.name not in claimed:
            yield Rejected(entry.path, "sidecar without image")


# ---------------------------------------------------------------- Hugging Face datasets


def _is_hf_folder(path: Path) -> bool:
    return path.is_dir() and any(
        (path / name).exists() for name in ("metadata.jsonl", "metadata.csv")
    )


def _parquet_files(path: Path) -> list[str]:
    if path.is_file() and path.suffix == ".parquet":
        return [str(path)]
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*.parquet"))
    return []


def detect_kind(path: str) -> str:
    """`"hf"` for imagefolder/parquet/Hub datasets, `"folder"` for a plain folder of images."""
    local = Path(path)
    if _is_hf_folder(local) or _parquet_files(local):
        return "hf"
    if local.is_dir():
        return "folder"
    if not local.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        return "hf"  # a Hub dataset id
    raise FileNotFoundError(f"{path}: no such folder, parquet file or Hub dataset id")


def _open_hf(path: str, split: str):
    import datasets

    local = Path(path)
    if _is_hf_folder(local):
        return datasets.load_dataset(
            "imagefolder", data_dir=str(local), split=split, streaming=True
        )
    parquet = _parquet_files(local)
    if parquet:
        return datasets.load_dataset("parquet", data_files=parquet, split="train", streaming=True)
    return datasets.load_dataset(path, split=split, streaming=True)


def _image_column(features) -> str | None:
    import datasets

    for name, feature in (features or {}).items():
        if isinstance(feature, datasets.Image):
            return name
        if isinstance(feature, dict) and {"bytes", "path"} <= set(feature):
            return name
    return None


def _row_post(row: dict[str, Any], record_id: str, origin: str) -> Post | None:
    """Tags of a dataset row: Danbooru `tag_string_*` fields, else a flat tag column."""
    tags: dict[Category, list[str]] = {}
    for column, category in DANBOORU_FIELDS.items():
        if isinstance(row.get(column), str) and row[column].strip():
            tags[category] = row[column].split()
    uncategorised: list[str] = []
    if not tags:
        for column in TAG_COLUMNS:
            value = row.get(column)
            if isinstance(value, list):
                uncategorised = [str(v) for v in value]
            elif isinstance(value, str) and value.strip():
                uncategorised = [t.strip() for t in value.split(",") if t.strip()]
            if uncategorised:
                break
    if not tags and not uncategorised:
        return None
    rating = RATINGS.get(str(row.get("rating", "")).lower())
    score = row.get("score") if isinstance(row.get("score"), int) else None
    created = row.get("media_asset", {}) or {}
    created_text = (created.get("created_at") if isinstance(created, dict) else None) or row.get(
        "created_at"
    )
    created_at = None
    if isinstance(created_text, str):
        try:
            created_at = datetime.fromisoformat(created_text)
        except ValueError:
            created_at = None
    used = {k: v for k, v in row.items() if isinstance(v, (str, int, float, bool)) or v is None}
    return Post(
        id=record_id,
        origin=origin,
        tags=tags,
        uncategorised=uncategorised,
        rating=rating,
        score=score,
        created_at=created_at,
        metadata=used,
    )


def read_hf(
    path: str, split: str, source: str, repeats: int, cache_dir: Path
) -> Iterator[Record | Rejected]:
    """Rows of a Hugging Face dataset; embedded image bytes are destined for `cache_dir`
    (under the output folder, never inside the input)."""
    import datasets

    try:
        dataset = _open_hf(path, split)
        column = _image_column(dataset.features)
        if column is None:
            yield Rejected(path, "no image column in dataset")
            return
        if isinstance(dataset.features[column], datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
        roots, local = _dataset_roots(path), Path(path).exists()
        for index, row in enumerate(dataset):
            image = row.pop(column) or {}
            origin = f"{path}:{index}"
            data, file_path = image.get("bytes"), image.get("path")
            if not data and not file_path:
                yield Rejected(origin, "row has no image")
                continue
            name = Path(file_path).name if file_path else f"{index}.png"
            if data:
                record_id = f"{source}/{index:08d}_{name}"
                digest = hashlib.sha256(data).hexdigest()
                image_path = str(cache_dir / f"{digest}{Path(name).suffix.lower() or '.png'}")
            else:
                inside = _inside(file_path, roots)
                if inside is None:
                    yield Rejected(origin, f"image path {file_path!r} is outside the dataset "
                                   f"folder {roots[0]} (absolute, `..` or a link out): not read")
                    continue
                image_path, relative = inside
                # Hub cache paths hold revision hashes: such ids would change between machines.
                record_id = f"{source}/{relative}" if local else f"{source}/{index:08d}_{name}"
            yield Record(
                id=record_id,
                image_path=image_path,
                source=source,
                repeats=repeats,
                post=_row_post(row, record_id, origin),
                image_bytes=data or None,
            )
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:
        yield Rejected(path, f"cannot read dataset: {error}")


def _dataset_roots(path: str) -> list[Path]:
    """Folders a dataset's rows may name files in: its own folder (a parquet file's folder), or
    for a Hub dataset the caches its files were downloaded into."""
    local = Path(path)
    if local.exists():
        return [(local if local.is_dir() else local.parent).resolve()]
    from huggingface_hub import constants

    import datasets

    return [Path(datasets.config.HF_DATASETS_CACHE).resolve(), Path(constants.HF_HUB_CACHE).resolve()]


def _inside(file_path: str, roots: list[Path]) -> tuple[str, str] | None:
    """(absolute path, path relative to the root) if `file_path` lies inside one of `roots`.

    A relative path is taken relative to the dataset root, never the current folder; symbolic
    links are resolved first, so a link inside pointing out is outside too.
    """
    for root in roots:
        resolved = (root / file_path).resolve()  # an absolute file_path replaces root
        if resolved.is_relative_to(root):
            return str(resolved), resolved.relative_to(root).as_posix()
    return None


def listing_fingerprint(paths: list[str]) -> Iterator[str]:
    """`path size mtime` lines for every file below `paths` (the inputs of the reuse check)."""
    for top in paths:
        if not os.path.exists(top):
            yield f"{top} missing"
            continue
        if os.path.isfile(top):
            st = os.stat(top)
            yield f"{display_path(top)} {st.st_size} {st.st_mtime_ns}"
            continue
        for directory, folders, files in os.walk(top):
            folders[:] = sorted(f for f in folders if not f.startswith("."))  # as walk_folder skips them
            for name in sorted(f for f in files if not f.startswith(".")):
                full = os.path.join(directory, name)
                try:
                    st = os.stat(full)
                except OSError:
                    yield f"{display_path(full)} unreadable"
                    continue
                yield f"{display_path(full)} {st.st_size} {st.st_mtime_ns}"
