"""The stage loop, written once for every scenario and every strategy.

For each stage t (one task):
  fine-tune (or load the stage's checkpoint)  ->  task vector τ_t = θ_t − θ0
  -> merge with each strategy (its incremental form where it has one)
  -> evaluate the merged model on every task seen so far (and on the unseen
     ones when forward transfer is asked for).

Every step writes its artifact atomically into the run folder and is skipped
on rerun when the artifact is there, so a killed run resumes where it stopped
and ends with the same numbers as an uninterrupted one.

Artifacts of one order (``<run>/`` or ``<run>/order-XX/``):
  finetune/<chain>/<tt>-<task>/   encoder.safetensors, task_vector.safetensors, metadata.json
  merge/<row>/state-<tt>.safetensors     incremental strategy state after stage tt
  merge/<row>/merged-<tt>.safetensors    merged encoder after stage tt
  eval/<row>/stage-<tt>.json             accuracies after stage tt (+ chosen scaling)
  matrices/<row>.csv, accuracy_matrix.csv, metrics.json, plots/*.png
Chains: ``independent`` (every stage from θ0), ``sequential`` (from the
previous fine-tuned model), ``merged-<row>`` (from the previous merged model).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from cl_merge.core.io import load_state_dict, save_state_dict
from cl_merge.core.task_vector import TaskVector
from cl_merge.errors import ConfigError
from cl_merge.merging import get_method, merge
from cl_merge.merging.base import PerTaskMergeResult
from cl_merge.merging.incremental import IncrementalMerger
from cl_merge.runner.evaluation import TaskPool
from cl_merge.runner.folder import RunFolder

Tensor = torch.Tensor
StepHook = Callable[[str, str], None]


def _noop_hook(kind: str, name: str) -> None:
    return None


@dataclasses.dataclass
class Row:
    """One line of the results: a merging strategy or a baseline."""

    name: str
    kind: str  # "method" | "zero_shot" | "individual" | "sequential_finetune"
    method: str | None = None
    hparams: dict[str, Any] = dataclasses.field(default_factory=dict)
    scaling_grid: list[float] | None = None


def scenario_rows(scenario) -> list[Row]:
    rows = []
    names = set()
    for spec in scenario.methods:
        name = spec.name or spec.method
        rows.append(Row(name, "method", spec.method, dict(spec.hyperparameters), spec.scaling_grid))
        names.add(name)
    base = scenario.baselines
    if base.task_arithmetic and "task_arithmetic" not in {r.method for r in rows}:
        rows.append(Row("task_arithmetic", "method", "task_arithmetic", {}))
    if base.zero_shot:
        rows.append(Row("zero_shot", "zero_shot"))
    if base.individual:
        rows.append(Row("individual", "individual"))
    if base.sequential_finetune:
        rows.append(Row("sequential_finetune", "sequential_finetune"))
    return rows


def _tag(t: int, task: str) -> str:
    return f"{t:02d}-{task}"


class OrderRun:
    """Runs one order of a scenario's stages inside one run folder."""

    def __init__(self, scenario, stages: Sequence, folder: RunFolder, pool: TaskPool, *,
                 finetuner, hook: StepHook = _noop_hook, progress: bool = True, log=None):
        self.scenario = scenario
        self.stages = list(stages)
        self.folder = folder
        self.pool = pool
        self.finetuner = finetuner
        self.hook = hook
        self.progress = progress
        self.log = log or (lambda msg: None)
        self.rows = scenario_rows(scenario)
        self.task_names = [s.name for s in self.stages]
        self.setting = scenario.setting
        self.theta0 = pool.theta0
        self.eval_every_stage = scenario.setting != "multi_task"

    # ------------------------------------------------------------ fine-tuning
    def _method_chain(self, row: Row) -> str:
        init = self.scenario.init
        if init == "pretrained" or self.setting == "multi_task":
            return "independent"
        if init == "previous_finetuned":
            return "sequential"
        return f"merged-{row.name}"

    def _chains(self) -> list[str]:
        chains = {self._method_chain(r) for r in self.rows if r.kind == "method"}
        if any(r.kind == "individual" for r in self.rows):
            chains.add("independent")
        if any(r.kind == "sequential_finetune" for r in self.rows):
            chains.add("sequential")
        return sorted(chains)

    def _finetuned(self, chain: str, t: int) -> tuple[dict[str, Tensor], Path]:
        """The fine-tuned encoder of stage ``t`` in ``chain``, training it if needed."""
        stage = self.stages[t]
        out_dir = self.folder.path("finetune", chain, _tag(t, stage.name))
        if chain == "independent" or t == 0:
            init = self.theta0
        elif chain == "sequential":
            init = self._finetuned(chain, t - 1)[0]
        else:
            init = self._merged_weights(chain[len("merged-"):], t - 1)
        self.hook("finetune", f"{chain}/{_tag(t, stage.name)}")
        encoder_path = self.finetuner(stage=stage, stage_index=t, init_state=init, out_dir=out_dir,
                                      chain=chain)
        self.hook("task_vector", f"{chain}/{_tag(t, stage.name)}")
        return load_state_dict(encoder_path), out_dir / "task_vector.safetensors"

    def _task_vector(self, chain: str, t: int) -> TaskVector:
        _, tv_path = self._finetuned(chain, t)
        return TaskVector.load(tv_path)

    # ------------------------------------------------------------ merging
    def _row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    def _merged_path(self, row_name: str, t: int) -> Path:
        return self.folder.path("merge", row_name, f"merged-{t:02d}.safetensors")

    def _merged_weights(self, row_name: str, t: int) -> dict[str, Tensor]:
        path = self._merged_path(row_name, t)
        if not path.exists():
            self._merge_stage(self._row(row_name), t)
        return load_state_dict(path)

    def _strategy_hparams(self, row: Row, scaling: float | None) -> dict[str, Any]:
        hp = dict(row.hparams)
        if scaling is not None:
            hp["scaling"] = scaling
        return hp

    def _merge_stage(self, row: Row, t: int):
        """Merged model of ``row`` after stage ``t``: the weights (shared part)
        are saved; returns the merge result (a dict or PerTaskMergeResult)."""
        chain = self._method_chain(row)
        seen = list(range(t + 1))
        # the multi-task setting merges once, after the last stage
        candidates = row.scaling_grid if row.scaling_grid else [None]
        if get_method(row.method, **row.hparams).supports_incremental() and self.setting != "multi_task":
            merger = self._incremental_state(row, chain, t)
            results = {s: _current_with(merger, row, self._strategy_hparams(row, s)) for s in candidates}
        else:
            vectors = [self._task_vector(chain, i) for i in seen]
            results = {}
            for s in candidates:
                finetuned = [v.apply_to(self.theta0) for v in vectors]
                results[s] = merge(self.theta0, finetuned, row.method, **self._strategy_hparams(row, s))
        if len(candidates) > 1:
            if self.folder.has("merge", row.name, f"chosen-{t:02d}.json"):
                best = self.folder.read_json("merge", row.name, f"chosen-{t:02d}.json")["scaling"]
            else:
                scores = {s: self._mean_accuracy(results[s], seen, split="val") for s in candidates}
                best = max(candidates, key=lambda s: (scores[s], -abs(s)))
                self.folder.write_json({"scaling": best, "validation_accuracy": {str(k): v for k, v in scores.items()}},
                                       "merge", row.name, f"chosen-{t:02d}.json")
        else:
            best = candidates[0]
        result = results[best]
        shared = result.shared if isinstance(result, PerTaskMergeResult) else result
        self.hook("merge", f"{row.name}/{t:02d}")
        save_state_dict(shared, self._merged_path(row.name, t),
                        {"cl_merge_kind": "merged_encoder", "row": row.name, "stage": str(t)})
        return result, best

    def _incremental_state(self, row: Row, chain: str, t: int) -> IncrementalMerger:
        method = get_method(row.method, **row.hparams)
        merger = IncrementalMerger(method, self.theta0)
        state_path = self.folder.path("merge", row.name, f"state-{t:02d}.safetensors")
        if state_path.exists():
            merger.load_state_dict(load_state_dict(state_path))
            return merger
        if t > 0:
            merger.load_state_dict(self._incremental_state(row, chain, t - 1).state_dict())
        merger.update(self._task_vector(chain, t))
        save_state_dict(merger.state_dict(), state_path, {"cl_merge_kind": "merge_state", "row": row.name})
        return merger

    # ------------------------------------------------------------ evaluation
    def _eval_tasks(self, t: int) -> list[int]:
        last = len(self.stages) - 1
        if self.scenario.eval.forward_transfer:
            return list(range(len(self.stages)))
        return list(range(t + 1)) if t < last else list(range(len(self.stages)))

    def _accuracies(self, weights, tasks: Sequence[int], seen_upto: int, split: str = "test") -> dict[str, float]:
        out = {}
        for i in tasks:
            if isinstance(weights, PerTaskMergeResult):
                encoder = weights.task_state_dict(min(i, weights.num_tasks - 1))
            else:
                encoder = weights
            out.update(self.pool.accuracy(encoder, self.stages, i, seen_upto, split=split))
        return out

    def _mean_accuracy(self, weights, tasks, split):
        accs = self._accuracies(weights, tasks, seen_upto=max(tasks), split=split)
        main = [v for k, v in accs.items() if "/" not in k]
        return sum(main) / len(main)

    def head_chain(self) -> str:
        """Whose trained heads a family with trainable heads (timm ViT) uses."""
        return "independent" if "independent" in self._chains() else self._chains()[0]

    def _eval_row(self, row: Row, t: int) -> dict[str, Any]:
        rel = ("eval", row.name, f"stage-{t:02d}.json")
        if self.folder.has(*rel):
            return self.folder.read_json(*rel)
        tasks = self._eval_tasks(t)
        record: dict[str, Any] = {"stage": t, "task": self.task_names[t]}
        if row.kind == "method":
            result, scaling = self._merge_stage(row, t)
            record["scaling"] = scaling
            weights = result
        elif row.kind == "zero_shot":
            if t > 0 and set(tasks) <= set(range(len(self.stages))) and self.scenario.setting != "class_incremental":
                # θ0 does not change: evaluated once, on every task, at stage 0
                first = self._eval_row(row, 0)
                if all(self.task_names[i] in first["accuracy"] for i in tasks):
                    record["accuracy"] = {self.task_names[i]: first["accuracy"][self.task_names[i]] for i in tasks}
                    self.folder.write_json(record, *rel)
                    return record
            weights = self.theta0
            tasks = list(range(len(self.stages))) if t == 0 and self.setting != "class_incremental" else tasks
        elif row.kind == "sequential_finetune":
            weights = self._finetuned("sequential", t)[0]
        elif row.kind == "individual":
            # task t's own fine-tuned model on task t (the upper bound); earlier
            # tasks keep their value, filled in by ``accuracy_rows``
            own = [t] if self.eval_every_stage else list(range(len(self.stages)))
            record["accuracy"] = {}
            for i in own:
                record["accuracy"].update(self._accuracies(self._finetuned("independent", i)[0], [i], seen_upto=t))
            self.hook("evaluate", f"{row.name}/{t:02d}")
            self.folder.write_json(record, *rel)
            return record
        else:
            raise ConfigError(f"unknown row kind {row.kind!r}")
        record["accuracy"] = self._accuracies(weights, tasks, seen_upto=t)
        self.hook("evaluate", f"{row.name}/{t:02d}")
        self.folder.write_json(record, *rel)
        return record

    # ------------------------------------------------------------ driver
    def run(self) -> dict[str, dict[int, dict[str, Any]]]:
        """All steps of all stages; returns {row: {stage: record}}."""
        records: dict[str, dict[int, dict[str, Any]]] = {r.name: {} for r in self.rows}
        stage_range = range(len(self.stages))
        stage_iter = stage_range
        if self.progress:
            from tqdm.auto import tqdm

            stage_iter = tqdm(stage_range, desc="stages", unit="stage", leave=True)
        for t in stage_iter:
            stage = self.stages[t]
            self.log(f"stage {t + 1}/{len(self.stages)}: {stage.name}")
            for chain in self._chains():
                if not chain.startswith("merged-"):
                    self._finetuned(chain, t)
            if not self.eval_every_stage and t < len(self.stages) - 1:
                continue
            for row in self.rows:
                if row.kind == "method" and self._method_chain(row).startswith("merged-"):
                    self._finetuned(self._method_chain(row), t)
                records[row.name][t] = self._eval_row(row, t)
        return records


def _current_with(merger: IncrementalMerger, row: Row, hparams: Mapping[str, Any]):
    """The merger's current weights under (possibly) other hyperparameters:
    the incremental state does not depend on the final scaling, so a scaling
    grid is evaluated from one state."""
    original = merger.method
    merger.method = get_method(row.method, **hparams)
    try:
        return merger.current()
    finally:
        merger.method = original


def accuracy_rows(records: Mapping[str, Mapping[int, Mapping[str, Any]]], task_names: Sequence[str],
                  suffix: str = "") -> dict[str, list[list[float]]]:
    """{row: matrix} with matrix[t][i] the accuracy on task i after stage t
    (NaN where not evaluated). ``suffix`` picks the task-aware entries
    (``"/task_aware"``) of class-incremental runs."""
    out = {}
    for row, by_stage in records.items():
        stages = sorted(by_stage)
        if not stages:
            continue
        matrix = [[math.nan] * len(task_names) for _ in range(max(stages) + 1)]
        for t in stages:
            acc = by_stage[t]["accuracy"]
            for i, name in enumerate(task_names):
                key = name + suffix
                if key in acc:
                    matrix[t][i] = acc[key]
        if row == "individual":  # a task's own model does not change after its stage
            for t in range(len(matrix)):
                for i in range(t):
                    if math.isnan(matrix[t][i]):
                        matrix[t][i] = matrix[i][i]
        out[row] = matrix
    return out
