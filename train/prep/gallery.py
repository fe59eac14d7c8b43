"""What the report's gallery shows of each image: thumbnail, caption parts, curation, bucket and crop.

Thumbnails are WebP files in `OUT/thumbs/`, written by the validation workers (train.prep.validate)
while each image is decoded; their names come from the record id, so the report can name the
thumbnail of any image it lists (kept, rejected or dropped as a duplicate) without decoding it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from captioning.curation import Change
from captioning.tags import display_tag

THUMBS = "thumbs"  # folder under OUT, beside report.html
GALLERY_MAX = 20_000  # cards in report.html; beyond this the report says how many are not shown

# Problem kinds a gallery card can carry, with the words the report's filter shows.
PROBLEMS = {
    "cut": "cut by the token budget",
    "untagged": "no tags from a sidecar or tagger",
    "unknown": "tags the database does not know",
    "auto-tagged": "auto-tagged",
    "warnings": "warnings",
}


def thumb_name(record_id: str) -> str:
    """The thumbnail file of a record (stable: the same image id gives the same name)."""
    return hashlib.sha1(record_id.encode("utf-8")).hexdigest()[:20] + ".webp"


@dataclass
class Struck:
    """A tag shown struck through in a caption: what it was and why it is not there."""

    tag: str  # display form
    kind: str  # folded, removed, replaced, cut
    detail: str = ""  # folded: the character; removed: the rule; replaced: the new tag


def struck_tags(changes: list[Change], cut: list[str]) -> list[Struck]:
    """Curation changes and budget cuts of one caption, as the gallery strikes them through."""
    struck = [Struck(display_tag(c.tag), c.kind, display_tag(c.detail) if c.detail else "")
              for c in changes if c.kind != "added"]
    return struck + [Struck(tag, "cut", "token budget") for tag in cut]


@dataclass
class GalleryItem:
    """One kept image as its gallery card shows it."""

    id: str
    thumb: str  # file name under THUMBS
    source: str  # the source's name
    path: str  # the original file, for display
    width: int
    height: int
    bucket_width: int
    bucket_height: int
    resize_width: int
    resize_height: int
    crop_left: int
    crop_top: int
    repeats: int
    split: str
    mask: str | None
    head: list[str]
    body: list[str]
    tail: list[str]
    tokens: int
    characters: list[str] = field(default_factory=list)  # display forms
    struck: list[Struck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # keys of PROBLEMS

    @property
    def crop_box(self) -> tuple[float, float, float, float]:
        """(left, top, width, height) of the trained crop, in percent of the whole image.

        The image is resized to cover the bucket (resize_width x resize_height) and the bucket is
        cut out at (crop_left, crop_top) of the resized image (train.prep.buckets.place).
        """
        return (100 * self.crop_left / self.resize_width, 100 * self.crop_top / self.resize_height,
                100 * self.bucket_width / self.resize_width, 100 * self.bucket_height / self.resize_height)
