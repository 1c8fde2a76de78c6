"""Run folders -> paper-style tables (the logic behind ``scripts/make_table.py``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from cl_merge.report.aggregate import Aggregate, aggregate_runs, group_by_scenario
from cl_merge.report.run_folder import find_run_folders, read_run_folder

_SAFE = re.compile(r"[^A-Za-z0-9_.+-]+")


def collect(paths: Sequence[str | Path], ddof: int = 0) -> list[Aggregate]:
    """Find run folders under ``paths``, group them by scenario, aggregate over orders/seeds."""
    folders = find_run_folders(paths)
    if not folders:
        from cl_merge.report.run_folder import RunFolderError

        raise RunFolderError(f"no metrics.json found under {', '.join(map(str, paths))}")
    runs = [read_run_folder(f) for f in folders]
    return [aggregate_runs(group, ddof=ddof) for _, group in sorted(group_by_scenario(runs).items())]


def make_tables(paths: Sequence[str | Path], out_dir: str | Path, *, per_task: bool = True, digits: int = 1,
                ddof: int = 0, plots: bool = False) -> list[Path]:
    """Write ``<scenario>.md`` and ``<scenario>.csv`` (and with ``plots`` a
    ``<scenario>_curves.png``) into ``out_dir``; returns the paths written."""
    from cl_merge.report.table import write_csv, write_markdown

    out_dir = Path(out_dir)
    written = []
    for agg in collect(paths, ddof=ddof):
        stem = _SAFE.sub("_", agg.scenario)
        written.append(write_markdown(agg, out_dir / f"{stem}.md", per_task=per_task, digits=digits))
        written.append(write_csv(agg, out_dir / f"{stem}.csv", per_task=per_task))
        if plots and any(len(r.curve_mean) > 1 for r in agg.rows):
            from cl_merge.report.plots import plot_aggregate_curves

            written.append(plot_aggregate_curves(agg, out_dir / f"{stem}_curves.png"))
    return written
