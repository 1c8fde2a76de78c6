"""Summary tables: a rich table for the terminal, Markdown and CSV for papers.

Rows are methods then baselines; columns are the continual-learning metrics
and, optionally, the per-task accuracies. Values are shown in percent
(accuracies are stored as fractions), as ``mean ± std`` over runs when
there is more than one.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

from cl_merge.core.io import atomic_write_text
from cl_merge.report.aggregate import Aggregate, AggregateRow, aggregate_runs
from cl_merge.report.run_folder import RunRecord

# (metric key, column header)
METRIC_COLUMNS: tuple[tuple[str, str], ...] = (
    ("final_accuracy", "ACC"),
    ("average_incremental_accuracy", "AIA"),
    ("forgetting", "Forgetting"),
    ("backward_transfer", "BWT"),
    ("forward_transfer", "FWT"),
    ("normalized_accuracy", "Norm. ACC"),
)


def _as_aggregate(data: Aggregate | RunRecord | Sequence[RunRecord]) -> Aggregate:
    if isinstance(data, Aggregate):
        return data
    if isinstance(data, RunRecord):
        return aggregate_runs([data])
    return aggregate_runs(list(data))


def format_cell(mean: float | None, std: float | None, n: int, digits: int = 1, scale: float = 100.0) -> str:
    """``'72.4 ± 1.3'``; ``'72.4'`` for one run; ``'–'`` when not available."""
    if mean is None:
        return "–"
    text = f"{mean * scale:.{digits}f}"
    if n > 1 and std is not None:
        text += f" ± {std * scale:.{digits}f}"
    return text


def table_rows(data, per_task: bool = True, digits: int = 1) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows shared by every writer."""
    agg = _as_aggregate(data)
    header = ["Method", *(title for _, title in METRIC_COLUMNS)]
    if per_task:
        header += agg.tasks
    rows = []
    for row in agg.rows:
        cells = [row.label if row.kind == "method" else f"{row.label} (baseline)"]
        cells += [format_cell(*row.metrics.get(key, (None, None)), row.n, digits) for key, _ in METRIC_COLUMNS]
        if per_task:
            cells += [format_cell(*row.per_task.get(t, (None, None)), row.n, digits) for t in agg.tasks]
        rows.append(cells)
    return header, rows


def rich_table(data, per_task: bool = True, digits: int = 1, title: str | None = None):
    """A ``rich.table.Table`` of the summary."""
    from rich.table import Table

    agg = _as_aggregate(data)
    header, rows = table_rows(agg, per_task, digits)
    runs = f", mean ± std over {agg.num_runs} runs" if agg.num_runs > 1 else ""
    table = Table(title=title or f"{agg.scenario} (accuracy in %{runs})")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for cells in rows:
        table.add_row(*cells)
    return table


def print_summary(data, per_task: bool = True, digits: int = 1, console=None) -> None:
    """Print the summary table (the runner calls this at the end of a run)."""
    from rich.console import Console

    (console or Console()).print(rich_table(data, per_task, digits))


def markdown_table(data, per_task: bool = True, digits: int = 1) -> str:
    """GitHub-flavoured Markdown table."""
    header, rows = table_rows(data, per_task, digits)
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def csv_text(data, per_task: bool = True) -> str:
    """Machine-readable CSV: one row per method/baseline, ``<metric>_mean``/``<metric>_std``
    columns (fractions, not percent), then ``<task>_mean``/``<task>_std``."""
    agg = _as_aggregate(data)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    keys = [key for key, _ in METRIC_COLUMNS]
    header = ["method", "kind", "runs"] + [f"{k}_{s}" for k in keys for s in ("mean", "std")]
    if per_task:
        header += [f"{t}_{s}" for t in agg.tasks for s in ("mean", "std")]
    writer.writerow(header)

    def cells(pairs):
        return ["" if v is None else repr(v) for pair in pairs for v in pair]

    for row in agg.rows:
        line = [row.label, row.kind, row.n] + cells(row.metrics.get(k, (None, None)) for k in keys)
        if per_task:
            line += cells(row.per_task.get(t, (None, None)) for t in agg.tasks)
        writer.writerow(line)
    return buf.getvalue()


def write_markdown(data, path: str | Path, per_task: bool = True, digits: int = 1) -> Path:
    agg = _as_aggregate(data)
    runs = f" Mean ± std over {agg.num_runs} runs." if agg.num_runs > 1 else ""
    text = f"### {agg.scenario}\n\nAccuracy in %.{runs}\n\n" + markdown_table(agg, per_task, digits)
    atomic_write_text(path, text)
    return Path(path)


def write_csv(data, path: str | Path, per_task: bool = True) -> Path:
    atomic_write_text(path, csv_text(data, per_task))
    return Path(path)


__all__ = [
    "METRIC_COLUMNS",
    "AggregateRow",
    "csv_text",
    "format_cell",
    "markdown_table",
    "print_summary",
    "rich_table",
    "table_rows",
    "write_csv",
    "write_markdown",
]
