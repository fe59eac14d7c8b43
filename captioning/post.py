"""The record every reader produces, whatever the input format, and the problems it reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from captioning.tags import Category

RATINGS = ("g", "s", "q", "e")


@dataclass
class Post:
    """One image's tags and metadata.

    `tags` holds tags whose category the source states (Danbooru's `tag_string_*` fields);
    `uncategorised` holds flat tags still to be looked up in a tag database. Names are
    canonical (see `normalize_tag`) for the former, raw text for the latter.
    """

    id: str
    origin: str  # "file:line" or the file path, for messages
    tags: dict[Category, list[str]]
    uncategorised: list[str]
    rating: str | None  # one of RATINGS
    score: int | None
    created_at: datetime | None  # media_asset.created_at, else created_at
    metadata: dict = field(default_factory=dict)  # every source field that was used
    aesthetic: float | None = None  # an image classifier's aesthetic score in [0, 1] (captioning.aesthetic)


@dataclass(frozen=True)
class Problem:
    """A bad record or field: `origin` names the file and line, `reason` says what is wrong.

    `skipped` is False for warnings about a record that is still captioned (without the
    bad part); such a Problem is yielded just before the record's Post.
    """

    origin: str
    reason: str
    skipped: bool = True

    def __str__(self) -> str:
        return f"{self.origin}: {self.reason}"
