"""Tag databases: category, post count and aliases of every known tag.

Two CSV layouts are read, told apart by their first line:
- a1111-sd-webui-tagcomplete's `danbooru.csv`: `name,category,post_count,"aliases"`, no header.
  Alias entries starting with `/` are that project's autocomplete shortcuts, not Danbooru
  aliases, and are ignored (../shared/data/README.md).
- the WD v3 taggers' `selected_tags.csv`: header `tag_id,name,category,count`; category 9 marks
  the four rating labels.
Bad rows are reported as `file:line: reason` in `problems` and skipped.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from captioning.tags import Category, normalize_tag

logger = logging.getLogger(__name__)

WD_HEADER = ["tag_id", "name", "category", "count"]
# A WD tagger's tag list: a real Hub file that users who are online can fetch on first use.
DEFAULT_DB_REPO = "SmilingWolf/wd-eva02-large-tagger-v3"
DEFAULT_DB_FILENAME = "selected_tags.csv"
_CATEGORIES = {int(c): c for c in Category}


class TagDatabaseError(ValueError):
    """The tag database cannot be read or fetched at all (bad rows are only reported)."""


class TagDatabase:
    """Category, post count and aliases per canonical tag name."""

    def __init__(self, entries: dict[str, tuple[Category, int]], aliases: dict[str, str],
                 source: str = "", problems: list[str] | None = None) -> None:
        self._entries = entries
        self._aliases = aliases
        self.source = source
        self.problems: list[str] = problems or []

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, tag: str) -> bool:
        return self.resolve(tag) in self._entries

    @classmethod
    def load(cls, path: str | Path) -> TagDatabase:
        """Read a tagcomplete CSV or a WD `selected_tags.csv` (auto-detected).

        Raises TagDatabaseError if the file is missing, not UTF-8 text or holds no valid row.
        """
        path = Path(path)
        try:
            with path.open(newline="", encoding="utf-8") as f:
                rows = list(csv.reader(f))
        except FileNotFoundError:
            raise TagDatabaseError(f"{path}: tag database not found") from None
        except UnicodeDecodeError as error:
            raise TagDatabaseError(f"{path}: not UTF-8 text ({error.reason})") from None
        except (OSError, csv.Error) as error:
            raise TagDatabaseError(f"{path}: cannot read tag database: {error}") from None
        if rows and [c.strip().lower() for c in rows[0][:4]] == WD_HEADER:
            db = cls._from_wd_rows(rows, path)
        else:
            db = cls._from_tagcomplete_rows(rows, path)
        if not db._entries:
            raise TagDatabaseError(f"{path}: no valid tag rows (is this a tag database CSV?)")
        for problem in db.problems[:5]:
            logger.warning("%s", problem)
        if len(db.problems) > 5:
            logger.warning("%s: %d more bad rows skipped", path, len(db.problems) - 5)
        return db

    @classmethod
    def _from_tagcomplete_rows(cls, rows: list[list[str]], path: Path) -> TagDatabase:
        entries: dict[str, tuple[Category, int]] = {}
        alias_lists: list[tuple[str, str]] = []
        problems: list[str] = []
        for line, row in enumerate(rows, start=1):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) not in (3, 4):
                problems.append(f"{path}:{line}: expected name,category,post_count[,aliases], got {len(row)} fields")
                continue
            parsed = _parse_entry(row[0], row[1], row[2], f"{path}:{line}", entries)
            if isinstance(parsed, str):
                problems.append(parsed)
                continue
            name, category, count = parsed
            entries[name] = (category, count)
            if len(row) == 4 and row[3]:
                alias_lists.append((name, row[3]))
        aliases = {}
        for name, text in alias_lists:
            for alias in text.split(","):
                alias = alias.strip()
                # `/lh`-style entries are tagcomplete shortcuts; a real tag name never becomes an alias.
                if alias and not alias.startswith("/"):
                    alias = normalize_tag(alias)
                    if alias not in entries:
                        aliases.setdefault(alias, name)
        return cls(entries, aliases, str(path), problems)

    @classmethod
    def _from_wd_rows(cls, rows: list[list[str]], path: Path) -> TagDatabase:
        entries: dict[str, tuple[Category, int]] = {}
        problems: list[str] = []
        for line, row in enumerate(rows[1:], start=2):
            if not row:
                continue
            if len(row) != 4:
                problems.append(f"{path}:{line}: expected tag_id,name,category,count, got {len(row)} fields")
                continue
            parsed = _parse_entry(row[1], row[2], row[3], f"{path}:{line}", entries)
            if isinstance(parsed, str):
                problems.append(parsed)
                continue
            name, category, count = parsed
            entries[name] = (category, count)
        return cls(entries, {}, str(path), problems)

    def resolve(self, tag: str) -> str:
        """The canonical name of `tag` (aliases followed); unknown tags come back normalized."""
        if tag in self._entries:
            return tag
        name = normalize_tag(tag)
        if name in self._entries:
            return name
        return self._aliases.get(name, name)

    def category(self, tag: str) -> Category | None:
        """The tag's category, or None if the database does not know it."""
        entry = self._entries.get(tag) or self._entries.get(self.resolve(tag))
        return entry[0] if entry else None

    def post_count(self, tag: str) -> int:
        """How many posts carry the tag (0 if unknown)."""
        entry = self._entries.get(tag) or self._entries.get(self.resolve(tag))
        return entry[1] if entry else 0

    def lookup(self, tag: str) -> tuple[str, Category | None, int]:
        """(canonical name, category or None, post count) in one call: the captioner's hot path."""
        entry = self._entries.get(tag)
        if entry is None:
            tag = self.resolve(tag)
            entry = self._entries.get(tag)
        if entry is None:
            return tag, None, 0
        return tag, entry[0], entry[1]

    def entries(self):
        """(name, (category, post count)) of every tag."""
        return self._entries.items()

    def tags_of(self, category: Category) -> list[tuple[str, int]]:
        """(name, post count) of every tag in a category, most common first (for benchmarks)."""
        found = [(n, c) for n, (cat, c) in self._entries.items() if cat == category]
        return sorted(found, key=lambda item: -item[1])


def _parse_entry(name: str, category: str, count: str, where: str,
                 seen: dict) -> tuple[str, Category, int] | str:
    """A valid (name, category, count) or the problem message for the row."""
    name = normalize_tag(name)
    if not name:
        return f"{where}: empty tag name"
    try:
        cat = _CATEGORIES[int(category)]
    except (ValueError, KeyError):
        return f"{where}: unknown category {category!r} for tag {name!r}"
    try:
        posts = int(count or 0)
    except ValueError:
        return f"{where}: post count {count!r} of tag {name!r} is not an integer"
    if posts < 0:
        return f"{where}: negative post count {posts} for tag {name!r}"
    if name in seen:
        return f"{where}: duplicate tag {name!r} (first row kept)"
    return name, cat, posts


def fetch_tag_database(repo_id: str = DEFAULT_DB_REPO, filename: str = DEFAULT_DB_FILENAME,
                       repo_type: str = "model") -> Path:
    """Download a tag database into the Hugging Face cache (first use only) and return its path.

    Uses `huggingface_hub.hf_hub_download`, so the file is cached and reused offline.
    Raises TagDatabaseError with what to do instead when it is neither cached nor reachable.
    """
    from huggingface_hub import hf_hub_download

    # Network and cache failures surface as different exception types across huggingface_hub
    # versions (requests, httpx, its own errors), so both calls catch broadly.
    try:
        return Path(hf_hub_download(repo_id, filename, repo_type=repo_type, local_files_only=True))
    except Exception:  # noqa: BLE001, S110 - not cached yet: download below
        pass
    logger.info("downloading the tag database %s/%s into the Hugging Face cache (first use)",
                repo_id, filename)
    try:
        return Path(hf_hub_download(repo_id, filename, repo_type=repo_type))
    except Exception as error:  # noqa: BLE001
        raise TagDatabaseError(
            f"cannot download the tag database {repo_id}/{filename} ({type(error).__name__}); "
            "offline? pass --tags-db PATH (a tagcomplete danbooru.csv or a WD selected_tags.csv)"
        ) from None
