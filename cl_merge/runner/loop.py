"""The stage loop, written once for every scenario and every strategy.

For each stage t (one task):
  fine-tune (or find the stage's fine-tune on disk)  ->  task vector τ_t = θ_t − θ0
  -> every row absorbs / evaluates: a method row's strategy (one object,
     built when the run starts) absorbs τ_t and gives its current merge,
     which is evaluated on every task seen so far (and on the unseen ones
     when forward transfer is asked for); baseline rows evaluate θ0 or the
     fine-tuned models.

Every step writes its artifact atomically into the run folder and is skipped
on rerun when the artifact is there, so a killed run resumes where it stopped
and ends with the same numbers as an uninterrupted one. A rerun never
recurses through earlier stages: a finished step is a file-existence check,
and a strategy that must continue is restored from its latest saved state
(or, for batch strategies, by re-absorbing lazy readers of the task vectors).

Artifacts (see ``docs/run_folder.md``):
  <run>/finetune/independent/<task>/          shared by every order (fine-tune from θ0)
  <order>/finetune/<chain>/<tt>-<task>/       order-dependent chains: sequential, merged-<row>
  <order>/merge/<row>/state-<tt>.safetensors  strategy state after stage tt (latest only by default)
  <order>/merge/<row>/merged-<tt>.safetensors merged encoder after stage tt (latest only by default)
  <order>/merge/<row>/chosen-<tt>.json        scaling chosen on validation data (scaling grids)
  <order>/eval/<row>/stage-<tt>.json          accuracies after stage tt
``<order>`` is ``<run>`` for a single order, ``<run>/order-XX`` otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch

from cl_merge.core.io import load_state_dict, save_state_dict
from cl_merge.errors import ConfigError
from cl_merge.merging import MergeContext, ScalingSearch, TaskInput, build_strategy, get_method
from cl_merge.merging.base import PerTaskMergeResult
from cl_merge.merging.lifecycle import MergeStrategy
from cl_merge.runner import artifacts
from cl_merge.runner.evaluation import TaskPool
from cl_merge.runner.folder import RunFolder

Tensor = torch.Tensor
StepHook = Callable[[str, str], None]
_STATE_FILE = re.compile(r"^state-(\d+)\.safetensors$")


def _noop_hook(kind: str, name: str) -> None:
    return None


def _tag(t: int, task: str) -> str:
    return f"{t:02d}-{task}"


# ====================================================================== rows
class Row:
    """One line of the results: a merging strategy or a baseline. Every row
    answers ``evaluate(run, t)`` with the stage's record; the loop never asks
    which kind it is."""

    kind: ClassVar[str] = ""
    method: str | None = None
    scaling_grid: list[float] | None = None

    def __init__(self, name: str):
        self.name = name
        self.hparams: dict[str, Any] = {}

    def chains(self, run: "OrderRun") -> set[str]:
        """Fine-tune chains this row reads."""
        return set()

    def evaluate(self, run: "OrderRun", t: int) -> dict[str, Any]:
        rel = ("eval", self.name, f"stage-{t:02d}.json")
        if run.folder.has(*rel):
            return run.folder.read_json(*rel)
        record: dict[str, Any] = {"stage": t, "task": run.task_names[t]}
        record.update(self._record(run, t))
        run.hook("evaluate", f"{self.name}/{t:02d}")
        run.folder.write_json(record, *rel)
        return record

    def _record(self, run: "OrderRun", t: int) -> dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class MethodRow(Row):
    """A merging strategy: ONE strategy object for the whole run, started
    afresh for every order, absorbing one task per stage."""

    kind = "method"

    def __init__(self, name: str, method: str, hparams: Mapping[str, Any] | None = None,
                 scaling_grid: Sequence[float] | None = None, *, continual: bool = True, device=None):
        super().__init__(name)
        self.method = method
        self.hparams = dict(hparams or {})
        self.scaling_grid = list(scaling_grid) if scaling_grid else None
        self._run: OrderRun | None = None  # the order the strategy is started for
        strategy = build_strategy(get_method(method, **self.hparams), continual=continual, device=device)
        if self.scaling_grid:
            strategy = ScalingSearch(strategy, self.scaling_grid, self._validation_score)
        self.strategy: MergeStrategy = strategy

    # -- what the strategy needs
    @property
    def needs(self) -> frozenset[str]:
        return frozenset(self.strategy.needs)

    @property
    def _core(self) -> MergeStrategy:
        return self.strategy.inner if isinstance(self.strategy, ScalingSearch) else self.strategy

    def transductive(self, run: "OrderRun") -> bool:
        cal = run.scenario.calibration
        return "data" in self.needs and cal is not None and cal.split == "test"

    def chain(self, run: "OrderRun") -> str:
        init = run.scenario.init
        if init == "pretrained" or run.setting == "multi_task":
            return "independent"
        if init == "previous_finetuned":
            return "sequential"
        return f"merged-{self.name}"

    def chains(self, run):
        return {self.chain(run)}

    def _validation_score(self, weights) -> float:
        run = self._run
        return run.mean_accuracy(weights, list(range(self.strategy.num_absorbed)), split="val")

    # -- the strategy through the stages
    def _states(self, run: "OrderRun") -> dict[int, Path]:
        folder = run.folder.path("merge", self.name)
        if not folder.is_dir():
            return {}
        return {int(m.group(1)): folder / p.name for p in folder.iterdir() if (m := _STATE_FILE.match(p.name))}

    def advance_to(self, run: "OrderRun", t: int) -> None:
        """The strategy holds tasks 0..t: continue in memory when it is there,
        else restore the latest saved state at or before t (or replay lazy
        task vectors for batch strategies) and absorb the rest."""
        strategy = self.strategy
        if self._run is not run:
            self._run = run
            strategy.start(run.theta0, run.merge_context(self))
            saved = {s: p for s, p in self._states(run).items() if s <= t}
            if saved:
                last = max(saved)
                strategy.load_state_dict(load_state_dict(saved[last]), last + 1)
        done = strategy.num_absorbed
        if done > t + 1:
            raise RuntimeError(f"{self.name}: strategy already holds {done} tasks, asked for stage {t}")
        if done == t + 1:
            return
        chain = self.chain(run)
        for i in range(done, t + 1):
            strategy.absorb(run.task_input(self, chain, i))
        # a state is what a later stage resumes from: the last stage needs none
        # (its merged model and eval record are the result)
        last_stage = t == len(run.stages) - 1
        state = None if last_stage and run.scenario.keep.states == "last" else strategy.state_dict()
        if state is not None:
            path = run.folder.path("merge", self.name, f"state-{t:02d}.safetensors")
            save_state_dict(state, path, {"cl_merge_kind": "merge_state", "row": self.name, "stage": str(t)})
            if run.scenario.keep.states == "last":
                for s, old in self._states(run).items():
                    if s < t:
                        old.unlink(missing_ok=True)

    def merged(self, run: "OrderRun", t: int):
        """The merge after stage t (weights or a PerTaskMergeResult) and the
        scaling chosen for it (None without a grid); saves the merged encoder."""
        self.advance_to(run, t)
        chosen_rel = ("merge", self.name, f"chosen-{t:02d}.json")
        scaling = None
        if isinstance(self.strategy, ScalingSearch):
            if run.folder.has(*chosen_rel):  # decided before an interruption
                scaling = run.folder.read_json(*chosen_rel)["scaling"]
                result = self.strategy.current(scaling=scaling)
            else:
                result = self.strategy.current()
                scaling = self.strategy.chosen
                run.folder.write_json({"scaling": scaling,
                                       "validation_accuracy": {str(k): v for k, v in self.strategy.scores.items()}},
                                      *chosen_rel)
        else:
            result = self.strategy.current()
        shared = result.shared if isinstance(result, PerTaskMergeResult) else result
        run.hook("merge", f"{self.name}/{t:02d}")
        save_state_dict(shared, run.merged_path(self.name, t),
                        {"cl_merge_kind": "merged_encoder", "row": self.name, "stage": str(t)})
        if run.scenario.keep.merged == "last":
            folder = run.folder.path("merge", self.name)
            for old in folder.glob("merged-*.safetensors"):
                if old.name != run.merged_path(self.name, t).name:
                    old.unlink(missing_ok=True)
        return result, scaling

    def merged_weights(self, run: "OrderRun", t: int) -> dict[str, Tensor]:
        """The saved merged encoder after stage t (a merged-start chain's init)."""
        path = run.merged_path(self.name, t)
        if not path.exists():
            self.merged(run, t)
        return load_state_dict(path)

    def evaluate(self, run, t):
        record = super().evaluate(run, t)
        if t == len(run.stages) - 1 and run.scenario.keep.states == "last":
            for old in self._states(run).values():  # finished: nothing left to resume
                old.unlink(missing_ok=True)
        return record

    def _record(self, run, t):
        weights, scaling = self.merged(run, t)
        record = {"scaling": scaling, "accuracy": run.accuracies(weights, run.eval_tasks(t), seen_upto=t)}
        if self.transductive(run):
            record["transductive"] = True
        return record


class ZeroShotRow(Row):
    """θ0 on every task (the FWT reference)."""

    kind = "zero_shot"

    def _record(self, run, t):
        tasks = run.eval_tasks(t)
        if run.setting != "class_incremental":
            if t > 0:  # θ0 does not change: evaluated once, on every task, at stage 0
                first = self.evaluate(run, 0)
                if all(run.task_names[i] in first["accuracy"] for i in tasks):
                    return {"accuracy": {run.task_names[i]: first["accuracy"][run.task_names[i]] for i in tasks}}
            else:
                tasks = list(range(len(run.stages)))
        return {"accuracy": run.accuracies(run.theta0, tasks, seen_upto=t)}


class IndividualRow(Row):
    """Task t's own fine-tuned model on task t (the upper bound); earlier
    tasks keep their value, filled in by ``accuracy_rows``."""

    kind = "individual"

    def chains(self, run):
        return {"independent"}

    def _record(self, run, t):
        own = [t] if run.eval_every_stage else list(range(len(run.stages)))
        accuracy = {}
        for i in own:
            accuracy.update(run.accuracies(run.finetuned_state("independent", i), [i], seen_upto=t))
        return {"accuracy": accuracy}


class SequentialFinetuneRow(Row):
    """Fine-tune stage after stage, no merging."""

    kind = "sequential_finetune"

    def chains(self, run):
        return {"sequential"}

    def _record(self, run, t):
        return {"accuracy": run.accuracies(run.finetuned_state("sequential", t), run.eval_tasks(t), seen_upto=t)}


def scenario_rows(scenario, device=None) -> list[Row]:
    """The scenario's rows, each method's strategy built once here."""
    continual = scenario.setting != "multi_task"
    rows: list[Row] = []
    for spec in scenario.methods:
        rows.append(MethodRow(spec.name or spec.method, spec.method, spec.hyperparameters, spec.scaling_grid,
                              continual=continual, device=device))
    base = scenario.baselines
    if base.task_arithmetic and "task_arithmetic" not in {r.method for r in rows}:
        rows.append(MethodRow("task_arithmetic", "task_arithmetic", continual=continual, device=device))
    if base.zero_shot:
        rows.append(ZeroShotRow("zero_shot"))
    if base.individual:
        rows.append(IndividualRow("individual"))
    if base.sequential_finetune:
        rows.append(SequentialFinetuneRow("sequential_finetune"))
    return rows


# ====================================================================== one order
def _stage_identity(stage) -> str:
    body = {k: v for k, v in dataclasses.asdict(stage).items() if k != "name"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


class OrderRun:
    """Runs one order of a scenario's stages. ``folder``: this order's folder;
    ``shared``: the run's top folder, which holds the fine-tunes from θ0 that
    every order reuses (the same folder for a single order)."""

    def __init__(self, scenario, stages: Sequence, folder: RunFolder, pool: TaskPool, *,
                 finetuner, hook: StepHook = _noop_hook, progress: bool = True, log=None,
                 rows: Sequence[Row] | None = None, shared: RunFolder | None = None,
                 model=None, device: torch.device | str = "cpu"):
        self.scenario = scenario
        self.stages = list(stages)
        self.folder = folder
        self.shared = shared if shared is not None else folder
        self.pool = pool
        self.finetuner = finetuner
        self.hook = hook
        self.progress = progress
        self.log = log or (lambda msg: None)
        self.rows = list(rows) if rows is not None else scenario_rows(scenario)
        self.task_names = [s.name for s in self.stages]
        self.setting = scenario.setting
        self.theta0 = pool.theta0
        self.model = model if model is not None else getattr(pool, "model", None)
        self.device = torch.device(device)
        self.eval_every_stage = scenario.setting != "multi_task"
        self._calibration: dict[int, tuple[list[Tensor], list[Tensor] | None]] = {}

    # ------------------------------------------------------------ fine-tunes
    def chains(self) -> list[str]:
        return sorted(set().union(*(row.chains(self) for row in self.rows)))

    _chains = chains  # older name, used by the stage-job entry point

    def finetune_dir(self, chain: str, t: int) -> Path:
        stage = self.stages[t]
        if chain == "independent":
            return self.shared.path("finetune", "independent", independent_name(self.scenario, stage))
        return self.folder.path("finetune", chain, _tag(t, stage.name))

    def finetune_seed(self, chain: str, t: int) -> int:
        """An independent fine-tune's seed depends on the task, not on where
        the order puts it; chains that depend on the order keep the position."""
        if chain == "independent":
            return self.scenario.stage_seed(task_seed_index(self.scenario, self.stages[t]))
        return self.scenario.stage_seed(t)

    def finetuned(self, chain: str, t: int) -> Path:
        """The folder of stage t's finished fine-tune in ``chain``, training
        it if needed. A finished one is found by a file check: the fine-tune
        function (which hashes θ0 and the start weights) is not entered, and
        a chain's earlier stages are not touched."""
        out_dir = self.finetune_dir(chain, t)
        if artifacts.is_complete(out_dir):
            return out_dir
        stage = self.stages[t]
        if chain == "independent" or t == 0:
            init = self.theta0
        elif chain == "sequential":
            init = artifacts.encoder_state(self.finetuned(chain, t - 1))
        else:
            init = self._row(chain[len("merged-"):]).merged_weights(self, t - 1)
        name = f"{chain}/{out_dir.name}"
        self.hook("finetune", name)
        self.finetuner(stage=stage, stage_index=t, init_state=init, out_dir=out_dir, chain=chain,
                       seed=self.finetune_seed(chain, t))
        artifacts.compact(out_dir)
        self.hook("task_vector", name)
        return out_dir

    _finetuned = finetuned

    def finetuned_state(self, chain: str, t: int) -> dict[str, Tensor]:
        return artifacts.encoder_state(self.finetuned(chain, t))

    def task_vector(self, chain: str, t: int) -> artifacts.DerivedTaskVector:
        return artifacts.task_vector(self.finetuned(chain, t), self.theta0)

    def head_chain(self) -> str:
        """Whose trained heads a family with trainable heads (timm ViT) uses."""
        chains = self.chains()
        return "independent" if "independent" in chains else chains[0]

    def head_path(self, t: int) -> Path:
        return self.finetune_dir(self.head_chain(), t) / artifacts.HEAD_FILE

    # ------------------------------------------------------------ merging
    def _row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    def merged_path(self, row_name: str, t: int) -> Path:
        return self.folder.path("merge", row_name, f"merged-{t:02d}.safetensors")

    def merge_context(self, row: MethodRow) -> MergeContext | None:
        """What a strategy asks for: the encoder (keys == θ0's), per-task heads,
        the device. Data-free strategies get none."""
        if not ({"model", "data"} & row.needs):
            return None
        encoder = getattr(self.model, "encoder", None)
        return MergeContext(module=encoder, heads=_Heads(self), device=self.device,
                            transductive=row.transductive(self))

    def task_input(self, row: MethodRow, chain: str, t: int) -> TaskInput:
        stage = self.stages[t]
        batches = labels = head = None
        if "data" in row.needs:
            batches, labels = self.calibration_batches(t)
        if {"model", "data"} & row.needs:
            head = self.pool._own_head(self.stages, t)  # the task's own head, also in class-incremental runs
        return TaskInput(t, self.task_vector(chain, t), name=stage.name, batches=batches, labels=labels, head=head,
                         metadata={"chain": chain})

    def calibration_batches(self, t: int) -> tuple[list[Tensor], list[Tensor] | None]:
        """Seeded calibration batches of stage t (image tensors through the
        model's evaluation preprocess), with their labels when ``labeled``."""
        if t in self._calibration:
            return self._calibration[t]
        cal = self.scenario.calibration
        if cal is None:  # refused at scenario load; a scenario built in code may still lack it
            raise ConfigError("a data-based merging method needs a 'calibration:' section in the scenario")
        from cl_merge.data import cache_tensors
        from cl_merge.data.sampling import sample_calibration

        stage = self.stages[t]
        split_name = {"validation": "val"}.get(cal.split, cal.split)
        data = getattr(self.pool.task(stage), split_name, None)
        if data is None:
            raise ConfigError(f"calibration.split: task {stage.name!r} has no {cal.split!r} split")
        check_calibration_request(cal, data, stage.name)
        seed = (self.scenario.seed if cal.seed is None else cal.seed) * 1000 + task_seed_index(self.scenario, stage)
        subset = sample_calibration(data, n_per_class=cal.n_per_class, seed=seed)
        cached = cache_tensors(subset, self.model.preprocess(train=False))
        size = cal.batch_size or self.scenario.eval.batch_size
        inputs, targets = cached.inputs, torch.as_tensor(cached.labels)
        batches = [inputs[i:i + size] for i in range(0, len(inputs), size)]
        label_batches = [targets[i:i + size] for i in range(0, len(targets), size)] if cal.labeled else None
        self._calibration[t] = (batches, label_batches)
        return self._calibration[t]

    # ------------------------------------------------------------ evaluation
    def eval_tasks(self, t: int) -> list[int]:
        last = len(self.stages) - 1
        if self.scenario.eval.forward_transfer:
            return list(range(len(self.stages)))
        return list(range(t + 1)) if t < last else list(range(len(self.stages)))

    def accuracies(self, weights, tasks: Sequence[int], seen_upto: int, split: str = "test") -> dict[str, float]:
        out = {}
        for i in tasks:
            wrap = None
            if isinstance(weights, PerTaskMergeResult):
                task = min(i, weights.num_tasks - 1)
                encoder = weights.task_state_dict(task)
                if hasattr(weights, "wrap_head"):  # per-task modules on the features (Surgery)
                    wrap = functools.partial(weights.wrap_head, task)
            else:
                encoder = weights
            out.update(self.pool.accuracy(encoder, self.stages, i, seen_upto, split=split, wrap_head=wrap))
        return out

    def mean_accuracy(self, weights, tasks, split):
        accs = self.accuracies(weights, tasks, seen_upto=max(tasks), split=split)
        main = [v for k, v in accs.items() if "/" not in k]
        return sum(main) / len(main)

    # ------------------------------------------------------------ driver
    def run(self) -> dict[str, dict[int, dict[str, Any]]]:
        """All steps of all stages; returns {row: {stage: record}}."""
        records: dict[str, dict[int, dict[str, Any]]] = {r.name: {} for r in self.rows}
        stage_iter = range(len(self.stages))
        if self.progress:
            from tqdm.auto import tqdm

            stage_iter = tqdm(stage_iter, desc="stages", unit="stage", leave=True)
        chains = self.chains()
        last = len(self.stages) - 1
        for t in stage_iter:
            self.log(f"stage {t + 1}/{len(self.stages)}: {self.stages[t].name}")
            for chain in chains:
                if not chain.startswith("merged-"):
                    self.finetuned(chain, t)
            if not self.eval_every_stage and t < last:
                continue
            for row in self.rows:
                for chain in row.chains(self):
                    if chain.startswith("merged-"):
                        self.finetuned(chain, t)
                records[row.name][t] = row.evaluate(self, t)
        return records


class _Heads(Sequence):
    """Per-task heads for a merge context, built on first use."""

    def __init__(self, run: OrderRun):
        self.run = run

    def __len__(self) -> int:
        return len(self.run.stages)

    def __getitem__(self, index):
        return self.run.pool._own_head(self.run.stages, index)


# ====================================================================== task identity
def check_calibration_request(cal, data, task_name: str) -> None:
    """The ``calibration:`` request fits the split it samples from (every class holds ``n_per_class``)."""
    import numpy as np

    counts = np.bincount(np.asarray(data.labels, dtype=np.int64))
    smallest = int(counts.argmin()) if len(counts) else 0
    if len(counts) == 0 or counts.min() < cal.n_per_class:
        have = int(counts.min()) if len(counts) else 0
        raise ConfigError(f"calibration.n_per_class: {cal.n_per_class} per class is more than the {cal.split!r} "
                          f"split of task {task_name!r} holds (class {smallest} has {have} examples)")


def independent_name(scenario, stage) -> str:
    """Folder name of a stage's fine-tune from θ0, shared by every order: the
    task's name, plus a hash of its spec when orders give one name to
    different tasks (class splits re-drawn per order)."""
    clashes = _name_clashes(scenario)
    if stage.name in clashes:
        return f"{stage.name}-{_stage_identity(stage)[:8]}"
    return stage.name


def task_seed_index(scenario, stage) -> int:
    """The task's index in the scenario's stage list (a hash of its spec for
    tasks that exist only in a generated order)."""
    ident = _stage_identity(stage)
    for i, declared in enumerate(scenario.stages):
        if declared.name == stage.name and _stage_identity(declared) == ident:
            return i
    return int(ident[:6], 16) % 1000


def _name_clashes(scenario) -> set[str]:
    cached = getattr(scenario, "_cl_merge_name_clashes", None)
    if cached is not None:
        return cached
    seen: dict[str, set[str]] = {}
    for order in scenario.expand_orders():
        for stage in order:
            seen.setdefault(stage.name, set()).add(_stage_identity(stage))
    clashes = {name for name, idents in seen.items() if len(idents) > 1}
    scenario._cl_merge_name_clashes = clashes  # not a dataclass field: outside to_dict() and the fingerprint
    return clashes


# ====================================================================== matrices
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
