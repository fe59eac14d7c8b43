"""Tag databases: category, post count and aliases of every known tag.

The package ships Danbooru's tag list with all five categories and aliases (`captioning/data/`,
the MIT-licensed a1111-sd-webui-tagcomplete snapshot of 2024-12-22, 140,782 tags with at least
25 posts), packed for a fast start; `shipped_tag_database()` loads it. Files users pass:
- a1111-sd-webui-tagcomplete's `danbooru.csv`: `name,category,post_count,"aliases"`, no header.
  Alias entries starting with `/` are that project's autocomplete shortcuts (`/lh`), not
  Danbooru aliases, and are ignored.
- the WD v3 taggers' `selected_tags.csv`: header `tag_id,name,category,count`; category 9 marks
  the four rating labels. It has no artist or copyright category, so `load_tag_database` merges
  it over the shipped database instead of replacing it.
Bad rows are reported as `file:line: reason` in `problems` and skipped.
"""

from __future__ import annotations

import csv
import functools
import gzip
import json
import logging
import os
import tempfile
from pathlib import Path

from captioning.tags import Category, normalize_tag

logger = logging.getLogger(__name__)

WD_HEADER = ["tag_id", "name", "category", "count"]
DATA_DIR = Path(__file__).resolve().parent / "data"
SHIPPED_DB = DATA_DIR / "danbooru_tags.tags.gz"  # packed from SHIPPED_DB_CSV (`python -m captioning.tag_db`)
SHIPPED_DB_CSV = DATA_DIR / "danbooru_tags.csv.gz"
# A WD tagger's tag list: a real Hub file that users who are online can fetch on first use.
DEFAULT_DB_REPO = "SmilingWolf/wd-eva02-large-tagger-v3"
DEFAULT_DB_FILENAME = "selected_tags.csv"
_CATEGORIES = {int(c): c for c in Category}
PACK_FORMAT = "animagine-lora tag database 1"
PACK_SUFFIX = ".tags.gz"


class TagDatabaseError(ValueError):
    """The tag database cannot be read or fetched at all (bad rows are only reported)."""


class TagDatabase:
    """Category, post count and aliases per canonical tag name.

    Stored as columns (names, categories, counts) with a name -> row index, because building
    140k per-tag tuples costs more than the whole start-up budget of `caption` on a small file.
    Aliases are parsed on the first lookup of a tag that is not a canonical name.
    """

    def __init__(self, names: list[str], categories: list[Category], counts: list[int],
                 aliases: dict[str, str] | list[tuple[int, str]], source: str = "",
                 problems: list[str] | None = None) -> None:
        """`aliases`: alias -> name, or (row, raw tagcomplete alias list) pairs parsed lazily."""
        self._names = names
        self._index = dict(zip(names, range(len(names))))
        self._categories = categories
        self._counts = counts
        self._aliases: dict[str, str] | None = aliases if isinstance(aliases, dict) else None
        self._raw_aliases = [] if isinstance(aliases, dict) else aliases
        self.source = source
        self.problems: list[str] = problems or []
        # "wd" for a WD tagger's selected_tags.csv: general, character and rating tags only.
        self.kind = "tagcomplete"
        # (source, tags it categorised): one row per file merged into this database.
        self.sources: list[tuple[str, int]] = [(source, len(names))]

    @classmethod
    def from_entries(cls, entries: dict[str, tuple[Category, int]], aliases: dict[str, str] | list,
                     source: str = "", problems: list[str] | None = None) -> TagDatabase:
        names = list(entries)
        values = list(entries.values())
        return cls(names, [v[0] for v in values], [v[1] for v in values], aliases, source, problems)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, tag: str) -> bool:
        return self.resolve(tag) in self._index

    @classmethod
    def load(cls, path: str | Path) -> TagDatabase:
        """Read a tagcomplete CSV, a WD `selected_tags.csv` (auto-detected; either may be
        gzipped) or a packed database (`pack`).

        Raises TagDatabaseError if the file is missing, not UTF-8 text or holds no valid row.
        """
        path = Path(path)
        if path.name.endswith(PACK_SUFFIX):
            return cls._load_pack(path)
        try:
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt", newline="", encoding="utf-8") as f:
                rows = list(csv.reader(f))
        except FileNotFoundError:
            raise TagDatabaseError(f"{path}: tag database not found") from None
        except UnicodeDecodeError as error:
            raise TagDatabaseError(f"{path}: not UTF-8 text ({error.reason})") from None
        except (OSError, EOFError, csv.Error) as error:
            raise TagDatabaseError(f"{path}: cannot read tag database: {error}") from None
        if rows and [c.strip().lower() for c in rows[0][:4]] == WD_HEADER:
            db = cls._from_wd_rows(rows, path)
        else:
            db = cls._from_tagcomplete_rows(rows, path)
        if not len(db):
            raise TagDatabaseError(f"{path}: no valid tag rows (is this a tag database CSV?)")
        for problem in db.problems[:5]:
            logger.warning("%s", problem)
        if len(db.problems) > 5:
            logger.warning("%s: %d more bad rows skipped", path, len(db.problems) - 5)
        return db

    @classmethod
    def _from_tagcomplete_rows(cls, rows: list[list[str]], path: Path) -> TagDatabase:
        entries: dict[str, tuple[Category, int]] = {}
        alias_lists: list[tuple[int, str]] = []
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
            if len(row) == 4 and row[3]:
                alias_lists.append((len(entries), row[3]))
            entries[name] = (category, count)
        return cls.from_entries(entries, alias_lists, str(path), problems)

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
        db = cls.from_entries(entries, {}, str(path), problems)
        db.kind = "wd"
        return db

    # ---- packed form ------------------------------------------------------------------------

    def pack(self, path: str | Path) -> Path:
        """Write the database in the packed form `load` reads in a fraction of the CSV's time.

        Layout (gzip, UTF-8 lines): a JSON header (format, source, rows per category in file
        order); one canonical name per line, grouped by category; one line of post counts;
        then `row<TAB>raw alias list` for every row with aliases. Rows, counts and alias lists
        are the source's own, so the packed file holds the same content. Written atomically.
        """
        path = Path(path)
        order = sorted(range(len(self._names)), key=lambda i: int(self._categories[i]))
        groups: list[list[int]] = []
        for i in order:
            category = int(self._categories[i])
            if not groups or groups[-1][0] != category:
                groups.append([category, 0])
            groups[-1][1] += 1
        new_row = {old: new for new, old in enumerate(order)}
        header = {"format": PACK_FORMAT, "source": Path(self.source).name, "groups": groups}
        lines = [json.dumps(header), *(self._names[i] for i in order),
                 " ".join(str(self._counts[i]) for i in order)]
        # Alias rows stay in source order: the first row claiming an alias keeps it.
        lines += [f"{new_row[row]}\t{text}" for row, text in self._alias_rows()]
        data = gzip.compress("\n".join(lines).encode("utf-8"), 9, mtime=0)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # package data: readable by all, like the files beside it
        os.replace(tmp, path)
        return path

    def _alias_rows(self) -> list[tuple[int, str]]:
        if self._raw_aliases or self._aliases is None:
            return list(self._raw_aliases)
        return [(self._index[name], alias) for alias, name in self._aliases.items()]

    @classmethod
    def _load_pack(cls, path: Path) -> TagDatabase:
        try:
            lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
            header = json.loads(lines[0])
            if header.get("format") != PACK_FORMAT:
                raise ValueError(f"format {header.get('format')!r}, expected {PACK_FORMAT!r}")
            total = sum(n for _, n in header["groups"])
            names = lines[1: total + 1]
            counts = list(map(int, lines[total + 1].split()))
            categories: list[Category] = []
            for category, n in header["groups"]:
                categories += [_CATEGORIES[category]] * n
            aliases = [(int(row), text) for row, _, text in (line.partition("\t") for line in lines[total + 2:])]
        except FileNotFoundError:
            raise TagDatabaseError(f"{path}: tag database not found") from None
        except (OSError, EOFError, UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError) as error:
            raise TagDatabaseError(f"{path}: not a packed tag database ({error})") from None
        if len(counts) != total:
            raise TagDatabaseError(f"{path}: {len(counts)} post counts for {total} tags")
        return cls(names, categories, counts, aliases, header.get("source") or str(path))

    # ---- merging ----------------------------------------------------------------------------

    def merged(self, other: TagDatabase) -> TagDatabase:
        """This database plus the tags only `other` knows (a WD `selected_tags.csv` adds its
        tags; it never changes the category of a tag this database has)."""
        new = [i for i, name in enumerate(other._names) if name not in self._index]
        db = TagDatabase(self._names + [other._names[i] for i in new],
                         self._categories + [other._categories[i] for i in new],
                         self._counts + [other._counts[i] for i in new],
                         self._alias_rows() if self._aliases is None else dict(self._aliases),
                         self.source, self.problems + other.problems)
        db.sources = [*self.sources, (other.source, len(new))]
        return db

    # ---- lookups ----------------------------------------------------------------------------

    def _alias_map(self) -> dict[str, str]:
        if self._aliases is None:
            aliases: dict[str, str] = {}
            for row, text in self._raw_aliases:
                name = self._names[row]
                for alias in text.split(","):
                    alias = alias.strip()
                    # `/lh`-style entries are tagcomplete shortcuts; a real tag name never becomes an alias.
                    if alias and not alias.startswith("/"):
                        alias = normalize_tag(alias)
                        if alias not in self._index:
                            aliases.setdefault(alias, name)
            self._aliases = aliases
        return self._aliases

    def resolve(self, tag: str) -> str:
        """The canonical name of `tag` (aliases followed); unknown tags come back normalized."""
        if tag in self._index:
            return tag
        name = normalize_tag(tag)
        if name in self._index:
            return name
        return self._alias_map().get(name, name)

    def category(self, tag: str) -> Category | None:
        """The tag's category, or None if the database does not know it."""
        return self.lookup(tag)[1]

    def post_count(self, tag: str) -> int:
        """How many posts carry the tag (0 if unknown)."""
        return self.lookup(tag)[2]

    def lookup(self, tag: str) -> tuple[str, Category | None, int]:
        """(canonical name, category or None, post count) in one call: the captioner's hot path."""
        row = self._index.get(tag)
        if row is None:
            tag = self.resolve(tag)
            row = self._index.get(tag)
            if row is None:
                return tag, None, 0
        return tag, self._categories[row], self._counts[row]

    def entries(self):
        """(name, (category, post count)) of every tag."""
        return zip(self._names, zip(self._categories, self._counts))

    def tags_of(self, category: Category) -> list[tuple[str, int]]:
        """(name, post count) of every tag in a category, most common first (for benchmarks)."""
        found = [(n, c) for n, (cat, c) in self.entries() if cat == category]
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
    """A tag database file from the Hub (e.g. a WD tagger's `selected_tags.csv`), cached.

    Not needed for captioning (the package ships a fuller database); for users who want a
    tagger's own list. Raises TagDatabaseError at once when it is neither cached nor reachable.
    """
    from captioning.hub import HubUnreachableError, hf_download

    try:
        return Path(hf_download(repo_id, filename, f"the tag database {repo_id}/{filename}",
                                "--tags-db PATH (a tagcomplete danbooru.csv or a WD selected_tags.csv)",
                                repo_type=repo_type))
    except HubUnreachableError as error:
        raise TagDatabaseError(str(error)) from None
    except Exception as error:  # noqa: BLE001 - requests, httpx and huggingface_hub errors
        raise TagDatabaseError(f"cannot download the tag database {repo_id}/{filename} "
                               f"({type(error).__name__}); pass --tags-db PATH") from None


@functools.lru_cache(maxsize=1)
def shipped_tag_database() -> TagDatabase:
    """The tag database that ships with the package (loaded once per process)."""
    db = TagDatabase.load(SHIPPED_DB)
    db.source = f"{SHIPPED_DB_CSV.name} (shipped)"
    db.sources = [(db.source, len(db))]
    return db


def load_tag_database(path: str | Path | None = None) -> TagDatabase:
    """The shipped database; `path`'s instead (a tagcomplete CSV or a packed file), or merged
    over it (a WD `selected_tags.csv`, which lacks the artist and copyright categories)."""
    if path is None:
        return shipped_tag_database()
    db = TagDatabase.load(path)
    return shipped_tag_database().merged(db) if db.kind == "wd" else db


def main(argv: list[str] | None = None) -> int:
    """`python -m captioning.tag_db [CSV [OUT]]`: pack a tag database CSV (default: the shipped
    CSV into the shipped packed file)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    source = Path(args[0]) if args else SHIPPED_DB_CSV
    out = Path(args[1]) if len(args) > 1 else SHIPPED_DB
    db = TagDatabase.load(source)
    db.pack(out)
    print(f"{out}: {len(db)} tags from {source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
