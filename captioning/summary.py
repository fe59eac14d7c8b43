"""The end-of-run summary of `animagine-lora caption`: counts, reasons and histograms."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from captioning.post import Problem
from captioning.terminal import rich_safe

# Reasons are grouped without their specifics ('x', 12) so the table shows kinds, not records.
_SPECIFICS = re.compile(r"'[^']*'|\"[^\"]*\"|\b\d+\b")


# The output-record fields `add_record` counts.
SUMMARY_FIELDS = ("rating", "year", "score_tag", "quality_tag", "cut", "unknown_tags", "tokens")


def reason_kind(reason: str) -> str:
    return _SPECIFICS.sub("…", reason)


@dataclass
class CaptionSummary:
    read: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason kind -> records
    warnings: Counter = field(default_factory=Counter)  # reason kind -> occurrences
    cut: int = 0
    unknown_tags: Counter = field(default_factory=Counter)
    ratings: Counter = field(default_factory=Counter)
    years: Counter = field(default_factory=Counter)
    scores: Counter = field(default_factory=Counter)
    qualities: Counter = field(default_factory=Counter)
    tokens_max: int = 0
    tokens_total: int = 0
    captioned: int = 0
    tag_sources: list = field(default_factory=list)  # (tag database file, tags it categorised)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def add_problem(self, problem: Problem) -> None:
        target = self.skipped if problem.skipped else self.warnings
        target[reason_kind(problem.reason)] += 1

    def add_record(self, record: dict, sign: int = 1) -> None:
        """Count one output record (the JSON object `animagine-lora caption` writes); `sign=-1`
        takes it back out (a duplicate found after captioning). Counting the output object
        itself, rather than the captioner's result, keeps the two directions identical."""
        self.ratings[record["rating"] or "none"] += sign
        year = record["year"]
        self.years[str(year) if year else "none"] += sign
        self.scores[record["score_tag"] or "none"] += sign
        self.qualities[record["quality_tag"] or "none"] += sign
        self.cut += sign * record["cut"]
        for tag in record["unknown_tags"]:
            self.unknown_tags[tag] += sign
        tokens = record["tokens"]
        self.tokens_total += sign * max(tokens, 0)
        self.captioned += sign
        if sign > 0 and tokens > self.tokens_max:
            self.tokens_max = tokens

    def merge(self, other: CaptionSummary) -> None:
        """Add another (chunk's) summary into this one."""
        self.read += other.read
        self.written += other.written
        self.cut += other.cut
        self.captioned += other.captioned
        self.tokens_total += other.tokens_total
        self.tokens_max = max(self.tokens_max, other.tokens_max)
        for mine, theirs in ((self.skipped, other.skipped), (self.warnings, other.warnings),
                             (self.unknown_tags, other.unknown_tags), (self.ratings, other.ratings),
                             (self.years, other.years), (self.scores, other.scores),
                             (self.qualities, other.qualities)):
            mine.update(theirs)

    def as_dict(self) -> dict:
        captioned = self.captioned
        return {
            "read": self.read, "written": self.written, "skipped": dict(self.skipped),
            "warnings": dict(self.warnings), "cut_by_budget": self.cut,
            "unknown_tags": {"distinct": len(+self.unknown_tags), "occurrences": sum((+self.unknown_tags).values()),
                             "most_common": (+self.unknown_tags).most_common(10)},
            "ratings": _positive(self.ratings), "years": dict(sorted(_positive(self.years).items())),
            "scores": _positive(self.scores), "qualities": _positive(self.qualities),
            "tokens_max": self.tokens_max,
            "tokens_mean": round(self.tokens_total / captioned, 1) if captioned > 0 else 0,
            "tag_sources": [list(item) for item in self.tag_sources],
        }

    def print(self) -> None:
        """The summary as rich tables on stdout."""
        from rich.console import Console
        from rich.table import Table

        data = self.as_dict()
        table = Table(title="caption summary", show_header=False)
        table.add_column("what")
        table.add_column("value", justify="right")
        table.add_row("records read", str(self.read))
        table.add_row("captions written", str(self.written))
        table.add_row("records skipped", str(self.skipped_total))
        for reason, count in self.skipped.most_common():
            table.add_row(f"  skipped: {rich_safe(reason)}", str(count))
        for reason, count in self.warnings.most_common(10):
            table.add_row(f"  warning: {rich_safe(reason)}", str(count))
        for source, count in self.tag_sources:
            table.add_row(f"tags categorised by {source}", str(count))
        table.add_row("captions cut by the token budget", str(self.cut))
        table.add_row("tokens (mean / max)", f"{data['tokens_mean']} / {self.tokens_max}")
        unknown = data["unknown_tags"]
        table.add_row("unknown tags (distinct / occurrences)", f"{unknown['distinct']} / {unknown['occurrences']}")
        if unknown["most_common"]:
            table.add_row("  most common unknown", ", ".join(rich_safe(t) for t, _ in unknown["most_common"]))
        for title, key in (("rating", "ratings"), ("year", "years"), ("score", "scores"), ("quality", "qualities")):
            counts = data[key]
            items = counts.items() if title == "year" else sorted(counts.items(), key=lambda kv: -kv[1])
            table.add_row(title, "  ".join(f"{k}: {v}" for k, v in items))
        import sys

        # Piped output gets a fixed width so the table is not squeezed to 80 columns.
        Console(width=None if sys.stdout.isatty() else 120).print(table)


def _positive(counter: Counter) -> dict:
    return {k: v for k, v in counter.items() if v > 0}
