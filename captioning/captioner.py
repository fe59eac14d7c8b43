"""Build Animagine captions from posts: sort tags into slots, add rating/year/score/quality, fit the budget.

The rules (../shared/docs/animagine_captions.md, "The project's rules") live in the Profile;
this module only applies them. Every input tag is classified once and cached by its raw text,
which is what makes captioning whole booru dumps fast.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime
from typing import NamedTuple

from captioning.caption import Caption, CaptionResult
from captioning.post import RATINGS, Post
from captioning.profile import Band, Profile
from captioning.tag_db import TagDatabase
from captioning.tags import Category, display_tag, normalize_tag
from captioning.tokens import TokenCounter

DEFAULT_MAX_TOKENS = 225  # three 75-token CLIP chunks
MIN_POSTS_FOR_PERCENTILES = 20
_CATEGORY_SLOT = {Category.GENERAL: "general", Category.ARTIST: "artist",
                  Category.COPYRIGHT: "copyright", Category.CHARACTER: "character",
                  Category.META: "meta"}
# WD tagger rating labels (category 9) -> Danbooru rating letters.
WD_RATING_LABELS = {"general": "g", "sensitive": "s", "questionable": "q", "explicit": "e"}
_YEAR_TAG = re.compile(r"^year (\d{4})$")


class TagInfo(NamedTuple):
    """One input tag, classified: where it goes and what it costs."""

    name: str  # canonical
    display: str
    slot: str  # a profile slot, "drop", or a special group: "rating", "year", "quality", "score"
    rank: int  # order inside ordered slots (people, resolution); 0 otherwise
    post_count: int
    unknown: bool  # the tag database does not know it
    value: str  # rating letter for rating words, "" otherwise


class Captioner:
    """Applies a Profile to posts; see `caption` and `caption_tags`."""

    def __init__(self, profile: Profile, tag_db: TagDatabase | None,
                 token_counter: TokenCounter | None, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        self.profile = profile
        self.tag_db = tag_db
        self.token_counter = token_counter
        self.max_tokens = max_tokens
        self.percentiles = {r: dict(cuts) for r, cuts in profile.percentile_table.items()}
        self._cache: dict[tuple[str, int], TagInfo] = {}
        self._people = {t: i for i, t in enumerate(profile.people_tags)}
        self._resolution = {t: i for i, t in enumerate(profile.resolution_tags)}
        self._rating_of_word: dict[str, str] = {}
        for letter in RATINGS:
            for word in profile.rating_words[letter]:
                self._rating_of_word.setdefault(word, letter)
        self._quality_words = {b.tag for b in profile.quality_bands if b.tag} | {profile.quality_missing} - {""}
        self._score_words = {b.tag for b in profile.score_bands if b.tag} | {profile.score_missing} - {""}
        self._bucket_words = {b.name for b in profile.year_buckets}
        self._slots = set(profile.head + profile.body + profile.tail)

    # ---- classification -------------------------------------------------------------------

    def classify(self, raw: str, category: Category | None = None) -> TagInfo:
        """Where one input tag goes (cached per raw text and stated category)."""
        key = (raw, -1 if category is None else int(category))
        info = self._cache.get(key)
        if info is None:
            info = self._classify(raw, category)
            self._cache[key] = info
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
            return TagInfo(name, display, slot, rank, count, unknown, value)

        if not name:
            return info("drop")
        if self.profile.drop_backslash_tags and "\\" in name:
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
        if _YEAR_TAG.match(display) or display in self._bucket_words:
            return info("year")
        if unknown:
            return info("unknown")
        return info("general")

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
        slots: dict[str, list[TagInfo]] = defaultdict(list)
        seen: set[str] = set()
        warnings: list[str] = []
        unknown: list[str] = []
        for category, names in post.tags.items():
            for raw in names:
                self._place(self.classify(raw, category), slots, seen, unknown, warnings)
        for raw in post.uncategorised:
            self._place(self.classify(raw), slots, seen, unknown, warnings)

        rating = self._rating(post.rating, slots.pop("rating", []), warnings)
        year = _year_of(post.created_at)
        specials = {
            "rating": list(self.profile.rating_words[rating]) if rating else [],
            "year": self._year_tags(year, slots.pop("year", []), warnings),
            "quality": self._band_tags("quality", post.score, rating, slots.pop("quality", []),
                                       self.profile.quality_bands, self.profile.quality_missing, warnings),
            "score": self._band_tags("score", post.score, rating, slots.pop("score", []),
                                     self.profile.score_bands, self.profile.score_missing, warnings),
        }
        parts = []
        for order in (self.profile.head, self.profile.body, self.profile.tail):
            tags: list[str] = []
            for slot in order:
                if slot in specials:
                    tags.extend(t for t in specials[slot] if t not in tags)
                    continue
                infos = slots.get(slot, ())
                if slot in ("people", "resolution"):
                    infos = sorted(infos, key=lambda i: i.rank)
                tags.extend(i.display for i in infos)
            parts.append(tags)
        head, body, tail = parts
        tokens, cut, dropped = self._fit_budget(head, body, tail, slots, warnings)
        return CaptionResult(
            caption=Caption(tuple(head), tuple(body), tuple(tail)), tokens=tokens, cut=cut,
            unknown_tags=unknown, warnings=warnings, dropped=dropped, rating=rating,
            year=year if specials["year"] and year is not None else None,
            score_tag=(specials["score"] or [None])[0], quality_tag=(specials["quality"] or [None])[0],
        )

    def _place(self, info: TagInfo, slots, seen: set[str], unknown: list[str], warnings: list[str]) -> None:
        if info.name in seen:
            return
        seen.add(info.name)
        if info.slot == "unknown":
            unknown.append(info.name)
        if info.slot == "drop":
            if info.value == "contains a backslash":
                warnings.append(f"dropped tag {info.name!r}: training captions never contain backslashes")
            return
        slots[info.slot].append(info)

    def _rating(self, rating: str | None, given: list[TagInfo], warnings: list[str]) -> str | None:
        """The post's rating; rating words among the tags fill in for a missing one."""
        letters = [i.value for i in given]
        if rating is None:
            # The most explicit rating word wins (an `nsfw, explicit` pair means e).
            return max(letters, key=RATINGS.index) if letters else None
        conflicting = [i.display for i in given if i.value != rating]
        if conflicting:
            warnings.append(f"rating {rating!r} overrides rating word(s) {', '.join(conflicting)} in the tags")
        return rating

    def _year_tags(self, year: int | None, given: list[TagInfo], warnings: list[str]) -> list[str]:
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

    def _band_tags(self, what: str, score: int | None, rating: str | None, given: list[TagInfo],
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

    def _fit_budget(self, head: list[str], body: list[str], tail: list[str], slots,
                    warnings: list[str]) -> tuple[int, bool, list[str]]:
        """Drop body tags, most common first, until the caption fits; (tokens, cut, dropped)."""
        counter = self.token_counter
        if counter is None:
            return -1, False, []
        tokens = counter.count_tags(head + body + tail)
        if self.max_tokens <= 0 or tokens <= self.max_tokens:
            return tokens, False, []
        counts = {i.display: i.post_count for infos in slots.values() for i in infos}
        costs = dict(zip(body, counter.tag_costs(body)))
        # Most common first; tags the database lacks (count 0) go last. sorted() is stable.
        order = sorted(range(len(body)), key=lambda i: -counts.get(body[i], 0))
        removed: set[int] = set()
        for index in order:
            if tokens <= self.max_tokens:
                break
            removed.add(index)
            tokens -= costs[body[index]]
            if tokens <= self.max_tokens:  # the estimate can be off by one at the end: recount
                tokens = counter.count_tags(head + [t for i, t in enumerate(body) if i not in removed] + tail)
        dropped = [body[i] for i in sorted(removed)]
        body[:] = [t for i, t in enumerate(body) if i not in removed]
        tokens = counter.count_tags(head + body + tail)
        if tokens > self.max_tokens:
            warnings.append(f"head and tail alone are {tokens} tokens, over the budget of {self.max_tokens}")
        return tokens, True, dropped

    # ---- percentiles from the data ---------------------------------------------------------

    def fit_percentiles(self, posts: Iterable[Post], min_posts: int = MIN_POSTS_FOR_PERCENTILES) -> dict:
        """Replace the cut points by the score percentiles of `posts`, per rating.

        Ratings with fewer than `min_posts` scored posts keep the profile's table. Returns the
        cut points now in use: {rating: {percentile: score}}.
        """
        self.percentiles = compute_percentiles(posts, self.profile.percentiles_used, min_posts,
                                               fallback=self.profile.percentile_table)
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


def _year_of(created_at: datetime | None) -> int | None:
    return created_at.year if created_at is not None else None
