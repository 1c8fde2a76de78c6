"""Mean ± std of results across task orders or seeds.

Results are matched across runs by label (method name, plus ``[task-aware]``
for the class-incremental task-aware view) and per-task accuracies by task
name, so runs with different task orders aggregate correctly. The std is the
population std (``ddof=0``, numpy's default) unless ``ddof`` says otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from cl_merge.metrics import METRIC_NAMES
from cl_merge.report.run_folder import RunFolderError, RunRecord

MeanStd = tuple[float | None, float | None]


def mean_std(values: Iterable[float | None], ddof: int = 0) -> MeanStd:
    """(mean, std) over the values that are not None/NaN; (None, None) when there are none."""
    kept = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not kept:
        return None, None
    if len(kept) <= ddof:
        return float(np.mean(kept)), None
    return float(np.mean(kept)), float(np.std(kept, ddof=ddof))


@dataclass
class AggregateRow:
    """One method/baseline over ``n`` runs."""

    label: str
    kind: str
    n: int
    metrics: dict[str, MeanStd] = field(default_factory=dict)
    per_task: dict[str, MeanStd] = field(default_factory=dict)
    curve_mean: list[float] = field(default_factory=list)  # average accuracy after 1, 2, ... tasks
    curve_std: list[float] = field(default_factory=list)


@dataclass
class Aggregate:
    """All rows of one scenario, with the task columns in a stable order."""

    scenario: str
    tasks: list[str]
    num_runs: int
    rows: list[AggregateRow]

    def row(self, label: str) -> AggregateRow:
        for row in self.rows:
            if row.label == label:
                return row
        raise KeyError(label)


def _canonical_tasks(runs: Sequence[RunRecord]) -> list[str]:
    """Task order of the run with the lowest order index; other runs must hold the same set."""
    first = min(runs, key=lambda r: r.order_index)
    tasks = list(first.tasks)
    for run in runs:
        if sorted(run.tasks) != sorted(tasks):
            where = run.folder or run.scenario
            raise RunFolderError(f"{where}: tasks {run.tasks} differ from {tasks} of the other runs")
    return tasks


def aggregate_runs(runs: Sequence[RunRecord], ddof: int = 0, check_fingerprint: bool = True) -> Aggregate:
    """Aggregate runs of one scenario (several orders or seeds) into mean ± std rows."""
    if not runs:
        raise RunFolderError("no runs to aggregate")
    scenarios = sorted({r.scenario for r in runs})
    if len(scenarios) > 1:
        raise RunFolderError(f"runs of different scenarios cannot be aggregated together: {', '.join(scenarios)}")
    if check_fingerprint:
        prints = {r.fingerprint for r in runs if r.fingerprint}
        if len(prints) > 1:
            raise RunFolderError(f"scenario {scenarios[0]!r}: runs have different config fingerprints"
                                 f" {sorted(prints)}; aggregate them separately")
    tasks = _canonical_tasks(runs)
    labels: list[str] = []
    kinds: dict[str, str] = {}
    for run in sorted(runs, key=lambda r: r.order_index):
        for res in run.results:
            if res.label not in kinds:
                labels.append(res.label)
                kinds[res.label] = res.kind
    rows = []
    for label in labels:
        found = [res for run in runs for res in run.results if res.label == label]
        metric_names = list(METRIC_NAMES) + [k for r in found for k in r.metrics
                                             if k not in METRIC_NAMES and isinstance(r.metrics[k], (int, float))]
        metrics = {name: mean_std([_number(r.metrics.get(name)) for r in found], ddof)
                   for name in dict.fromkeys(metric_names)}
        per_task = {t: mean_std([r.per_task.get(t) for r in found], ddof) for t in tasks}
        curves = [r.metrics.get("accuracy_curve") for r in found if r.metrics.get("accuracy_curve")]
        curve_mean, curve_std = [], []
        if curves:
            length = min(len(c) for c in curves)
            stacked = np.asarray([c[:length] for c in curves], dtype=float)
            curve_mean = stacked.mean(axis=0).tolist()
            curve_std = (stacked.std(axis=0, ddof=ddof) if len(curves) > ddof else np.zeros(length)).tolist()
        rows.append(AggregateRow(label=label, kind=kinds[label], n=len(found), metrics=metrics,
                                 per_task=per_task, curve_mean=curve_mean, curve_std=curve_std))
    # methods first, then baselines, each in first-seen order
    rows.sort(key=lambda r: r.kind != "method")
    return Aggregate(scenario=scenarios[0], tasks=tasks, num_runs=len(runs), rows=rows)


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def group_by_scenario(runs: Sequence[RunRecord]) -> dict[str, list[RunRecord]]:
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(run.scenario, []).append(run)
    return groups
