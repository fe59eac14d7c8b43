"""The end-of-run summary of `animagine-lora caption`: counts, reasons and histograms."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from captioning.post import Problem

# Reasons are grouped without their specifics ('x', 12) so the table shows kinds, not records.
_SPECIFICS = re.compile(r"'[^']*'|\"[^\"]*\"|\b\d+\b")


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

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def add(self, problems: list[Problem], record: dict | None) -> None:
        """Count one input record: its problems and, if captioned, its caption's statistics."""
        self.read += 1
        for problem in problems:
            target = self.skipped if problem.skipped else self.warnings
            target[reason_kind(problem.reason)] += 1
        if record is None:
            if not any(p.skipped for p in problems):
                self.skipped["no record"] += 1
            return
        self.cut += bool(record["cut"])
        self.unknown_tags.update(record["unknown_tags"])
        rating, year, score_tag, quality_tag = record["_stats"]
        self.ratings[rating or "none"] += 1
        self.years[str(year) if year else "none"] += 1
        self.scores[score_tag or "none"] += 1
        self.qualities[quality_tag or "none"] += 1
        self.tokens_max = max(self.tokens_max, record["tokens"])
        self.tokens_total += max(record["tokens"], 0)

    def as_dict(self) -> dict:
        captioned = self.read - self.skipped_total
        return {
            "read": self.read, "written": self.written, "skipped": dict(self.skipped),
            "warnings": dict(self.warnings), "cut_by_budget": self.cut,
            "unknown_tags": {"distinct": len(self.unknown_tags), "occurrences": sum(self.unknown_tags.values()),
                             "most_common": self.unknown_tags.most_common(10)},
            "ratings": dict(self.ratings), "years": dict(sorted(self.years.items())),
            "scores": dict(self.scores), "qualities": dict(self.qualities),
            "tokens_max": self.tokens_max,
            "tokens_mean": round(self.tokens_total / captioned, 1) if captioned > 0 else 0,
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
            table.add_row(f"  skipped: {reason}", str(count))
        for reason, count in self.warnings.most_common(10):
            table.add_row(f"  warning: {reason}", str(count))
        table.add_row("captions cut by the token budget", str(self.cut))
        table.add_row("tokens (mean / max)", f"{data['tokens_mean']} / {self.tokens_max}")
        unknown = data["unknown_tags"]
        table.add_row("unknown tags (distinct / occurrences)", f"{unknown['distinct']} / {unknown['occurrences']}")
        if unknown["most_common"]:
            table.add_row("  most common unknown", ", ".join(t for t, _ in unknown["most_common"]))
        for title, counter in (("rating", self.ratings), ("year", self.years), ("score", self.scores),
                               ("quality", self.qualities)):
            items = sorted(counter.items()) if title == "year" else counter.most_common()
            table.add_row(title, "  ".join(f"{k}: {v}" for k, v in items))
        import sys

        # Piped output gets a fixed width so the table is not squeezed to 80 columns.
        Console(width=None if sys.stdout.isatty() else 120).print(table)
