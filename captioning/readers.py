"""Readers: each input format becomes `Post` records, bad input becomes `Problem`s.

Every reader yields `Post | Problem`. A Problem with `skipped=True` stands in for a record that
could not be read; one with `skipped=False` is a warning about the Post that follows it (which
is captioned without the bad part). Input files are only ever opened for reading.

Formats:
- Danbooru post JSON (the API, `gallery-dl --write-metadata`): JSON lines, or one sidecar per
  image (`image.jpg.json` as gallery-dl writes it, or `image.json`).
- Flat tag lists beside images (`.txt`/`.caption`, kohya style): comma-separated, or
  space-separated with underscores.
- WD v3 tagger output: tag -> probability, with the four rating labels.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path

from captioning import jsonio
from captioning.post import RATINGS, Post, Problem
from captioning.tags import Category, normalize_tag

# Danbooru's categorised tag fields; gallery-dl's `tags_*` lists are read the same way.
DANBOORU_TAG_FIELDS = {
    "general": Category.GENERAL,
    "artist": Category.ARTIST,
    "copyright": Category.COPYRIGHT,
    "character": Category.CHARACTER,
    "meta": Category.META,
}
_TAG_KEYS = tuple(((f"tag_string_{field}", f"tags_{field}"), category)
                  for field, category in DANBOORU_TAG_FIELDS.items())
RATING_ALIASES = {"g": "g", "general": "g", "s": "s", "sensitive": "s", "q": "q",
                  "questionable": "q", "e": "e", "explicit": "e"}
WD_RATING_LABELS = {"general": "g", "sensitive": "s", "questionable": "q", "explicit": "e"}
KEEP_TOKENS_SEPARATOR = "|||"

Item = Post | Problem


def read_danbooru_jsonl(path: str | Path) -> Iterator[Item]:
    """One Post per line of a Danbooru JSON-lines file; duplicate ids are skipped."""
    path = Path(path)
    seen: set[str] = set()
    with path.open("rb") as f:
        for line_number, line in enumerate(f, start=1):
            for item in parse_danbooru_line(line, f"{path}:{line_number}"):
                if isinstance(item, Post):
                    if item.id in seen:
                        yield Problem(item.origin, f"duplicate id {item.id!r} (first record kept)")
                        continue
                    seen.add(item.id)
                yield item


def parse_danbooru_line(line: bytes, origin: str) -> list[Item]:
    """The Post (and warnings) of one JSON line; [] for a blank line."""
    if not line.strip():
        return []
    try:
        record = jsonio.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as bad:
            return [Problem(origin, f"not UTF-8 text (byte {bad.start})")]
        return [Problem(origin, f"malformed JSON: {error.msg} at column {error.colno}")]
    return post_from_danbooru(record, origin, default_id=origin.rsplit("/", 1)[-1])


def _read_sidecar(path: Path, encoding: str) -> str | Problem:
    """A sidecar file's text, or the Problem that loses this record (not the run)."""
    try:
        return path.read_bytes().decode(encoding)
    except UnicodeDecodeError as error:
        return Problem(str(path), f"not UTF-8 text (byte {error.start})")
    except OSError as error:  # EIO, EACCES, a folder
        return Problem(str(path), f"cannot read: {error.strerror or error}")


def read_danbooru_json(path: str | Path, image_id: str | None = None) -> Iterator[Item]:
    """The Post of a Danbooru JSON sidecar (one post object); `image_id` replaces the post id."""
    path = Path(path)
    text = _read_sidecar(path, "utf-8")
    if isinstance(text, Problem):
        yield text
        return
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        yield Problem(f"{path}:{error.lineno}", f"malformed JSON: {error.msg}")
        return
    items = post_from_danbooru(record, str(path), default_id=image_id or path.name)
    for item in items:
        if isinstance(item, Post) and image_id is not None:
            item.id = image_id
        yield item


def post_from_danbooru(record: object, origin: str, default_id: str) -> list[Item]:
    """A Post from one Danbooru post object, with warnings for missing or bad fields."""
    if not isinstance(record, dict):
        return [Problem(origin, f"expected a JSON object, got {type(record).__name__}")]
    warnings: list[Item] = []
    metadata: dict = {}

    post_id = record.get("id")
    if post_id is None or post_id == "":
        post_id = default_id
        warnings.append(Problem(origin, f"missing field 'id': using {default_id!r}", skipped=False))
    else:
        metadata["id"] = post_id

    tags: dict[Category, list[str]] = {}
    for keys, category in _TAG_KEYS:
        for key in keys:
            value = record.get(key)
            if value is None:
                continue
            names = value.split() if type(value) is str else _tag_list(value)
            if names is None:
                warnings.append(Problem(origin, f"field {key!r} is not a tag string", skipped=False))
                continue
            metadata[key] = value
            if names:
                tags[category] = names
            break
    uncategorised: list[str] = []
    if not tags:
        for key in ("tag_string", "tags"):
            names = _tag_list(record.get(key))
            if names:
                uncategorised = names
                metadata[key] = record[key]
                break
    if not tags and not uncategorised:
        return [Problem(origin, "no tags: every tag_string field is missing or empty")]

    rating = None
    raw_rating = record.get("rating")
    if raw_rating is None or raw_rating == "":
        warnings.append(Problem(origin, "missing field 'rating': no rating word", skipped=False))
    else:
        rating = RATING_ALIASES.get(str(raw_rating).strip().lower())
        if rating is None:
            warnings.append(Problem(origin, f"unknown rating {raw_rating!r} (expected g, s, q or e): "
                                    "no rating word", skipped=False))
        else:
            metadata["rating"] = raw_rating

    score = None
    raw_score = record.get("score")
    if raw_score is not None:
        if isinstance(raw_score, int) and not isinstance(raw_score, bool):
            score = raw_score
            metadata["score"] = raw_score
        else:
            warnings.append(Problem(origin, f"score {raw_score!r} is not an integer: no score tag",
                                    skipped=False))

    created_at = None
    asset = record.get("media_asset")
    for key, value in (("media_asset.created_at", asset.get("created_at") if isinstance(asset, dict) else None),
                       ("created_at", record.get("created_at"))):
        if value is None:
            continue
        created_at = parse_date(value)
        if created_at is None:
            warnings.append(Problem(origin, f"unparseable date {key} = {value!r}", skipped=False))
            continue
        metadata[key] = value
        break

    post = Post(id=str(post_id), origin=origin, tags=tags, uncategorised=uncategorised, rating=rating,
                score=score, created_at=created_at, metadata=metadata)
    return warnings + [post]


def _tag_list(value: object) -> list[str] | None:
    """Tags of a space-separated Danbooru tag string or a list; None if neither."""
    if isinstance(value, str):
        # Danbooru tag strings hold canonical names already (lowercase, underscores); the
        # captioner normalizes any name it has not seen, so nothing is lost by not doing it here.
        return value.split()
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return [n for n in (normalize_tag(t) for t in value) if n]
    return None


def parse_date(value: object) -> datetime | None:
    """An ISO 8601 date (Danbooru: `2024-01-02T03:04:05.678-05:00`), or None."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def read_tag_file(path: str | Path, image_id: str) -> Iterator[Item]:
    """The Post of a kohya-style tag file: comma-separated, or space-separated with underscores."""
    path = Path(path)
    text = _read_sidecar(path, "utf-8-sig")
    if isinstance(text, Problem):
        yield text
        return
    tags = split_tag_text(text)
    if not tags:
        yield Problem(str(path), "empty tag file")
        return
    yield Post(id=image_id, origin=str(path), tags={}, uncategorised=tags, rating=None, score=None,
               created_at=None, metadata={"tag_file": path.name})


def split_tag_text(text: str) -> list[str]:
    """Tags of a caption text. Commas (or new lines) separate tags when present; otherwise the
    text is a Danbooru-style space-separated list (`long_hair blue_eyes`)."""
    text = text.replace(KEEP_TOKENS_SEPARATOR, ",")
    if "," in text or "\n" in text.strip():
        pieces = text.replace("\n", ",").split(",")
    else:
        pieces = text.split()
    return [p.strip() for p in pieces if p.strip()]


def read_wd_tags(probabilities: Mapping[str, float], *, image_id: str = "", origin: str = "",
                 threshold: float = 0.35, character_threshold: float = 0.85,
                 categories: Mapping[str, Category] | None = None) -> Iterator[Item]:
    """The Post of one image's WD v3 tagger output.

    The rating is the most probable of the four rating labels (general/sensitive/questionable/
    explicit -> g/s/q/e); tags above `threshold` are kept, character tags (by `categories`, e.g.
    from the tagger's selected_tags.csv) above `character_threshold`. Tags are uncategorised
    when no categories are given.
    """
    origin = origin or image_id
    if not probabilities:
        yield Problem(origin, "no tagger output")
        return
    ratings = {WD_RATING_LABELS[k]: p for k, p in probabilities.items() if k in WD_RATING_LABELS}
    rating = max(ratings, key=ratings.get) if ratings else None
    tags: dict[Category, list[str]] = {}
    uncategorised: list[str] = []
    ranked = sorted(((p, t) for t, p in probabilities.items() if t not in WD_RATING_LABELS), reverse=True)
    for prob, tag in ranked:
        name = normalize_tag(tag)
        category = categories.get(name) if categories is not None else None
        limit = character_threshold if category == Category.CHARACTER else threshold
        if prob < limit:
            continue
        if category is None:
            uncategorised.append(name)
        else:
            tags.setdefault(category, []).append(name)
    if rating is None:
        yield Problem(origin, "no rating labels in the tagger output: no rating word", skipped=False)
    yield Post(id=image_id, origin=origin, tags=tags, uncategorised=uncategorised,
               rating=rating if rating in RATINGS else None, score=None, created_at=None,
               metadata={"tagger_ratings": ratings})
