"""Caption profiles: every word list, threshold and position, read from TOML and validated once.

The built-in profiles are TOML files in `captioning/profiles/`; a user's file may start with
`extends = "animagine-xl-4.0"` and override only what it changes (tables merge, lists replace).
Unknown keys are errors with a "did you mean" suggestion.
"""

from __future__ import annotations

import difflib
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from captioning.post import RATINGS
from captioning.tags import normalize_tag

PROFILE_DIR = Path(__file__).with_name("profiles")
DEFAULT_PROFILE = "animagine-xl-4.0"

# What the default profile takes from the publisher and what it infers (the closing text of the
# --help of `caption`, `tag` and `prep`).
PROFILE_SOURCES = """\
The default profile (animagine-xl-4.0) and what it rests on:
  published (Animagine XL 4.0 model card): the prompt order - people count, character, series,
    rating, the other tags, quality tags - and the tag vocabularies (quality, score, `year NNNN`,
    rating words);
  published (3.x caption notebooks): tag text, the people-count list, the meta-tag filter and the
    Danbooru score percentiles p5..p95 per rating (p90: g 24, s 41, q 93, e 148);
  our inference (not published for 4.0): the score and quality thresholds on those percentiles,
    the year in the fixed tail, `explicit` without `nsfw`, artists in the shuffled body.
Every rule is a key of captioning/profiles/animagine-xl-4.0.toml (copy it, `extends` it)."""

# Where each kind of tag goes. A slot not listed in [order] is left out of the caption.
SLOTS = ("people", "character", "copyright", "artist", "rating", "general", "unknown", "meta",
         "year", "quality", "score", "aesthetic", "resolution")


class ProfileError(ValueError):
    """A profile file is missing, not TOML, or has a bad key; the message names the key."""


@dataclass(frozen=True)
class Band:
    """A score band: the tag applies when score > the `above` percentile (None: any score)."""

    above: int | None
    tag: str  # display form; "" means no tag in this band


@dataclass(frozen=True)
class AestheticBand:
    """An aesthetic band: the tag applies when the classifier's score > `above` (None: any score)."""

    above: float | None
    tag: str


@dataclass(frozen=True)
class YearBucket:
    name: str
    first: int
    last: int


@dataclass(frozen=True)
class Profile:
    """Everything the captioner decides, as data (see profiles/animagine-xl-4.0.toml)."""

    name: str
    description: str
    head: tuple[str, ...]
    body: tuple[str, ...]
    tail: tuple[str, ...]
    people_tags: tuple[str, ...]  # canonical names, in head order
    rating_words: dict[str, tuple[str, ...]]  # rating letter -> display words
    year_first: int
    year_last: int
    year_format: str  # "year {year}"
    year_buckets: tuple[YearBucket, ...]  # when set, the bucket name replaces year_format
    meta_drop_substrings: tuple[str, ...]  # canonical-form substrings
    resolution_tags: tuple[str, ...]  # canonical names, in tail order
    drop_backslash_tags: bool
    score_bands: tuple[Band, ...]
    score_missing: str
    quality_bands: tuple[Band, ...]
    quality_missing: str
    percentile_source: str  # "table" | "dataset"
    percentile_table: dict[str, dict[int, float]]  # rating -> percentile -> score
    unrated_table: str  # rating whose cut points apply to unrated posts; "" = no score tags
    aesthetic_bands: tuple[AestheticBand, ...] = ()  # empty: the profile has no aesthetic tags
    aesthetic_label: str = "hq"  # the classifier label whose probability is the aesthetic score

    @property
    def percentiles_used(self) -> tuple[int, ...]:
        """Every percentile the bands compare against, ascending."""
        found = {b.above for b in self.score_bands + self.quality_bands if b.above is not None}
        return tuple(sorted(found))


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_profile(name_or_path: str | Path = DEFAULT_PROFILE) -> Profile:
    """A built-in profile by name, or a TOML file (which may `extends` a built-in one).

    Raises ProfileError naming the file and key for anything invalid.
    """
    data, source = _read_profile_data(str(name_or_path), seen=())
    return _build(data, source)


def _read_profile_data(name_or_path: str, seen: tuple[str, ...]) -> tuple[dict, str]:
    path = Path(name_or_path)
    if not (name_or_path.endswith(".toml") or path.exists()):
        names = available_profiles()
        if name_or_path not in names:
            raise ProfileError(f"unknown profile {name_or_path!r}{_suggest(name_or_path, names)}; "
                               f"built-in: {', '.join(names)}, or a path to a .toml file")
        path = PROFILE_DIR / f"{name_or_path}.toml"
    if str(path.resolve()) in seen:
        raise ProfileError(f"{path}: `extends` loops back to itself")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProfileError(f"{path}: profile file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ProfileError(f"{path}: not valid TOML: {error}") from None
    base_name = data.pop("extends", None)
    if base_name is None:
        return data, str(path)
    if not isinstance(base_name, str):
        raise ProfileError(f"{path}: extends: expected a profile name or path")
    if base_name.endswith(".toml") and not Path(base_name).is_absolute():
        base_name = str(path.parent / base_name)  # relative to the file that names it
    base, _ = _read_profile_data(base_name, seen + (str(path.resolve()),))
    return _merge(base, data), str(path)


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Reader:
    """Typed access to one TOML table, naming `file: [table] key` in every error."""

    def __init__(self, table: Any, where: str, source: str) -> None:
        if not isinstance(table, dict):
            raise ProfileError(f"{source}: {where}: expected a table")
        self.table, self.where, self.source = table, where, source
        self.used: set[str] = set()

    def fail(self, key: str, message: str):
        raise ProfileError(f"{self.source}: {(self.where + key).rstrip('.')}: {message}")

    def get(self, key: str, kind: type | tuple, default: Any = ...) -> Any:
        self.used.add(key)
        if key not in self.table:
            if default is ...:
                self.fail(key, "missing")
            return default
        value = self.table[key]
        if isinstance(value, bool) and kind is not bool:
            self.fail(key, f"expected {_kind_name(kind)}, got a boolean")
        if not isinstance(value, kind):
            self.fail(key, f"expected {_kind_name(kind)}, got {type(value).__name__} {value!r}")
        return value

    def strings(self, key: str, default: Any = ...) -> tuple[str, ...]:
        value = self.get(key, list, default)
        if any(not isinstance(v, str) for v in value):
            self.fail(key, "expected a list of strings")
        return tuple(value)

    def sub(self, key: str) -> _Reader:
        self.used.add(key)
        return _Reader(self.table.get(key, {}), f"{self.where}{key}.", self.source)

    def done(self) -> None:
        for key in self.table:
            if key not in self.used:
                self.fail(key, f"unknown key{_suggest(key, self.used)}")


def _kind_name(kind) -> str:
    names = {str: "a string", int: "an integer", list: "a list", dict: "a table", bool: "true/false"}
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)


def _build(data: dict, source: str) -> Profile:
    top = _Reader(data, "", source)
    name = top.get("name", str, Path(source).stem)
    description = top.get("description", str, "")

    order = top.sub("order")
    positions = {part: order.strings(part, ()) for part in ("head", "body", "tail")}
    order.done()
    placed: list[str] = []
    for part, slots in positions.items():
        for slot in slots:
            if slot not in SLOTS:
                order.fail(part, f"unknown slot {slot!r}{_suggest(slot, SLOTS)}; slots: {', '.join(SLOTS)}")
            if slot in placed:
                order.fail(part, f"slot {slot!r} placed twice")
            placed.append(slot)

    people = top.sub("people")
    people_tags = tuple(normalize_tag(t) for t in people.strings("tags"))
    people.done()

    rating = top.sub("rating")
    rating_words = {}
    for letter in RATINGS:
        rating_words[letter] = rating.strings(letter)
    rating.done()

    year = top.sub("year")
    year_first = year.get("first", int, 2005)
    year_last = year.get("last", int, 2025)
    year_format = year.get("format", str, "year {year}")
    if "{year}" not in year_format:
        year.fail("format", "must contain {year}")
    buckets = []
    for i, item in enumerate(year.get("buckets", list, [])):
        bucket = _Reader(item, f"{year.where}buckets[{i}].", source)
        buckets.append(YearBucket(bucket.get("name", str), bucket.get("first", int), bucket.get("last", int)))
        bucket.done()
    if year_first > year_last:
        year.fail("first", f"{year_first} is after last = {year_last}")
    year.done()

    meta = top.sub("meta")
    drop_substrings = tuple(normalize_tag(s) for s in meta.strings("drop_substrings", ()))
    resolution_tags = tuple(normalize_tag(s) for s in meta.strings("resolution_tags", ()))
    meta.done()

    tag_filter = top.sub("filter")
    drop_backslash = tag_filter.get("drop_backslash_tags", bool, True)
    tag_filter.done()

    score_bands, score_missing = _bands(top.sub("score"))
    quality_bands, quality_missing = _bands(top.sub("quality"))
    aesthetic_bands, aesthetic_label = _aesthetic_bands(top.sub("aesthetic"))

    pct = top.sub("percentiles")
    percentile_source = pct.get("source", str, "table")
    if percentile_source not in ("table", "dataset"):
        pct.fail("source", f"expected 'table' or 'dataset', got {percentile_source!r}")
    unrated = pct.get("unrated", str, "")
    if unrated not in ("",) + RATINGS:
        pct.fail("unrated", f"expected one of {', '.join(RATINGS)} or \"\", got {unrated!r}")
    table_reader = pct.sub("table")
    needed = sorted({b.above for b in score_bands + quality_bands if b.above is not None})
    table: dict[str, dict[int, float]] = {}
    for letter in RATINGS:
        row = table_reader.sub(letter)
        cuts: dict[int, float] = {}
        for key in list(row.table):
            if not (key.startswith("p") and key[1:].isdigit() and 0 < int(key[1:]) < 100):
                row.fail(key, "expected a percentile key like p90")
            cuts[int(key[1:])] = row.get(key, (int, float))
        row.done()
        missing = [p for p in needed if p not in cuts]
        if missing and percentile_source == "table":
            row.fail("", f"missing cut point(s) {', '.join(f'p{p}' for p in missing)} used by the bands "
                         f"(the table has {', '.join(f'p{p}' for p in sorted(cuts)) or 'none'}; add them "
                         "to [percentiles.table] or use percentiles.source = \"dataset\")")
        ordered = [cuts[p] for p in sorted(cuts)]
        if ordered != sorted(ordered):
            row.fail("", "cut points must not decrease as the percentile rises")
        table[letter] = cuts
    table_reader.done()
    pct.done()
    top.done()

    return Profile(
        name=name, description=description, head=positions["head"], body=positions["body"],
        tail=positions["tail"], people_tags=people_tags, rating_words=rating_words,
        year_first=year_first, year_last=year_last, year_format=year_format,
        year_buckets=tuple(buckets), meta_drop_substrings=drop_substrings,
        resolution_tags=resolution_tags, drop_backslash_tags=drop_backslash,
        score_bands=score_bands, score_missing=score_missing, quality_bands=quality_bands,
        quality_missing=quality_missing, percentile_source=percentile_source,
        percentile_table=table, unrated_table=unrated, aesthetic_bands=aesthetic_bands,
        aesthetic_label=aesthetic_label,
    )


def _bands(reader: _Reader) -> tuple[tuple[Band, ...], str]:
    bands = []
    for i, item in enumerate(reader.get("bands", list, [])):
        band = _Reader(item, f"{reader.where}bands[{i}].", reader.source)
        above = band.get("above", int, None)
        if above is not None and not 0 < above < 100:
            band.fail("above", f"expected a percentile between 1 and 99, got {above}")
        bands.append(Band(above, band.get("tag", str)))
        band.done()
    for previous, band in itertools.pairwise(bands):
        if previous.above is None or (band.above is not None and band.above >= previous.above):
            reader.fail("bands", "list bands from the highest percentile down; only the last may omit `above`")
    missing = reader.get("missing", str, "")
    reader.done()
    return tuple(bands), missing


def _aesthetic_bands(reader: _Reader) -> tuple[tuple[AestheticBand, ...], str]:
    """[aesthetic] bands (score thresholds in 0..1, from the highest down) and the scored label."""
    bands = []
    for i, item in enumerate(reader.get("bands", list, [])):
        band = _Reader(item, f"{reader.where}bands[{i}].", reader.source)
        above = band.get("above", (int, float), None)
        if above is not None and not 0 <= above < 1:
            band.fail("above", f"expected a classifier score in [0, 1), got {above}")
        bands.append(AestheticBand(None if above is None else float(above), band.get("tag", str)))
        band.done()
    for previous, band in itertools.pairwise(bands):
        if previous.above is None or (band.above is not None and band.above >= previous.above):
            reader.fail("bands", "list bands from the highest score down; only the last may omit `above`")
    label = reader.get("label", str, "hq")
    reader.done()
    return tuple(bands), label
