"""Tag curation before captioning: edit rules, and folding a character's constant features into it.

What users of character LoRAs do by hand in tag editors, image by image, as data:

- **Edit rules** (`EditRules`): remove tags, replace tags, remove whole categories (artists, for a
  character LoRA that should not learn a style), add tags. Every tag a rule names is resolved
  through the tag database first, so a rule on an alias (`blonde`) acts on the tag it stands for
  (`blonde_hair`) however a post spells it. Rules act on a post's input tags, before the
  captioner orders them and fits the token budget.
- **Fold into the trigger** (`FeatureCounter`, `FoldDecisions`): a general tag present in at least
  `threshold` of one character's images is always true of that character (hair and eye colour,
  a signature outfit); left out of those captions, it is learnt as part of the character's tag,
  the "trigger", and the trigger alone brings it back. Tags below the threshold stay in the
  captions so they can still be prompted. Shares are counted per character, so a tag shared by
  two characters is folded only for the one whose images carry it often enough.

Every change is returned as a `Change`, so the prep report can strike the tags through and count
them. No torch here (captioning's rule).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from captioning.post import Post
from captioning.tag_db import TagDatabase
from captioning.tags import Category, display_tag, normalize_tag

# Category names that rules may use (`remove_categories = ["artist"]`).
CATEGORY_NAMES = {"general": Category.GENERAL, "artist": Category.ARTIST, "copyright": Category.COPYRIGHT,
                  "character": Category.CHARACTER, "meta": Category.META}
DEFAULT_FOLD_THRESHOLD = 0.8
# Below this many images a share says little (one image: every tag is 100 %), so nothing is folded.
DEFAULT_FOLD_MIN_IMAGES = 10


class Change(NamedTuple):
    """One tag a rule changed in one post: `kind` is removed, replaced, added or folded."""

    kind: str
    tag: str  # canonical name of the tag as it was (for added: the tag added)
    detail: str = ""  # removed: the rule (tag or category); replaced: the new name; folded: the character


class TagResolver:
    """Canonical names and categories of tags, through the tag database (aliases followed)."""

    def __init__(self, tag_db: TagDatabase | None) -> None:
        self.tag_db = tag_db
        self._cache: dict[str, tuple[str, Category | None]] = {}

    def lookup(self, raw: str) -> tuple[str, Category | None]:
        """(canonical name, category or None) of a tag as written anywhere."""
        found = self._cache.get(raw)
        if found is None:
            name = normalize_tag(raw)
            category = None
            if self.tag_db is not None:
                name, category, _ = self.tag_db.lookup(name)
            found = self._cache[raw] = (name, category)
        return found

    def canonical(self, raw: str) -> str:
        return self.lookup(raw)[0]


@dataclass(frozen=True)
class EditRules:
    """Tag edits as written in a recipe or on the command line (tags in any spelling)."""

    remove_tags: tuple[str, ...] = ()
    replace_tags: tuple[tuple[str, str], ...] = ()  # (old, new) pairs
    remove_categories: tuple[str, ...] = ()  # names in CATEGORY_NAMES
    add_tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [c for c in self.remove_categories if c not in CATEGORY_NAMES]
        if unknown:
            raise ValueError(f"remove_categories: unknown categor{'y' if len(unknown) == 1 else 'ies'} "
                             f"{', '.join(map(repr, unknown))}; choose from {', '.join(CATEGORY_NAMES)}")

    @classmethod
    def of(cls, remove_tags: Iterable[str] = (), replace_tags: Mapping[str, str] | None = None,
           remove_categories: Iterable[str] = (), add_tags: Iterable[str] = ()) -> EditRules:
        return cls(tuple(remove_tags), tuple((replace_tags or {}).items()), tuple(remove_categories),
                   tuple(add_tags))

    def __bool__(self) -> bool:
        return bool(self.remove_tags or self.replace_tags or self.remove_categories or self.add_tags)

    def merged(self, other: EditRules) -> EditRules:
        """These rules plus `other`'s (lists joined; `other` wins where both replace a tag)."""
        return EditRules(self.remove_tags + other.remove_tags,
                         tuple({**dict(self.replace_tags), **dict(other.replace_tags)}.items()),
                         tuple(dict.fromkeys(self.remove_categories + other.remove_categories)),
                         self.add_tags + other.add_tags)


class TagEditor:
    """`EditRules` resolved through the tag database, applied post by post."""

    def __init__(self, rules: EditRules, resolver: TagResolver) -> None:
        self.resolver = resolver
        self.remove = {resolver.canonical(t) for t in rules.remove_tags}
        self.replace = {resolver.canonical(old): new for old, new in rules.replace_tags}
        self.categories = {CATEGORY_NAMES[c]: c for c in rules.remove_categories}
        self.add = list(dict.fromkeys(rules.add_tags))

    def apply(self, post: Post) -> tuple[Post, list[Change]]:
        """The post with the rules applied, and what changed: replaced first, then removed (by
        tag or category, so a replacement can be removed too), then added (unless present)."""
        changes: list[Change] = []
        tags: dict[Category, list[str]] = {}
        uncategorised: list[str] = []
        present: set[str] = set()
        given = [(raw, stated) for stated, names in post.tags.items() for raw in names]
        for raw, stated in given + [(raw, None) for raw in post.uncategorised]:
            kept = self._edit(raw, stated, changes)
            if kept is None:
                continue
            text, category = kept
            if category is None:
                uncategorised.append(text)
            else:
                tags.setdefault(category, []).append(text)
            present.add(self.resolver.canonical(text))
        for raw in self.add:
            name = self.resolver.canonical(raw)
            if name not in present:
                uncategorised.append(raw)
                present.add(name)
                changes.append(Change("added", name))
        if not changes:
            return post, changes
        return replace(post, tags=tags, uncategorised=uncategorised), changes

    def _edit(self, raw: str, stated: Category | None, changes: list[Change]) -> tuple[str, Category | None] | None:
        """(tag text, its stated category or None for the database to decide) after the rules,
        or None if a rule removed it."""
        name, category = self.resolver.lookup(raw)
        category = stated if stated is not None else category
        if name in self.replace:
            new_raw = self.replace[name]
            new_name, new_category = self.resolver.lookup(new_raw)
            changes.append(Change("replaced", name, new_name))
            # A replacement the database knows goes to its own category (in the place of the tag it
            # replaces when that is the same); an unknown one keeps the category of the tag it replaces.
            raw, name = new_raw, new_name
            if new_category is not None:
                raw, category, stated = new_name, new_category, new_category
        if name in self.remove:
            changes.append(Change("removed", name, name))
            return None
        if category in self.categories:
            changes.append(Change("removed", name, self.categories[category]))
            return None
        return raw, stated


@dataclass
class EditCounts:
    """How many tags each kind of rule changed, over a whole dataset (for the report)."""

    removed: Counter = field(default_factory=Counter)  # removed tag -> times
    removed_by_category: Counter = field(default_factory=Counter)  # category name -> tags removed
    replaced: Counter = field(default_factory=Counter)  # "old -> new" -> times
    added: Counter = field(default_factory=Counter)  # added tag -> times
    folded: Counter = field(default_factory=Counter)  # folded tag -> captions it was taken from

    def count(self, changes: Iterable[Change]) -> None:
        for change in changes:
            if change.kind == "removed" and change.detail in CATEGORY_NAMES:
                self.removed_by_category[change.detail] += 1
            elif change.kind == "removed":
                self.removed[change.tag] += 1
            elif change.kind == "replaced":
                self.replaced[f"{change.tag} -> {change.detail}"] += 1
            elif change.kind == "added":
                self.added[change.tag] += 1
            elif change.kind == "folded":
                self.folded[change.tag] += 1

    def to_json(self) -> dict[str, dict[str, int]]:
        return {name: dict(getattr(self, name).most_common())
                for name in ("removed", "removed_by_category", "replaced", "added", "folded")}


@dataclass(frozen=True)
class FoldSettings:
    threshold: float = DEFAULT_FOLD_THRESHOLD  # fold a tag in at least this share of a character's images
    keep_features: bool = False  # decide and report, but fold nothing
    exempt: tuple[str, ...] = ()  # tags never folded (any spelling)
    min_images: int = DEFAULT_FOLD_MIN_IMAGES  # characters with fewer images fold nothing


@dataclass
class CharacterFold:
    """The decision for one character: its images and each frequent tag's share of them."""

    images: int
    folded: dict[str, float]  # canonical tag -> share, folded into the character
    kept: dict[str, float]  # at or above the threshold but kept (exempt, or --keep-features)
    below: dict[str, float]  # the most frequent tags under the threshold (for tuning it)
    note: str = ""  # why nothing was folded, when so


@dataclass
class FoldDecisions:
    """Per character (canonical name), what is folded; `fold(post)` applies it."""

    settings: FoldSettings
    characters: dict[str, CharacterFold]

    def folded_of(self, character: str) -> dict[str, float]:
        found = self.characters.get(character)
        return found.folded if found else {}

    def to_json(self) -> dict:
        """The record written into the report and the prep manifest (display forms)."""
        return {
            "threshold": self.settings.threshold,
            "keep_features": self.settings.keep_features,
            "min_images": self.settings.min_images,
            "exempt": list(self.settings.exempt),
            "characters": {
                display_tag(name): {
                    "images": fold.images,
                    "folded": {display_tag(t): round(s, 4) for t, s in fold.folded.items()},
                    "kept": {display_tag(t): round(s, 4) for t, s in fold.kept.items()},
                    "below": {display_tag(t): round(s, 4) for t, s in fold.below.items()},
                    **({"note": fold.note} if fold.note else {}),
                }
                for name, fold in self.characters.items()
            },
        }

    def trigger_features(self) -> dict[str, list[str]]:
        """{character: [folded tags]} in display form, for characters with folded tags."""
        return {display_tag(name): [display_tag(t) for t in fold.folded]
                for name, fold in self.characters.items() if fold.folded}


class FeatureCounter:
    """Counts, per character, its images and how many of them carry each general tag.

    A post's characters are its character-category tags (stated by the source or found in the
    tag database; a recipe's `trigger` is one). Its features are its general tags other than the
    people-count tags (`1girl` is the head's first tag, never a feature).
    """

    def __init__(self, resolver: TagResolver, people_tags: Iterable[str] = ()) -> None:
        self.resolver = resolver
        self.people = {normalize_tag(t) for t in people_tags}
        self.images: Counter = Counter()
        self.tags: dict[str, Counter] = {}

    def characters_and_features(self, post: Post) -> tuple[list[str], list[tuple[str, str | None]]]:
        """(characters, [(canonical feature, raw text or None when categorised)]) of a post."""
        characters: list[str] = []
        features: list[tuple[str, str | None]] = []
        for stated, names in post.tags.items():
            for raw in names:
                self._sort(raw, stated, characters, features, categorised=True)
        for raw in post.uncategorised:
            self._sort(raw, None, characters, features, categorised=False)
        return list(dict.fromkeys(characters)), features

    def _sort(self, raw: str, stated: Category | None, characters: list, features: list, *, categorised: bool) -> None:
        name, category = self.resolver.lookup(raw)
        category = stated if stated is not None else category
        if category == Category.CHARACTER:
            characters.append(name)
        elif category == Category.GENERAL and name not in self.people:
            features.append((name, None if categorised else raw))

    def observe(self, post: Post) -> None:
        characters, features = self.characters_and_features(post)
        names = {name for name, _ in features}
        for character in characters:
            self.images[character] += 1
            self.tags.setdefault(character, Counter()).update(names)

    def decide(self, settings: FoldSettings, shown_below: int = 8) -> FoldDecisions:
        """The fold decision of every character seen (most images first)."""
        exempt = {self.resolver.canonical(t) for t in settings.exempt}
        characters = {}
        for character, images in self.images.most_common():
            ranked = sorted(self.tags[character].items(), key=lambda item: (-item[1], item[0]))
            shares = {tag: count / images for tag, count in ranked}
            frequent = {t: s for t, s in shares.items() if s >= settings.threshold}
            note = ""
            if images < settings.min_images:
                note = f"{images} image(s), fewer than {settings.min_images}: nothing folded"
            elif settings.keep_features and frequent:
                note = "--keep-features: nothing folded"
            fold = {} if note else {t: s for t, s in frequent.items() if t not in exempt}
            kept = {t: s for t, s in frequent.items() if t not in fold}
            below = dict([(t, s) for t, s in shares.items() if s < settings.threshold][:shown_below])
            characters[character] = CharacterFold(images, fold, kept, below, note)
        return FoldDecisions(settings, characters)

    def fold(self, post: Post, decisions: FoldDecisions) -> tuple[Post, list[Change]]:
        """The post without the features folded into any of its characters."""
        characters, features = self.characters_and_features(post)
        gone: dict[str, str] = {}  # canonical tag -> the character it is folded into
        for character in characters:
            for tag in decisions.folded_of(character):
                gone.setdefault(tag, character)
        if not gone or not any(name in gone for name, _ in features):
            return post, []
        changes: list[Change] = []
        drop_raw: set[str] = set()
        drop_categorised: set[str] = set()
        for name, raw in features:
            if name in gone:
                changes.append(Change("folded", name, gone[name]))
                (drop_raw if raw is not None else drop_categorised).add(name)
        tags = {category: [t for t in names if not (category == Category.GENERAL
                                                    and self.resolver.canonical(t) in drop_categorised)]
                for category, names in post.tags.items()}
        uncategorised = [t for t in post.uncategorised if self.resolver.canonical(t) not in drop_raw]
        return replace(post, tags=tags, uncategorised=uncategorised), changes
