"""Build Animagine captions from posts: sort tags into slots, add rating/year/score/quality, fit the budget.

The rules (the `animagine-xl-4.0` profile in captioning/profiles/, after the model card's prompt
structure and the publisher's 3.x caption notebooks) live in the Profile;
this module only applies them.

Speed (whole booru dumps): every distinct input tag is classified once and cached by
its raw text as a `TagInfo` that carries its canonical name, display form, a sort key (slot
position in the caption, then rank inside ordered slots) and its CLIP token costs. Captioning a
post is then one dict lookup per tag, a stable sort by key (input order is kept inside a slot),
and a sum of cached costs.
"""

from __future__ import annotations

import logging
import re
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime
from operator import attrgetter
from typing import NamedTuple

from captioning.caption import KEEP_TOKENS_SEPARATOR, Caption, CaptionResult
from captioning.post import RATINGS, Post
from captioning.profile import Band, Profile
from captioning.tag_db import TagDatabase
from captioning.tags import Category, display_tag, normalize_tag
from captioning.terminal import terminal_safe
from captioning.tokens import TokenCounter

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 225  # three 75-token CLIP chunks
MIN_POSTS_FOR_PERCENTILES = 20
_CATEGORY_SLOT = {Category.GENERAL: "general", Category.ARTIST: "artist",
                  Category.COPYRIGHT: "copyright", Category.CHARACTER: "character",
                  Category.META: "meta"}
# WD tagger rating labels (category 9) -> Danbooru rating letters.
WD_RATING_LABELS = {"general": "g", "sensitive": "s", "questionable": "q", "explicit": "e"}
SPECIAL_SLOTS = ("rating", "year", "quality", "score", "aesthetic")
SEPARATOR_DROP = "a comma or the keep-tokens separator |||"
CONTROL_DROP = "control characters"
_COUNTED_DROPS = (SEPARATOR_DROP, CONTROL_DROP)  # reported per post, so the summary counts them
_YEAR_TAG = re.compile(r"^year (\d{4})$")
_SLOT_STRIDE = 100_000  # sort key = slot position * stride + rank inside the slot
DROPPED, SPECIAL = -1, -2  # sort keys of tags that are not placed directly
_by_key = attrgetter("key")
_name = attrgetter("name")
_display = attrgetter("display")
_comma_cost = attrgetter("comma_cost")
_ADDED_CACHE_SIZE = 100_000


class TagInfo:
    """One classified tag: where it goes and what it costs (shared by every post using it)."""

    __slots__ = ("alone_cost", "comma_cost", "display", "key", "name", "post_count", "slot", "unknown", "value")

    def __init__(self, name: str, display: str, slot: str, key: int, post_count: int, unknown: bool,
                 value: str = "") -> None:
        self.name = name  # canonical
        self.display = display
        self.slot = slot  # a profile slot, "drop", or a special group: rating, year, quality, score
        self.key = key  # sort key; DROPPED or SPECIAL for tags not placed directly
        self.post_count = post_count
        self.unknown = unknown  # categorised by nothing: the database does not know it
        self.value = value  # rating letter of rating words; the reason for dropped tags
        self.comma_cost = 0  # CLIP tokens of "display," (filled when a counter is present)
        self.alone_cost = 0  # CLIP tokens of "display"

    def __repr__(self) -> str:
        return f"TagInfo({self.name!r}, slot={self.slot!r}, key={self.key})"


class _Added(NamedTuple):
    """What the captioner adds to a post from its metadata, and what it has to say about it."""

    infos: tuple[TagInfo, ...]  # rating, year, quality, score and aesthetic tags, in their profile slots
    warnings: tuple[str, ...]
    rating: str | None
    year: int | None  # the year a year tag was made from
    score_tag: str | None
    quality_tag: str | None
    aesthetic_tag: str | None


class Captioner:
    """Applies a Profile to posts; see `caption` and `caption_tags`."""

    def __init__(self, profile: Profile, tag_db: TagDatabase | None,
                 token_counter: TokenCounter | None, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        self.profile = profile
        self.tag_db = tag_db
        self.token_counter = token_counter
        self.max_tokens = max_tokens
        self.percentiles = {r: dict(cuts) for r, cuts in profile.percentile_table.items()}
        order = profile.head + profile.body + profile.tail
        self._position = {slot: i for i, slot in enumerate(order)}
        self._body_start = len(profile.head) * _SLOT_STRIDE
        self._tail_start = (len(profile.head) + len(profile.body)) * _SLOT_STRIDE
        self._caches: dict[Category | None, dict[str, TagInfo]] = defaultdict(dict)
        self._specials: dict[tuple[str, str], TagInfo] = {}
        self._added_cache: dict[tuple, _Added] = {}  # (rating, year, score, aesthetic) -> what caption() adds
        self._uncosted: list[TagInfo] = []
        self._people = {t: i for i, t in enumerate(profile.people_tags)}
        self._resolution = {t: i for i, t in enumerate(profile.resolution_tags)}
        self._rating_of_word: dict[str, str] = {}
        for letter in RATINGS:
            for word in profile.rating_words[letter]:
                self._rating_of_word.setdefault(word, letter)
        self._quality_words = {b.tag for b in profile.quality_bands if b.tag} | {profile.quality_missing} - {""}
        self._score_words = {b.tag for b in profile.score_bands if b.tag} | {profile.score_missing} - {""}
        self._bucket_words = {b.name for b in profile.year_buckets}
        self._aesthetic_words = {b.tag for b in profile.aesthetic_bands if b.tag}

    # ---- classification -------------------------------------------------------------------

    def classify(self, raw: str, category: Category | None = None) -> TagInfo:
        """Where one input tag goes (cached per raw text and stated category)."""
        cache = self._caches[category]
        info = cache.get(raw)
        if info is None:
            info = cache[raw] = self._classify(raw, category)
            if self.token_counter is not None and info.key >= 0:
                self._uncosted.append(info)
        return info

    def _classify(self, raw: str, category: Category | None) -> TagInfo:
        name = normalize_tag(raw)
        count, unknown = 0, False
        if self.tag_db is not None:
            name, db_category, count = self.tag_db.lookup(name)
            if category is None:
                category, unknown = db_category, db_category is None
        display = display_tag(name)

        def info(slot: str, rank: int = 0, value: str = "") -> TagInfo:
            if slot in SPECIAL_SLOTS:
                key = SPECIAL
            elif slot in self._position:
                key = self._position[slot] * _SLOT_STRIDE + rank
            else:  # "drop", or a slot the profile leaves out
                key = DROPPED
            return TagInfo(name, display, slot, key, count, unknown, value)

        if not name:
            return info("drop", value="empty tag")
        if "," in name or KEEP_TOKENS_SEPARATOR in name:
            # Captions are comma-separated and sd-scripts splits at `|||`: such a tag would
            # become several tags, or move the fixed head/tail. Counted per post in `caption`.
            return info("drop", value=SEPARATOR_DROP)
        if terminal_safe(name) != name:  # ANSI escapes, carriage returns: never caption text
            return info("drop", value=CONTROL_DROP)
        if self.profile.drop_backslash_tags and "\\" in name:
            # Logged once per tag, not per post: `\m/` alone is on thousands of Danbooru posts.
            logger.info("dropping tag %r wherever it appears: training captions never contain backslashes", name)
            return info("drop", value="contains a backslash")
        if category == Category.RATING:
            letter = WD_RATING_LABELS.get(name) or self._rating_of_word.get(display)
            return info("rating", value=letter) if letter else info("drop", value="unknown rating label")
        if category in (Category.CHARACTER, Category.COPYRIGHT, Category.ARTIST):
            return info(_CATEGORY_SLOT[category])
        if name in self._people:
            return info("people", self._people[name])
        if category == Category.META:
            if any(s in name for s in self.profile.meta_drop_substrings):
                return info("drop", value="filtered meta tag")
            if name in self._resolution:
                return info("resolution", self._resolution[name])
            return info("meta")
        if name in self._resolution:
            return info("resolution", self._resolution[name])
        if display in self._rating_of_word:
            return info("rating", value=self._rating_of_word[display])
        if display in self._quality_words:
            return info("quality")
        if display in self._score_words:
            return info("score")
        if display in self._aesthetic_words:
            return info("aesthetic")
        if _YEAR_TAG.match(display) or display in self._bucket_words:
            return info("year")
        if unknown:
            return info("unknown")
        return info("general")

    def prepare(self, posts: Iterable[Post]) -> int:
        """Classify the tags of many posts and learn their token costs in one tokenizer batch.

        Optional: `caption` does the same per post, but one batch per chunk of posts saves the
        tokenizer's per-call overhead while the caches are still cold. Returns how many tags
        were new.
        """
        caches = self._caches
        known = sum(map(len, caches.values()))
        for post in posts:
            for category, names in post.tags.items():
                for raw in set(names).difference(caches[category]):
                    self.classify(raw, category)
            if post.uncategorised:
                for raw in set(post.uncategorised).difference(caches[None]):
                    self.classify(raw)
        if self._uncosted:
            self._learn_costs()
        return sum(map(len, caches.values())) - known

    def warm_up(self, flat: bool = False) -> int:
        """Classify every tag of the database under its own category (and, with `flat`, as an
        uncategorised tag) and learn all token costs in one batch. Worth it before forking
        workers over a large input: they inherit the warm caches instead of each building them.
        Returns the number of tags classified."""
        if self.tag_db is None:
            return 0
        before = sum(map(len, self._caches.values()))
        for name, (category, _count) in self.tag_db.entries():
            if name not in self._caches[category]:
                self.classify(name, category)
            if flat and name not in self._caches[None]:
                self.classify(name)
        if self._uncosted:
            self._learn_costs()
        return sum(map(len, self._caches.values())) - before

    def _special(self, slot: str, word: str, rank: int) -> TagInfo:
        """The TagInfo of a rating/year/quality/score word the captioner adds."""
        info = self._specials.get((slot, word))
        if info is None:
            key = self._position[slot] * _SLOT_STRIDE + rank
            info = self._specials[(slot, word)] = TagInfo(normalize_tag(word), word, slot, key, 0, False)
            if self.token_counter is not None:
                self._uncosted.append(info)
        return info

    def _learn_costs(self) -> None:
        """Token costs of newly classified tags, in one tokenizer batch."""
        infos, self._uncosted = self._uncosted, []
        costs = self.token_counter.costs([i.display for i in infos])
        for info, (comma_cost, alone_cost) in zip(infos, costs, strict=True):
            info.comma_cost, info.alone_cost = comma_cost, alone_cost

    # ---- captions -------------------------------------------------------------------------

    def caption_tags(self, tags: list[str] | str, rating: str | None = None, score: int | None = None,
                     created_at: datetime | None = None, id: str = "") -> CaptionResult:
        """Caption a flat tag list (or a comma-separated prompt) such as
        `"1girl, safe, herta (honkai: star rail), smile"`."""
        if isinstance(tags, str):
            tags = [t for t in tags.split(",") if t.strip()]
        post = Post(id=id, origin=id, tags={}, uncategorised=list(tags), rating=rating, score=score,
                    created_at=created_at, metadata={})
        return self.caption(post)

    def caption(self, post: Post) -> CaptionResult:
        """The caption of one post, its token count and what was dropped or unknown."""
        infos: list[TagInfo] = []
        for category, names in post.tags.items():
            infos.extend(map(self._caches[category].get, names))  # None where not cached yet
        if post.uncategorised:
            infos.extend(map(self._caches[None].get, post.uncategorised))
        if None in infos:
            raws = [(raw, c) for c, names in post.tags.items() for raw in names]
            raws += [(raw, None) for raw in post.uncategorised]
            infos = [info or self.classify(*raw) for info, raw in zip(infos, raws, strict=True)]
        placed = [i for i in infos if i.key >= 0]
        year = post.created_at.year if post.created_at is not None else None
        unsafe: list[TagInfo] = []
        if len(placed) == len(infos):
            # The usual post: nothing given among its tags, so what the captioner adds depends on
            # (rating, year, score, aesthetic) only, a few thousand combinations in a whole dump.
            key = (post.rating, year, post.score, post.aesthetic)
            added = self._added_cache.get(key)
            if added is None:
                if len(self._added_cache) >= _ADDED_CACHE_SIZE:
                    self._added_cache.clear()
                added = self._added_cache[key] = self._added(post.rating, year, post.score, post.aesthetic, {})
        else:
            added = self._added(post.rating, year, post.score, post.aesthetic, self._set_aside(infos))
            unsafe = [i for i in infos if i.key == DROPPED and i.value in _COUNTED_DROPS]
        names = set(map(_name, placed))
        if len(names) != len(placed):
            placed = list({i.name: i for i in reversed(placed)}.values())[::-1]  # first of each name
        for special in added.infos:
            if special.name not in names:  # a special word that is also a real input tag
                placed.append(special)
                names.add(special.name)
        placed.sort(key=_by_key)
        if self._uncosted:
            self._learn_costs()

        keys = list(map(_by_key, placed))
        body_start = bisect_left(keys, self._body_start)
        tail_start = bisect_left(keys, self._tail_start)
        tokens, cut, dropped, warnings = -1, False, [], list(added.warnings)
        warnings += [f"tag {info.name!r} dropped: it contains {info.value}" for info in unsafe]
        if self.token_counter is not None and placed:
            tokens = sum(map(_comma_cost, placed)) - placed[-1].comma_cost + placed[-1].alone_cost
            if 0 < self.max_tokens < tokens:
                placed, tokens, dropped = self._fit_budget(placed, body_start, tail_start)
                cut = True
                tail_start -= len(dropped)
                if tokens > self.max_tokens:
                    warnings.append(f"head and tail alone are {tokens} tokens, over the budget of {self.max_tokens}")
        elif self.token_counter is not None:
            tokens = 0
        shown = list(map(_display, placed))
        return CaptionResult(
            caption=Caption(tuple(shown[:body_start]), tuple(shown[body_start:tail_start]), tuple(shown[tail_start:])),
            tokens=tokens, cut=cut, unknown_tags=[i.name for i in placed if i.unknown],
            warnings=warnings, dropped=dropped, rating=added.rating, year=added.year,
            score_tag=added.score_tag, quality_tag=added.quality_tag, aesthetic_tag=added.aesthetic_tag,
        )

    def _added(self, rating: str | None, year: int | None, score: int | None, aesthetic: float | None,
               given: dict[str, list[TagInfo]]) -> _Added:
        """The rating, year, quality, score and aesthetic tags for a post's metadata and the
        special words among its tags (`given`, by slot)."""
        warnings: list[str] = []
        rating = self._rating(rating, given.get("rating", ()), warnings)
        profile = self.profile
        words = {
            "rating": profile.rating_words[rating] if rating else (),
            "year": self._year_tags(year, given.get("year", ()), warnings),
            "quality": self._band_tags("quality", score, rating, given.get("quality", ()),
                                       profile.quality_bands, profile.quality_missing, warnings),
            "score": self._band_tags("score", score, rating, given.get("score", ()),
                                     profile.score_bands, profile.score_missing, warnings),
            "aesthetic": self._aesthetic_tags(aesthetic, given.get("aesthetic", ()), warnings),
        }
        words = {slot: ws for slot, ws in words.items() if slot in self._position and ws}
        infos = tuple(self._special(slot, word, rank) for slot, ws in words.items() for rank, word in enumerate(ws))
        return _Added(infos, tuple(warnings), rating, year if "year" in words else None,
                      words["score"][0] if "score" in words else None,
                      words["quality"][0] if "quality" in words else None,
                      words["aesthetic"][0] if "aesthetic" in words else None)

    def _set_aside(self, infos: list[TagInfo]) -> dict[str, list[TagInfo]]:
        """Special words (rating, year, quality, score) among the input tags, by slot."""
        given: dict[str, list[TagInfo]] = defaultdict(list)
        for info in infos:
            if info.key == SPECIAL and info not in given[info.slot]:
                given[info.slot].append(info)
        return given

    def _rating(self, rating: str | None, given, warnings: list[str]) -> str | None:
        """The post's rating; rating words among the tags fill in for a missing one."""
        letters = [i.value for i in given]
        if rating is None:
            # The most explicit rating word wins (an `nsfw, explicit` pair means e).
            return max(letters, key=RATINGS.index) if letters else None
        conflicting = [i.display for i in given if i.value != rating]
        if conflicting:
            warnings.append(f"rating {rating!r} overrides rating word(s) {', '.join(conflicting)} in the tags")
        return rating

    def _year_tags(self, year: int | None, given, warnings: list[str]) -> list[str]:
        profile = self.profile
        if year is None:
            return [given[0].display] if given else []
        if not profile.year_first <= year <= profile.year_last:
            warnings.append(f"year {year} outside {profile.year_first}-{profile.year_last}: no year tag")
            return []
        if profile.year_buckets:
            tags = [b.name for b in profile.year_buckets if b.first <= year <= b.last][:1]
        else:
            tags = [profile.year_format.format(year=year)]
        dropped = [i.display for i in given if i.display not in tags]
        if dropped:
            warnings.append(f"the post's date overrides year tag(s) {', '.join(dropped)}")
        return tags

    def _band_tags(self, what: str, score: int | None, rating: str | None, given,
                   bands: tuple[Band, ...], missing: str, warnings: list[str]) -> list[str]:
        """The score or quality tag from the score's percentile band within its rating."""
        table_rating = rating or self.profile.unrated_table
        if score is None or not bands or not table_rating:
            if given:
                return list(dict.fromkeys(i.display for i in given))
            return [missing] if missing and score is None else []
        cuts = self.percentiles[table_rating]
        tag = ""
        for band in bands:
            if band.above is None or score > cuts[band.above]:
                tag = band.tag
                break
        dropped = [i.display for i in given if i.display != tag]
        if dropped:
            warnings.append(f"score {score} overrides {what} tag(s) {', '.join(dropped)}")
        return [tag] if tag else []

    def _aesthetic_tags(self, aesthetic: float | None, given, warnings: list[str]) -> list[str]:
        """The aesthetic tag of the classifier's score (the first band it exceeds, strictly).

        Without a score, only aesthetic words already among the tags are kept: none is guessed.
        """
        if aesthetic is None or not self.profile.aesthetic_bands:
            return list(dict.fromkeys(i.display for i in given))
        tag = next((b.tag for b in self.profile.aesthetic_bands if b.above is None or aesthetic > b.above), "")
        dropped = [i.display for i in given if i.display != tag]
        if dropped:
            warnings.append(f"aesthetic score {aesthetic:.3f} overrides aesthetic tag(s) {', '.join(dropped)}")
        return [tag] if tag else []

    def _fit_budget(self, placed: list[TagInfo], body_start: int,
                    tail_start: int) -> tuple[list[TagInfo], int, list[str]]:
        """Drop body tags, most common first, until the caption fits: (tags, tokens, dropped)."""
        body = placed[body_start:tail_start]
        counter = self.token_counter
        # Most common first; tags the database lacks (count 0) go last. sorted() is stable.
        order = sorted(range(len(body)), key=lambda i: -body[i].post_count)
        removed: set[int] = set()
        tokens = counter.count_tags([i.display for i in placed])
        for index in order:
            if tokens <= self.max_tokens:
                break
            removed.add(index)
            tokens -= body[index].comma_cost
            if tokens <= self.max_tokens:  # the estimate can be off by one at the very end: recount
                kept = [t for i, t in enumerate(body) if i not in removed]
                tokens = counter.count_tags([i.display for i in placed[:body_start] + kept + placed[tail_start:]])
        kept = [t for i, t in enumerate(body) if i not in removed]
        placed = placed[:body_start] + kept + placed[tail_start:]
        tokens = counter.count_tags([i.display for i in placed])
        return placed, tokens, [body[i].display for i in sorted(removed)]

    # ---- percentiles from the data ---------------------------------------------------------

    def fit_percentiles(self, posts: Iterable[Post], min_posts: int = MIN_POSTS_FOR_PERCENTILES) -> dict:
        """Replace the cut points by the score percentiles of `posts`, per rating.

        Ratings with fewer than `min_posts` scored posts keep the profile's table. Returns the
        cut points now in use: {rating: {percentile: score}}.
        """
        self.percentiles = compute_percentiles(posts, self.profile.percentiles_used, min_posts,
                                               fallback=self.profile.percentile_table)
        self._added_cache.clear()
        return self.percentiles


def compute_percentiles(posts: Iterable[Post], levels: Iterable[int], min_posts: int = MIN_POSTS_FOR_PERCENTILES,
                        fallback: dict | None = None) -> dict[str, dict[int, float]]:
    """Score percentiles per rating, linear interpolation between ranks (numpy's default method)."""
    scores: dict[str, list[int]] = defaultdict(list)
    for post in posts:
        if post.score is not None and post.rating in RATINGS:
            scores[post.rating].append(post.score)
    result: dict[str, dict[int, float]] = {}
    for rating in RATINGS:
        values = sorted(scores.get(rating, ()))
        if len(values) < min_posts:
            result[rating] = dict((fallback or {}).get(rating, {}))
            continue
        cuts = {}
        for level in levels:
            position = (len(values) - 1) * level / 100
            low = int(position)
            high = min(low + 1, len(values) - 1)
            cuts[level] = values[low] + (values[high] - values[low]) * (position - low)
        result[rating] = cuts
    return result
