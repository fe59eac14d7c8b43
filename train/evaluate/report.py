"""The evaluation report: terminal table, CSV, JSON, metric plots, HTML page, wandb.

Everything is written under the output folder atomically (temp file, then os.replace):
`report.json`, `report.csv`, `plots/<metric>.png`, `comparison.png`, `grids/*.png`, `index.html`.
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from train.evaluate.compare import METRICS, EvalRow
from train.generate.sampling import save_text as write_text

logger = logging.getLogger(__name__)
_COLUMNS = ("name", "step", *METRICS, "lora", "grid", "error")


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.5f}" if isinstance(value, float) else str(value)


def print_table(rows: Sequence[EvalRow], recommended: EvalRow | None, reason: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="checkpoint evaluation")
    shown = [m for m in METRICS if any(getattr(r, m) is not None for r in rows)]
    for column in ("checkpoint", "step", *shown, "error"):
        table.add_column(column, overflow="fold")
    for row in rows:
        mark = " *" if recommended is not None and row is recommended else ""
        table.add_row(row.name + mark, str(row.step), *(_cell(getattr(row, m)) for m in shown), row.error or "")
    console = Console()
    console.print(table)
    console.print(f"recommended: {recommended.name if recommended else 'none'} — {reason}")


def write_csv(rows: Sequence[EvalRow], path: Path) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.as_dict().items() if k in _COLUMNS})
    return write_text(path, buffer.getvalue())


def write_json(rows: Sequence[EvalRow], recommended: EvalRow | None, reason: str, extra: dict, path: Path) -> Path:
    report = {
        "rows": [r.as_dict() for r in rows],
        "recommended": recommended.name if recommended else None,
        "recommended_step": recommended.step if recommended else None,
        "reason": reason,
        **extra,
    }
    return write_text(path, json.dumps(report, indent=2) + "\n")


def write_plots(rows: Sequence[EvalRow], folder: Path) -> list[Path]:
    """One line plot per metric over steps (checkpoints with the metric only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from train.generate.sampling import save_png

    paths = []
    for metric in METRICS:
        points = sorted((r.step, getattr(r, metric)) for r in rows if getattr(r, metric) is not None)
        if not points:
            continue
        figure, axes = plt.subplots(figsize=(5, 3), dpi=100)
        axes.plot([s for s, _ in points], [v for _, v in points], marker="o")
        axes.set_xlabel("step")
        axes.set_ylabel(metric)
        axes.grid(alpha=0.3)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        plt.close(figure)
        buffer.seek(0)
        paths.append(save_png(Image.open(buffer), folder / f"{metric}.png"))
    return paths


def write_html(rows: Sequence[EvalRow], recommended: EvalRow | None, reason: str, out_dir: Path,
               plots: Sequence[Path], comparison: Path | None, problems: Sequence[str]) -> Path:
    def rel(path) -> str:
        return html.escape(os.path.relpath(path, out_dir))

    shown = [m for m in METRICS if any(getattr(r, m) is not None for r in rows)]
    head = "".join(f"<th>{c}</th>" for c in ("checkpoint", "step", *shown, "error"))
    body = "".join(
        "<tr{}><td>{}</td><td>{}</td>{}<td>{}</td></tr>".format(
            ' class="pick"' if row is recommended else "", html.escape(row.name), row.step,
            "".join(f"<td>{_cell(getattr(row, m))}</td>" for m in shown), html.escape(row.error or ""))
        for row in rows
    )
    parts = [
        "<!doctype html><meta charset='utf-8'><title>checkpoint evaluation</title>",
        ("<style>body{font-family:sans-serif}td,th{padding:2px 8px;border-bottom:1px solid #ddd}"
        ".pick{background:#e6ffe6}img{max-width:100%}</style>"),
        "<h1>Checkpoint evaluation</h1>",
        f"<p><b>Recommended:</b> {html.escape(recommended.name if recommended else 'none')} — {html.escape(reason)}</p>",
        f"<table><tr>{head}</tr>{body}</table>",
    ]
    if problems:
        parts.append("<h2>Problems</h2><ul>" + "".join(f"<li>{html.escape(p)}</li>" for p in problems) + "</ul>")
    if plots:
        parts.append("<h2>Metrics over steps</h2>" + "".join(f"<img src='{rel(p)}'>" for p in plots))
    if comparison:
        parts.append(f"<h2>Checkpoint x prompt</h2><img src='{rel(comparison)}'>")
    for row in rows:
        if row.grid:
            parts.append(f"<h3>{html.escape(row.name)} (step {row.step})</h3><img src='{rel(row.grid)}'>")
    return write_text(out_dir / "index.html", "\n".join(parts) + "\n")


def log_wandb(rows: Sequence[EvalRow], recommended: EvalRow | None, reason: str, project: str,
              comparison: Path | None) -> None:
    """The same table, per-step metrics and grids in a wandb run (offline works: WANDB_MODE)."""
    import wandb

    run = wandb.init(project=project, job_type="eval")
    for row in rows:
        values = {m: getattr(row, m) for m in METRICS if getattr(row, m) is not None}
        if row.grid:
            values["grid"] = wandb.Image(row.grid, caption=row.name)
        run.log(values, step=row.step)
    run.log({"checkpoints": wandb.Table(columns=list(_COLUMNS),
                                        data=[[_cell(getattr(r, c)) for c in _COLUMNS] for r in rows])})
    if comparison:
        run.log({"comparison": wandb.Image(str(comparison))})
    run.summary["recommended"] = recommended.name if recommended else None
    run.summary["reason"] = reason
    run.finish()
