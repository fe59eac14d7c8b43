"""The record every reader produces, whatever the input format, and the problems it reports."""

from __future__ import annotations

import json
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

    def to_json(self) -> dict:
        """The post as JSON-ready data (`from_json` reads it back equal); metadata values that
        JSON cannot hold become strings."""
        return {"id": self.id, "origin": self.origin, "tags": {int(c): names for c, names in self.tags.items()},
                "uncategorised": self.uncategorised, "rating": self.rating, "score": self.score,
                "created_at": self.created_at.isoformat() if self.created_at is not None else None,
                "metadata": json.loads(json.dumps(self.metadata, default=str)), "aesthetic": self.aesthetic}

    @classmethod
    def from_json(cls, data: dict) -> Post:
        created = data["created_at"]
        return cls(id=data["id"], origin=data["origin"],
                   tags={Category(int(c)): names for c, names in data["tags"].items()},
                   uncategorised=data["uncategorised"], rating=data["rating"], score=data["score"],
                   created_at=datetime.fromisoformat(created) if created is not None else None,
                   metadata=data["metadata"], aesthetic=data["aesthetic"])


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
