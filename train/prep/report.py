"""What is in the prepped dataset: counts, histograms, tag frequencies, curation, the gallery.

`PrepStats` is filled while rows are produced; it is written as `report.json`, as `report.html`
(train.prep.report_html: gallery, filters, curation decisions, tables) with PNG plots
(matplotlib, Agg backend: no display needed) and printed as rich tables.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captioning.curation import EditCounts, FoldDecisions
from captioning.tags import display_tag
from captioning.terminal import rich_safe
from train.prep.gallery import GalleryItem

TOP_TAGS = 25
CATEGORY_ORDER = ("character", "copyright", "artist", "general", "meta")


@dataclass
class PrepStats:
    read: int = 0
    kept: int = 0
    auto_tagged: int = 0
    untagged: int = 0  # kept with no tags (no sidecar, no tagger)
    captions_cut: int = 0  # the token budget dropped tags
    masked: int = 0  # kept images with a loss mask (alpha channel or name.mask.png)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    rejected_thumbs: dict[int, str] = field(default_factory=dict)  # index in `rejected` -> thumbnail name
    duplicates: list[tuple[str, str, str]] = field(default_factory=list)  # (id, kind, kept id)
    warnings: list[str] = field(default_factory=list)
    unknown_tags: Counter = field(default_factory=Counter)
    buckets: Counter = field(default_factory=Counter)
    splits: Counter = field(default_factory=Counter)
    head_tags: Counter = field(default_factory=Counter)
    tags: dict[str, Counter] = field(default_factory=dict)  # category name -> tag counts
    ratings: Counter = field(default_factory=Counter)
    years: Counter = field(default_factory=Counter)
    scores: list[int] = field(default_factory=list)
    token_lengths: list[int] = field(default_factory=list)
    caption_tags: Counter = field(default_factory=Counter)  # display tag -> captions that keep it
    tag_parts: dict[str, str] = field(default_factory=dict)  # display tag -> head, body or tail
    cut_tags: Counter = field(default_factory=Counter)  # display tag -> captions the budget cut it from
    edits: EditCounts = field(default_factory=EditCounts)
    fold: FoldDecisions | None = None
    gallery: list[GalleryItem] = field(default_factory=list)  # the first GALLERY_MAX kept images

    def reject(self, path: str, reason: str, thumb: str | None = None) -> None:
        # Non-UTF-8 names arrive surrogate-escaped: shown as \xNN so the JSON/HTML can be written.
        if thumb is not None:
            self.rejected_thumbs[len(self.rejected)] = thumb
        self.rejected.append((os.fsencode(path).decode("utf-8", errors="backslashreplace"), reason))

    def rejected_by_reason(self) -> Counter:
        """Counts by the reason's kind (the text before the first colon)."""
        return Counter(reason.split(":", 1)[0].split(" (")[0] for _, reason in self.rejected)

    def tags_in_order(self) -> list[tuple[str, Counter]]:
        """Per-category counts, the identity categories (character, copyright, artist) first."""
        rank = {name: i for i, name in enumerate(CATEGORY_ORDER)}
        return sorted(self.tags.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0]))

    def add_tags(self, category: str, tags: list[str]) -> None:
        self.tags.setdefault(category, Counter()).update(tags)

    def to_json(self) -> dict[str, Any]:
        return {
            "counts": {
                "read": self.read,
                "kept": self.kept,
                "rejected": len(self.rejected),
                "duplicates": len(self.duplicates),
                "auto_tagged": self.auto_tagged,
                "untagged": self.untagged,
                "captions_cut": self.captions_cut,
                "masked": self.masked,
            },
            "rejected_by_reason": dict(self.rejected_by_reason().most_common()),
            "rejected": [{"path": p, "reason": r} for p, r in self.rejected],
            "duplicates": [{"id": i, "kind": k, "kept": o} for i, k, o in self.duplicates],
            "warnings": self.warnings,
            "unknown_tags": dict(self.unknown_tags.most_common(200)),
            "buckets": dict(sorted(self.buckets.items())),
            "splits": dict(self.splits),
            "head_tags": dict(self.head_tags.most_common(TOP_TAGS)),
            "top_tags": {c: dict(n.most_common(TOP_TAGS)) for c, n in self.tags_in_order()},
            "ratings": dict(sorted(self.ratings.items())),
            "years": dict(sorted(self.years.items())),
            "score_histogram": _histogram(self.scores),
            "token_length_histogram": _histogram(self.token_lengths),
            "token_length_max": max(self.token_lengths, default=0),
            "curation": {"fold": self.fold.to_json() if self.fold else None, "edits": self.edits.to_json()},
            "caption_tags": dict(self.caption_tags.most_common()),
            "cut_tags": dict(self.cut_tags.most_common()),
        }


def _histogram(values: list[int], bins: int = 10) -> dict[str, int]:
    if not values:
        return {}
    low, high = min(values), max(values)
    width = max(1, -(-(high - low + 1) // bins))
    counts = Counter((v - low) // width for v in values)

    def label(b: int) -> str:
        start = low + b * width
        return str(start) if width == 1 else f"{start}-{start + width - 1}"

    return {label(b): counts[b] for b in sorted(counts)}


def _plots(stats: PrepStats, plot_dir: Path) -> list[tuple[str, str]]:
    """(title, file name) of each PNG written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def bar(name: str, title: str, counter: dict, horizontal: bool = False) -> None:
        if not counter:
            return
        labels, values = [str(k) for k in counter], list(counter.values())
        fig, ax = plt.subplots(figsize=(8, max(3, 0.25 * len(labels)) if horizontal else 3.5))
        # Numeric positions with text tick labels: year/score labels must stay categories.
        positions = list(range(len(labels)))
        if horizontal:
            ax.barh(positions, values[::-1])
            ax.set_yticks(positions, labels[::-1])
        else:
            ax.bar(positions, values)
            ax.set_xticks(positions, labels, rotation=45, ha="right")
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(plot_dir / f"{name}.png", dpi=80)
        plt.close(fig)
        written.append((title, f"{name}.png"))

    def hist(name: str, title: str, values: list[int]) -> None:
        if not values:
            return
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.hist(values, bins=min(30, max(1, len(set(values)))))
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(plot_dir / f"{name}.png", dpi=80)
        plt.close(fig)
        written.append((title, f"{name}.png"))

    bar("buckets", "Aspect buckets (width x height)", dict(sorted(stats.buckets.items())))
    bar("ratings", "Ratings", dict(sorted(stats.ratings.items())))
    bar("years", "Years", dict(sorted(stats.years.items())))
    hist("scores", "Scores", stats.scores)
    hist("token_lengths", "Caption length (CLIP tokens)", stats.token_lengths)
    bar(
        "head_tags",
        "Head tags (trigger / character / copyright)",
        dict(stats.head_tags.most_common(TOP_TAGS)),
        True,
    )
    for category, counter in stats.tags_in_order():
        bar(f"tags_{category}", f"Top {category} tags", dict(counter.most_common(TOP_TAGS)), True)
    return written


def write_reports(stats: PrepStats, out: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """`report.json`, `report.html` and `plots/*.png` under `out`; returns the JSON data.

    `out/thumbs/` (written by the validation workers) holds the thumbnails the HTML shows.
    """
    from train.prep.report_html import render_report

    data = {**extra, **stats.to_json()}
    (out / "report.json").write_text(
        json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8"
    )
    plots = _plots(stats, out / "plots")
    (out / "report.html").write_text(render_report(stats, data, plots, out), encoding="utf-8")
    return data


def print_summary(stats: PrepStats, out: Path) -> None:
    """The terminal tables (rich)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    counts = Table(title=f"prep: {rich_safe(str(out))}")
    counts.add_column("count")
    counts.add_column("images", justify="right")
    for key, value in stats.to_json()["counts"].items():
        counts.add_row(key.replace("_", " "), str(value))
    for reason, value in stats.rejected_by_reason().most_common():
        counts.add_row(f"  rejected: {rich_safe(reason)}", str(value))
    console.print(counts)
    buckets = Table(title="buckets")
    buckets.add_column("width x height")
    buckets.add_column("images", justify="right")
    for bucket, value in sorted(stats.buckets.items()):
        buckets.add_row(bucket, str(value))
    console.print(buckets)
    tags = Table(title="top tags")
    tags.add_column("category")
    tags.add_column("tags")
    tags.add_row("head", ", ".join(f"{rich_safe(t)} ({n})" for t, n in stats.head_tags.most_common(8)))
    for category, counter in stats.tags_in_order():
        tags.add_row(category, ", ".join(f"{rich_safe(t)} ({n})" for t, n in counter.most_common(8)))
    console.print(tags)
    if stats.fold is not None and stats.fold.characters:
        fold = Table(title=f"folded into characters (tags in at least {stats.fold.settings.threshold:.0%} of their images)")
        fold.add_column("character / trigger")
        fold.add_column("images", justify="right")
        fold.add_column("folded")
        for name, decision in stats.fold.characters.items():
            folded = ", ".join(display_tag(t) for t in decision.folded) or decision.note or "nothing"
            fold.add_row(rich_safe(display_tag(name)), str(decision.images), rich_safe(folded))
        console.print(fold)
    console.print(f"report: {rich_safe(str(out / 'report.html'))}")
