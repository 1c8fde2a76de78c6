"""PNG plots through matplotlib's Agg canvas (no pyplot, no global backend
switch), each written atomically.

* :func:`plot_accuracy_matrix` — annotated heatmap of ``a[t][i]``.
* :func:`plot_accuracy_curves` — average accuracy over the tasks seen vs the
  number of tasks, one line per method/baseline, with a ± std band when the
  curves are means over several orders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from cl_merge.core.io import atomic_path
from cl_merge.metrics import AccuracyMatrix, MetricsInputError


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path


def plot_accuracy_matrix(matrix: AccuracyMatrix | np.ndarray, path: str | Path, *,
                         tasks: Sequence[str] | None = None, stages: Sequence[str] | None = None,
                         title: str | None = None) -> Path:
    """Heatmap of the accuracy matrix (rows: after stage t, columns: task i), cells in percent."""
    if isinstance(matrix, AccuracyMatrix):
        values = matrix.to_numpy()
        tasks = tasks or matrix.tasks
        stages = stages or matrix.stages
    else:
        values = np.asarray(matrix, dtype=float)
    if values.ndim != 2 or values.size == 0:
        raise MetricsInputError(f"plot_accuracy_matrix: expected a non-empty 2-D matrix, got shape {values.shape}")
    num_stages, num_tasks = values.shape
    tasks = list(tasks) if tasks is not None else [f"task {i}" for i in range(num_tasks)]
    stages = list(stages) if stages is not None else [f"stage {t}" for t in range(num_stages)]
    if len(tasks) != num_tasks or len(stages) != num_stages:
        raise MetricsInputError(f"plot_accuracy_matrix: {len(stages)} stage / {len(tasks)} task names"
                                f" for a {num_stages}x{num_tasks} matrix")
    fig = _figure(max(4.0, 0.7 * num_tasks + 2.5), max(3.0, 0.5 * num_stages + 1.8))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(np.ma.masked_invalid(values * 100), vmin=0, vmax=100, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    ax.set_xticks(range(num_tasks), labels=tasks, rotation=45, ha="right")
    ax.set_yticks(range(num_stages), labels=[f"after {s}" for s in stages])
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("stage")
    if num_tasks * num_stages <= 400:  # annotations stay readable up to about 20 x 20
        for t in range(num_stages):
            for i in range(num_tasks):
                if np.isfinite(values[t, i]):
                    value = values[t, i] * 100
                    ax.text(i, t, f"{value:.0f}", ha="center", va="center", fontsize=7,
                            color="black" if value > 60 else "white")
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_accuracy_curves(curves: Mapping[str, Sequence[float]], path: str | Path, *,
                         std: Mapping[str, Sequence[float]] | None = None, title: str | None = None,
                         ylabel: str = "average accuracy over seen tasks (%)") -> Path:
    """Average accuracy vs number of tasks seen, one line per label (fractions in, percent shown)."""
    if not curves:
        raise MetricsInputError("plot_accuracy_curves: no curves to plot")
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    longest = 1
    for label, values in curves.items():
        values = np.asarray(values, dtype=float) * 100
        if values.ndim != 1 or values.size == 0:
            raise MetricsInputError(f"plot_accuracy_curves: curve {label!r} must be a non-empty list")
        x = np.arange(1, values.size + 1)
        longest = max(longest, values.size)
        (line,) = ax.plot(x, values, marker="o", markersize=3, label=label)
        spread = (std or {}).get(label)
        if spread is not None and len(spread):
            spread = np.asarray(spread, dtype=float)[: values.size] * 100
            ax.fill_between(x[: spread.size], values[: spread.size] - spread, values[: spread.size] + spread,
                            color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("number of tasks")
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(1, longest + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_aggregate_curves(aggregate, path: str | Path, title: str | None = None) -> Path:
    """:func:`plot_accuracy_curves` for an :class:`~cl_merge.report.aggregate.Aggregate`
    (rows without a stage history, like zero-shot, are left out)."""
    rows = [r for r in aggregate.rows if len(r.curve_mean) > 1]
    if not rows:
        raise MetricsInputError(f"{aggregate.scenario}: no result has an accuracy curve to plot")
    curves = {r.label: r.curve_mean for r in rows}
    std = {r.label: r.curve_std for r in rows} if aggregate.num_runs > 1 else None
    return plot_accuracy_curves(curves, path, std=std, title=title or aggregate.scenario)
