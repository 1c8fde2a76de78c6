"""Continual-learning metrics computed from an accuracy matrix.

``a[t][i]`` is the accuracy on task ``i`` after stage ``t`` (0-based here; the
papers count from 1). ``T`` stages, ``N >= T`` task columns. Task ``i`` is first
seen at stage ``i`` by default; pass ``tasks_seen`` (cumulative number of tasks
seen after each stage) when a stage brings several tasks, e.g. ``[N]`` for a
multi-task merge done in one stage. Entries for tasks not seen yet may be NaN,
or hold accuracies measured before training on them (forward transfer).

Units are whatever the matrix holds (fractions or percent); only
:func:`normalized_accuracy` is unitless. Metrics that need two stages
(forgetting, BWT, FWT) return ``None`` when ``T == 1``.

Where public implementations differ from the papers' definitions used here:

* Avalanche reports BWT as ``-forgetting`` where forgetting is measured against
  the accuracy right after training on each task (``a[i][i]``), not the maximum.
* FusionBench divides BWT by the number of tasks passed in (``T``), not ``T - 1``.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from cl_merge.core.io import atomic_write_text
from cl_merge.errors import ClMergeError, UnknownNameError, close_matches


class MetricsInputError(ClMergeError, ValueError):
    """An accuracy matrix (or reference vector) with the wrong shape or missing entries."""


# ----------------------------------------------------------------- validation
def _as_matrix(matrix) -> np.ndarray:
    if isinstance(matrix, AccuracyMatrix):
        matrix = matrix.to_numpy()
    try:
        arr = np.asarray(matrix, dtype=float)
    except (TypeError, ValueError):
        raise MetricsInputError("accuracy matrix: rows have different lengths or non-numeric entries") from None
    if arr.size == 0:
        raise MetricsInputError(f"accuracy matrix: empty (shape {arr.shape})")
    if arr.ndim == 1:
        raise MetricsInputError(
            f"accuracy matrix: expected 2-D (stages x tasks), got 1-D of length {arr.shape[0]}"
            " (wrap a single stage as [[...]])"
        )
    if arr.ndim != 2:
        raise MetricsInputError(f"accuracy matrix: expected 2-D (stages x tasks), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise MetricsInputError(f"accuracy matrix: empty (shape {arr.shape})")
    return arr


def _seen_counts(arr: np.ndarray, tasks_seen: Sequence[int] | None) -> list[int]:
    """Cumulative number of tasks seen after each stage, checked against the matrix."""
    num_stages, num_tasks = arr.shape
    if tasks_seen is None:
        if num_tasks < num_stages:
            raise MetricsInputError(
                f"accuracy matrix: {num_stages} stages but only {num_tasks} task columns;"
                " each stage introduces one task, so columns must be >= stages (or pass tasks_seen)"
            )
        seen = list(range(1, num_stages + 1))
    else:
        seen = [int(n) for n in tasks_seen]
        if len(seen) != num_stages:
            raise MetricsInputError(f"tasks_seen: {len(seen)} entries for {num_stages} stages")
        if any(n < 1 for n in seen) or any(b < a for a, b in zip(seen, seen[1:])):
            raise MetricsInputError(f"tasks_seen: must be positive and non-decreasing, got {seen}")
        if seen[-1] > num_tasks:
            raise MetricsInputError(f"tasks_seen: {seen[-1]} tasks seen but the matrix has {num_tasks} columns")
    for t, n in enumerate(seen):
        row = arr[t, :n]
        if not np.all(np.isfinite(row)):
            bad = int(np.flatnonzero(~np.isfinite(row))[0])
            raise MetricsInputError(f"accuracy matrix: entry [stage {t}][task {bad}] of a seen task is missing (NaN)")
    return seen


def _first_seen(seen: list[int]) -> list[int]:
    """Stage at which each task (column < seen[-1]) is first trained on."""
    first = []
    for t, n in enumerate(seen):
        first.extend([t] * (n - len(first)))
    return first


def _reference_vector(reference, num_tasks: int, name: str) -> np.ndarray:
    ref = np.asarray(reference, dtype=float)
    if ref.ndim != 1 or ref.shape[0] < num_tasks:
        raise MetricsInputError(f"{name}: expected one value per task ({num_tasks}), got shape {ref.shape}")
    return ref


# ----------------------------------------------------------------- metrics
def final_average_accuracy(matrix, tasks_seen: Sequence[int] | None = None) -> float:
    """``A_T = (1/T) Σ_i a[T][i]`` over the tasks seen at the last stage."""
    arr = _as_matrix(matrix)
    seen = _seen_counts(arr, tasks_seen)
    return float(np.mean(arr[-1, : seen[-1]]))


def average_accuracy_curve(matrix, tasks_seen: Sequence[int] | None = None) -> list[float]:
    """``[A_1, ..., A_T]``: after each stage, the mean accuracy over the tasks seen so far."""
    arr = _as_matrix(matrix)
    seen = _seen_counts(arr, tasks_seen)
    return [float(np.mean(arr[t, :n])) for t, n in enumerate(seen)]


def average_incremental_accuracy(matrix, tasks_seen: Sequence[int] | None = None) -> float:
    """``(1/T) Σ_t A_t``, with ``A_t`` the mean accuracy over the tasks seen at stage ``t``."""
    return float(np.mean(average_accuracy_curve(matrix, tasks_seen)))


def forgetting(matrix, tasks_seen: Sequence[int] | None = None) -> float | None:
    """Average forgetting (Chaudhry et al., 2018):
    ``(1/(T-1)) Σ_{i<T} (max_{t<T} a[t][i] - a[T][i])``.

    The max runs over the stages at which task ``i`` had been seen (entries
    measured before training on it are forward transfer, not knowledge to
    forget). The average is over the tasks seen before the last stage
    (``T - 1`` of them when each stage brings one task). ``None`` when no task
    was seen before the last stage (``T == 1``). Avalanche's forgetting uses
    ``a[i][i]`` in place of the max.
    """
    arr = _as_matrix(matrix)
    seen = _seen_counts(arr, tasks_seen)
    last = len(seen) - 1
    first = _first_seen(seen)
    drops = [
        float(np.max(arr[first[i] : last, i]) - arr[last, i]) for i in range(seen[-1]) if first[i] < last
    ]
    return float(np.mean(drops)) if drops else None


def backward_transfer(matrix, tasks_seen: Sequence[int] | None = None) -> float | None:
    """Backward transfer (GEM, Lopez-Paz & Ranzato, 2017):
    ``(1/(T-1)) Σ_{i<T} (a[T][i] - a[i][i])``.

    Negative values are forgetting. ``None`` when ``T == 1``. FusionBench
    divides the same sum by ``T``; Avalanche reports ``-forgetting`` measured
    from ``a[i][i]`` (the same quantity as here, averaged the same way).
    """
    arr = _as_matrix(matrix)
    seen = _seen_counts(arr, tasks_seen)
    last = len(seen) - 1
    first = _first_seen(seen)
    diffs = [float(arr[last, i] - arr[first[i], i]) for i in range(seen[-1]) if first[i] < last]
    return float(np.mean(diffs)) if diffs else None


def forward_transfer(matrix, reference, tasks_seen: Sequence[int] | None = None) -> float | None:
    """Forward transfer (GEM): ``(1/(T-1)) Σ_{i>=2} (a[i-1][i] - b_i)``.

    ``a[i-1][i]`` is the accuracy on task ``i`` one stage before training on
    it, and ``b_i`` the reference accuracy of the starting model (for CLIP the
    zero-shot accuracy). ``None`` when ``T == 1``, when no reference is given,
    or when the matrix lacks the entries above its diagonal (forward-transfer
    evaluation switched off).
    """
    arr = _as_matrix(matrix)
    seen = _seen_counts(arr, tasks_seen)
    if reference is None:
        return None
    ref = _reference_vector(reference, seen[-1], "reference")
    first = _first_seen(seen)
    gains = []
    for i in range(seen[-1]):
        if first[i] == 0:
            continue
        before = arr[first[i] - 1, i]
        if not np.isfinite(before):
            return None
        gains.append(float(before - ref[i]))
    return float(np.mean(gains)) if gains else None


def normalized_accuracy(matrix, individual, tasks_seen: Sequence[int] | None = None) -> float:
    """``(1/T) Σ_i a[T][i] / individual_i``: final accuracy relative to the
    model fine-tuned on that task alone (1.0 = no loss from merging)."""
    arr = _as_matrix(matrix)
    seen = _seen_counts(arr, tasks_seen)
    ind = _reference_vector(individual, seen[-1], "individual")[: seen[-1]]
    if np.any(~np.isfinite(ind)) or np.any(ind <= 0):
        raise MetricsInputError("individual: accuracies must be finite and > 0 to normalise by them")
    return float(np.mean(arr[-1, : seen[-1]] / ind))


METRIC_NAMES = (
    "final_accuracy",
    "average_incremental_accuracy",
    "forgetting",
    "backward_transfer",
    "forward_transfer",
    "normalized_accuracy",
)


def summarize(
    matrix,
    reference=None,
    individual=None,
    tasks_seen: Sequence[int] | None = None,
) -> dict[str, float | None]:
    """All metrics in one dict (keys :data:`METRIC_NAMES`, plus ``num_stages``
    and ``accuracy_curve``). Metrics that cannot be computed are ``None``."""
    arr = _as_matrix(matrix)
    seen = _seen_counts(arr, tasks_seen)
    return {
        "final_accuracy": final_average_accuracy(arr, seen),
        "average_incremental_accuracy": average_incremental_accuracy(arr, seen),
        "forgetting": forgetting(arr, seen),
        "backward_transfer": backward_transfer(arr, seen),
        "forward_transfer": forward_transfer(arr, reference, seen),
        "normalized_accuracy": None if individual is None else normalized_accuracy(arr, individual, seen),
        "num_stages": arr.shape[0],
        "accuracy_curve": average_accuracy_curve(arr, seen),
    }


# ----------------------------------------------------------------- accuracy matrix file
class AccuracyMatrix:
    """A stages x tasks table filled stage by stage, saved as ``accuracy_matrix.csv``.

    CSV layout: header ``stage,<task_0>,...,<task_{N-1}>``; then one row per
    stage whose first cell is the stage name (the task trained at that stage)
    and whose cells are accuracies, empty where not evaluated.
    """

    STAGE_COLUMN = "stage"

    def __init__(self, tasks: Sequence[str], stages: Sequence[str] | None = None):
        self.tasks = [str(t) for t in tasks]
        if not self.tasks:
            raise MetricsInputError("AccuracyMatrix: no tasks")
        if len(set(self.tasks)) != len(self.tasks):
            dup = next(t for t in self.tasks if self.tasks.count(t) > 1)
            raise MetricsInputError(f"AccuracyMatrix: duplicate task name {dup!r}")
        self.stages = [str(s) for s in (stages if stages is not None else self.tasks)]
        self._values = np.full((len(self.stages), len(self.tasks)), np.nan)

    @property
    def shape(self) -> tuple[int, int]:
        return self._values.shape

    def _task_index(self, task: int | str) -> int:
        if isinstance(task, (int, np.integer)) and not isinstance(task, bool):
            if not 0 <= task < len(self.tasks):
                raise MetricsInputError(f"AccuracyMatrix: task index {task} out of range 0..{len(self.tasks) - 1}")
            return int(task)
        if task not in self.tasks:
            raise UnknownNameError(f"AccuracyMatrix: unknown task {task!r}{close_matches(task, self.tasks)}")
        return self.tasks.index(task)

    def _stage_index(self, stage: int | str) -> int:
        if isinstance(stage, (int, np.integer)) and not isinstance(stage, bool):
            if not 0 <= stage < len(self.stages):
                raise MetricsInputError(
                    f"AccuracyMatrix: stage index {stage} out of range 0..{len(self.stages) - 1}"
                )
            return int(stage)
        if stage not in self.stages:
            raise UnknownNameError(f"AccuracyMatrix: unknown stage {stage!r}{close_matches(stage, self.stages)}")
        return self.stages.index(stage)

    def set(self, stage: int | str, task: int | str, acc: float) -> None:
        value = float(acc)
        if not math.isfinite(value):
            raise MetricsInputError(f"AccuracyMatrix: accuracy for stage {stage!r}, task {task!r} is {value}")
        self._values[self._stage_index(stage), self._task_index(task)] = value

    def get(self, stage: int | str, task: int | str) -> float:
        return float(self._values[self._stage_index(stage), self._task_index(task)])

    def to_numpy(self) -> np.ndarray:
        return self._values.copy()

    def to_csv_text(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow([self.STAGE_COLUMN, *self.tasks])
        for name, row in zip(self.stages, self._values):
            writer.writerow([name, *("" if np.isnan(v) else repr(float(v)) for v in row)])
        return buf.getvalue()

    def to_csv(self, path: str | Path) -> Path:
        """Write atomically; returns the path."""
        atomic_write_text(path, self.to_csv_text())
        return Path(path)

    @classmethod
    def from_numpy(cls, values, tasks: Sequence[str], stages: Sequence[str] | None = None) -> "AccuracyMatrix":
        arr = _as_matrix(values)
        out = cls(tasks, stages if stages is not None else list(tasks)[: arr.shape[0]])
        if arr.shape != out.shape:
            raise MetricsInputError(f"AccuracyMatrix: values of shape {arr.shape} for {out.shape} stages x tasks")
        out._values = arr.copy()
        return out

    @classmethod
    def from_csv(cls, path: str | Path) -> "AccuracyMatrix":
        path = Path(path)
        if not path.exists():
            raise MetricsInputError(f"{path}: accuracy matrix file not found")
        rows = list(csv.reader(io.StringIO(path.read_text())))
        if not rows or not rows[0] or rows[0][0] != cls.STAGE_COLUMN:
            raise MetricsInputError(f"{path}: header must start with {cls.STAGE_COLUMN!r} followed by task names")
        tasks = rows[0][1:]
        body = [r for r in rows[1:] if r]
        if not body:
            raise MetricsInputError(f"{path}: no stage rows")
        values = np.full((len(body), len(tasks)), np.nan)
        for r, row in enumerate(body):
            if len(row) != len(tasks) + 1:
                raise MetricsInputError(f"{path}: line {r + 2} has {len(row) - 1} values for {len(tasks)} tasks")
            for c, cell in enumerate(row[1:]):
                if cell.strip():
                    try:
                        values[r, c] = float(cell)
                    except ValueError:
                        raise MetricsInputError(f"{path}: line {r + 2}, task {tasks[c]!r}: not a number: {cell!r}") from None
        try:
            return cls.from_numpy(values, tasks, [row[0] for row in body])
        except MetricsInputError as exc:
            raise MetricsInputError(f"{path}: {exc}") from None

    def summarize(self, reference: Mapping[str, float] | Sequence[float] | None = None,
                  individual: Mapping[str, float] | Sequence[float] | None = None,
                  tasks_seen: Sequence[int] | None = None) -> dict:
        """:func:`summarize` with references given per task name (dict) or in column order."""
        return summarize(self._values, self._by_task(reference, "reference"),
                         self._by_task(individual, "individual"), tasks_seen)

    def _by_task(self, values, name: str):
        if values is None or not isinstance(values, Mapping):
            return values
        missing = [t for t in self.tasks if t not in values]
        if missing:
            raise MetricsInputError(f"{name}: no value for task {missing[0]!r}")
        return [float(values[t]) for t in self.tasks]

    def __repr__(self) -> str:
        return f"AccuracyMatrix(stages={len(self.stages)}, tasks={self.tasks})"
