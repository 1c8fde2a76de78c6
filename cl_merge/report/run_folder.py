"""The run-folder result format: ``metrics.json`` plus ``accuracy_matrix*.csv``.

One run folder holds one order (or seed) of one scenario, with any number of
methods and baselines; ``docs/run_folder.md`` documents the files. Accuracies
are fractions in [0, 1]; tables show them in percent.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from cl_merge.core.io import atomic_write_json, read_json
from cl_merge.errors import ClMergeError
from cl_merge.metrics import AccuracyMatrix, summarize

FORMAT = "cl_merge.run/1"
METRICS_FILE = "metrics.json"
MATRIX_FILE = "accuracy_matrix.csv"
_SAFE = re.compile(r"[^A-Za-z0-9_.+-]+")


class RunFolderError(ClMergeError, ValueError):
    """A run folder whose metrics.json or accuracy matrix is missing or malformed."""


def _check_accuracy(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RunFolderError(f"{where}: accuracy must be a finite number, got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise RunFolderError(f"{where}: accuracy {value!r} outside [0, 1] (store fractions, not percent)")
    return float(value)


@dataclass
class ResultRecord:
    """One method or baseline evaluated in one run.

    ``accuracy_type`` separates the two class-incremental views of the same
    model: ``"task_agnostic"`` (union head over all classes seen) and
    ``"task_aware"`` (each task's own classes); None elsewhere.
    """

    name: str
    kind: Literal["method", "baseline"] = "method"
    method: str | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    per_task: dict[str, float] = field(default_factory=dict)  # accuracy on each task after the last stage
    metrics: dict[str, Any] = field(default_factory=dict)
    matrix: AccuracyMatrix | None = None
    accuracy_type: Literal["task_agnostic", "task_aware"] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("method", "baseline"):
            raise RunFolderError(f"result {self.name!r}: kind must be 'method' or 'baseline', got {self.kind!r}")
        self.per_task = {str(k): _check_accuracy(v, f"result {self.name!r}: per_task.{k}")
                         for k, v in self.per_task.items()}

    @property
    def label(self) -> str:
        """Row label in tables and plots."""
        label = self.name if self.accuracy_type in (None, "task_agnostic") else f"{self.name} [task-aware]"
        # calibrated on unlabeled test inputs: not comparable with inductive rows
        return f"{label} [transductive]" if self.metrics.get("transductive") else label

    @classmethod
    def from_matrix(cls, name: str, matrix: AccuracyMatrix, *, kind: str = "method", method: str | None = None,
                    hyperparameters: Mapping[str, Any] | None = None, reference: Mapping[str, float] | None = None,
                    individual: Mapping[str, float] | None = None, tasks_seen: Sequence[int] | None = None,
                    accuracy_type: str | None = None) -> "ResultRecord":
        """Summarise ``matrix`` (zero-shot ``reference`` -> FWT, ``individual`` -> normalized accuracy)."""
        arr = matrix.to_numpy()
        seen = tasks_seen[-1] if tasks_seen else arr.shape[0]
        reference = _restrict(reference, matrix.tasks)
        individual = _restrict(individual, matrix.tasks[:seen])
        metrics = matrix.summarize(reference=reference, individual=individual, tasks_seen=tasks_seen)
        per_task = {task: float(arr[-1, i]) for i, task in enumerate(matrix.tasks[:seen])}
        return cls(name=name, kind=kind, method=method, hyperparameters=dict(hyperparameters or {}),
                   per_task=per_task, metrics=metrics, matrix=matrix, accuracy_type=accuracy_type)

    @classmethod
    def from_per_task(cls, name: str, per_task: Mapping[str, float], *, kind: str = "baseline",
                      method: str | None = None, hyperparameters: Mapping[str, Any] | None = None,
                      individual: Mapping[str, float] | None = None,
                      accuracy_type: str | None = None) -> "ResultRecord":
        """A result with no stage history (zero-shot, individual, a one-shot merge)."""
        tasks = list(per_task)
        matrix = AccuracyMatrix(tasks, stages=["final"])
        for task, acc in per_task.items():
            matrix.set(0, task, acc)
        metrics = summarize(matrix.to_numpy(), None, _restrict(individual, tasks), tasks_seen=[len(tasks)])
        metrics = {k: metrics[k] for k in ("final_accuracy", "normalized_accuracy")}
        return cls(name=name, kind=kind, method=method, hyperparameters=dict(hyperparameters or {}),
                   per_task=dict(per_task), metrics=metrics, matrix=None, accuracy_type=accuracy_type)


def _restrict(values: Mapping[str, float] | None, tasks: Sequence[str]) -> list[float] | None:
    """Values for ``tasks`` in column order; None unless every task has one."""
    if values is None or any(t not in values for t in tasks):
        return None
    return [float(values[t]) for t in tasks]


@dataclass
class RunRecord:
    """Everything one run folder reports."""

    scenario: str
    tasks: list[str]  # stage order of this run
    results: list[ResultRecord] = field(default_factory=list)
    order_index: int = 0
    fingerprint: str | None = None
    setting: str | None = None
    seed: int | None = None
    folder: Path | None = None

    def result(self, label: str) -> ResultRecord:
        for res in self.results:
            if res.label == label or res.name == label:
                return res
        from cl_merge.errors import UnknownNameError, close_matches

        labels = [r.label for r in self.results]
        raise UnknownNameError(f"run {self.scenario!r}: no result {label!r}{close_matches(label, labels)}")


# ----------------------------------------------------------------- writing
def _matrix_filename(res: ResultRecord, single: bool) -> str:
    if single:
        return MATRIX_FILE
    suffix = _SAFE.sub("_", res.name) + ("" if res.accuracy_type in (None, "task_agnostic") else f".{res.accuracy_type}")
    return f"accuracy_matrix.{suffix}.csv"


def write_run_folder(folder: str | Path, run: RunRecord) -> Path:
    """Write each result's accuracy matrix and ``metrics.json`` (all atomic); returns the metrics path."""
    folder = Path(folder)
    labels = [r.label for r in run.results]
    dup = next((x for x in labels if labels.count(x) > 1), None)
    if dup is not None:
        raise RunFolderError(f"{folder}: two results labelled {dup!r}")
    with_matrix = [r for r in run.results if r.matrix is not None]
    entries = []
    for res in run.results:
        entry = {
            "name": res.name,
            "kind": res.kind,
            "method": res.method,
            "hyperparameters": res.hyperparameters,
            "accuracy_type": res.accuracy_type,
            "metrics": res.metrics,
            "per_task": res.per_task,
            "accuracy_matrix": None,
        }
        if res.matrix is not None:
            name = _matrix_filename(res, single=len(with_matrix) == 1)
            res.matrix.to_csv(folder / name)
            entry["accuracy_matrix"] = name
        entries.append(entry)
    body = {
        "format": FORMAT,
        "scenario": run.scenario,
        "fingerprint": run.fingerprint,
        "setting": run.setting,
        "order_index": run.order_index,
        "seed": run.seed,
        "tasks": list(run.tasks),
        "results": entries,
    }
    path = folder / METRICS_FILE
    atomic_write_json(path, body)
    return path


# ----------------------------------------------------------------- reading
def _result_from_entry(entry: Mapping[str, Any], folder: Path, where: str, default_kind: str) -> ResultRecord:
    if not isinstance(entry, Mapping) or "name" not in entry and "method" not in entry:
        raise RunFolderError(f"{where}: each result needs a 'name' (or 'method')")
    name = str(entry.get("name") or entry.get("method"))
    matrix = None
    matrix_file = entry.get("accuracy_matrix")
    if matrix_file:
        matrix_path = folder / str(matrix_file)
        try:
            matrix = AccuracyMatrix.from_csv(matrix_path)
        except ClMergeError as exc:
            raise RunFolderError(f"{where}: {exc}") from None
    try:
        return ResultRecord(
            name=name,
            kind=entry.get("kind", default_kind),
            method=entry.get("method"),
            hyperparameters=dict(entry.get("hyperparameters") or {}),
            per_task=dict(entry.get("per_task") or {}),
            metrics=dict(entry.get("metrics") or {}),
            matrix=matrix,
            accuracy_type=entry.get("accuracy_type"),
        )
    except RunFolderError as exc:
        raise RunFolderError(f"{where}: {exc}") from None


def read_run_folder(folder: str | Path) -> RunRecord:
    """Read ``metrics.json`` (the ``results`` list form, or the single-method
    form with ``method``/``metrics``/``per_task``/``baselines``)."""
    folder = Path(folder)
    path = folder / METRICS_FILE if folder.is_dir() else folder
    folder = path.parent
    if not path.is_file():
        raise RunFolderError(f"{path}: no metrics.json")
    try:
        body = read_json(path)
    except (ValueError, OSError) as exc:
        raise RunFolderError(f"{path}: unreadable JSON ({exc})") from None
    if not isinstance(body, Mapping):
        raise RunFolderError(f"{path}: top level must be an object")
    for key in ("scenario", "tasks"):
        if key not in body:
            raise RunFolderError(f"{path}: missing field {key!r}")
    if not isinstance(body["tasks"], list) or not body["tasks"]:
        raise RunFolderError(f"{path}: 'tasks' must be a non-empty list of task names")
    where = str(path)
    results: list[ResultRecord] = []
    if "results" in body:
        if not isinstance(body["results"], list):
            raise RunFolderError(f"{path}: 'results' must be a list")
        results = [_result_from_entry(e, folder, f"{where}: results[{i}]", "method")
                   for i, e in enumerate(body["results"])]
    else:  # single-method form
        if "method" not in body:
            raise RunFolderError(f"{path}: needs 'results' (a list) or 'method'")
        entry = {"name": body["method"], "method": body["method"], "metrics": body.get("metrics"),
                 "per_task": body.get("per_task"), "hyperparameters": body.get("hyperparameters"),
                 "accuracy_matrix": body.get("accuracy_matrix", MATRIX_FILE if (folder / MATRIX_FILE).exists() else None)}
        results.append(_result_from_entry(entry, folder, where, "method"))
        baselines = body.get("baselines") or {}
        if not isinstance(baselines, Mapping):
            raise RunFolderError(f"{path}: 'baselines' must map a name to its result")
        for name, item in baselines.items():
            item = dict(item or {})
            item.setdefault("name", name)
            results.append(_result_from_entry(item, folder, f"{where}: baselines.{name}", "baseline"))
    order_index = body.get("order_index", 0)
    if isinstance(order_index, bool) or not isinstance(order_index, int):
        raise RunFolderError(f"{path}: order_index must be an integer, got {order_index!r}")
    return RunRecord(scenario=str(body["scenario"]), tasks=[str(t) for t in body["tasks"]], results=results,
                     order_index=order_index, fingerprint=body.get("fingerprint"),
                     setting=body.get("setting"), seed=body.get("seed"), folder=folder)


def find_run_folders(paths: Sequence[str | Path]) -> list[Path]:
    """Folders holding a ``metrics.json`` under each of ``paths`` (searched recursively), sorted."""
    found: set[Path] = set()
    for root in map(Path, paths):
        if root.is_file() and root.name == METRICS_FILE:
            found.add(root.parent)
        elif root.is_dir():
            found.update(p.parent for p in root.rglob(METRICS_FILE))
        else:
            raise RunFolderError(f"{root}: not a run folder or a folder of run folders")
    return sorted(found)
