"""The runner on the strategy lifecycle: every registered strategy through a
continual run, resume from saved states (not by recursion), shared
fine-tunes across orders, calibration data for data-based strategies, what
stays on disk, and the device the run is configured for.

One real training run (the module fixture, 10 orders over 3 tiny tasks)
provides the fine-tuned encoders; the other runs import them as checkpoint
stages, so they only merge and evaluate.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import run_quietly
import torch
import yaml

import cl_merge  # noqa: F401  (torchvision compat first)
from cl_merge.core.io import load_state_dict
from cl_merge.errors import ConfigError
from cl_merge.merging import available_methods, build_strategy, get_method
from cl_merge.merging.base import MergeMethod
from cl_merge.merging.lifecycle import MergeStrategy
from cl_merge.runner import RunOptions, artifacts
from cl_merge.scenario import load_scenario

TASKS = [{"dataset": "digits"}, {"dataset": "digits", "variant": "invert"},
         {"dataset": "digits", "variant": "rotate90"}]
NAMES = ["digits", "digits_invert", "digits_rotate90"]
BASE = {
    "setting": "task_incremental",
    "model": {"family": "clip", "name": "clmerge-tiny-clip", "pretrained": None},
    "init": "pretrained",
    "baselines": {"zero_shot": False, "individual": False},
    "train": {"lr": 1.0e-3, "max_steps": 2, "batch_size": 16, "warmup_steps": 0, "max_train": 120},
    "eval": {"batch_size": 128, "max_test": 40},
    "seed": 0,
}


pytestmark = pytest.mark.usefixtures("isolated_run_env")


def _scenario(folder: Path, **changes):
    body = {k: v for k, v in {**BASE, **changes}.items() if v is not None}
    path = folder / "scenario.yaml"
    path.write_text(yaml.safe_dump(body))
    return load_scenario(path)


_run = run_quietly


def _metrics(out: Path) -> dict:
    return {r["name"]: r for r in json.loads((out / "metrics.json").read_text())["results"]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 10-order continual run, counting every fine-tune it performs."""
    import os

    tmp = tmp_path_factory.mktemp("trained")
    os.environ["CL_MERGE_CACHE_DIR"] = str(tmp / "cache")
    scenario = _scenario(tmp, stages=TASKS, order="random", orders=10, order_seed=1,
                         merge=[{"method": "task_arithmetic", "hyperparameters": {"scaling": 0.5}}])
    out = tmp / "run"
    calls = Counter()
    _run(scenario, out, hook=lambda kind, name: calls.update([name]) if kind == "finetune" else None)
    return scenario, out, calls


def _checkpoint_stages(trained_out: Path, n: int = 3) -> list[dict]:
    return [{**TASKS[i], "checkpoint": str(trained_out / "finetune" / "independent" / NAMES[i] / "encoder.safetensors")}
            for i in range(n)]


def _theta0(scenario):
    from cl_merge.models import create_model

    return create_model(scenario.model.family, scenario.model.name, None, init_seed=scenario.seed).encoder_state_dict()


# ---------------------------------------------------------------- shared fine-tunes
def test_ten_orders_fine_tune_each_task_once(trained):
    scenario, out, calls = trained
    assert calls == Counter({f"independent/{name}": 1 for name in NAMES})
    # one folder per task at the top, none per order
    assert sorted(p.name for p in (out / "finetune" / "independent").iterdir()) == sorted(NAMES)
    orders = sorted(out.glob("order-*"))
    assert len(orders) == 10 and all((o / "metrics.json").exists() for o in orders)
    assert not any((o / "finetune").exists() for o in orders)
    # the seed is the task's, whatever its position: recorded by the fine-tune
    for i, name in enumerate(NAMES):
        meta = json.loads((out / "finetune" / "independent" / name / "metadata.json").read_text())
        assert meta["seed"] == scenario.seed * 1000 + i


def test_order_dependent_chains_stay_per_order(trained, tmp_path):
    _, trained_out, _ = trained
    scenario = _scenario(tmp_path, stages=_checkpoint_stages(trained_out), order="random", orders=2,
                         merge=[{"method": "task_arithmetic"}],
                         baselines={"zero_shot": False, "individual": False, "sequential_finetune": True})
    out = tmp_path / "run"
    _run(scenario, out)
    assert sorted(p.name for p in (out / "finetune" / "independent").iterdir()) == sorted(NAMES)
    for order in ("order-00", "order-01"):
        seq = sorted(p.name for p in (out / order / "finetune" / "sequential").iterdir())
        assert [s[:3] for s in seq] == ["00-", "01-", "02-"]


# ---------------------------------------------------------------- every strategy
def _calibration_for(name: str):
    strategy = build_strategy(get_method(name))
    if "data" not in strategy.needs:
        return None
    if strategy.data_split == "test":
        return {"n_per_class": 1, "labeled": False, "split": "test"}
    return {"n_per_class": 1, "labeled": True, "split": "train"}


def _refusal(name: str) -> str | None:
    """The reason a strategy cannot run 3 continual stages (None: it can)."""
    method = get_method(name)
    if method.max_models is not None and method.max_models < 3:
        return f"'{name}' merges at most {method.max_models} models"
    return None


# the run checks the plumbing, not convergence: test-time optimisers take few steps
SHORT_HPARAMS = {"adamerging": {"max_steps": 5},
                 "surgery": {"steps": 5, "base_hyperparameters": {"max_steps": 5}},
                 "dop": {"num_steps": 20}, "wudi": {"num_steps": 20}}


@pytest.fixture(scope="module")
def every_strategy_run(trained, tmp_path_factory):
    """One 3-stage continual run with every registered strategy that can run
    there as a row (one run: the data and the heads are built once)."""
    _, trained_out, _ = trained
    tmp = tmp_path_factory.mktemp("every")
    names = [n for n in available_methods() if _refusal(n) is None]
    # test-time methods calibrate on the test split, which the others may not: a run of their own
    test_time = {n for n in names if (_calibration_for(n) or {}).get("split") == "test"}
    groups = [[n for n in names if n not in test_time], sorted(test_time)]
    folders = {}
    for k, group in enumerate(g for g in groups if g):
        calibrations = [c for c in (_calibration_for(n) for n in group) if c is not None]
        scenario = _scenario(tmp, stages=_checkpoint_stages(trained_out),
                             merge=[{"method": n, "hyperparameters": SHORT_HPARAMS.get(n, {})} for n in group],
                             keep={"merged": "all"}, calibration=calibrations[0] if calibrations else None,
                             eval={"batch_size": 128, "max_test": 20})
        out = tmp / f"run{k}"
        _run(scenario, out)
        folders.update({n: out for n in group})
    return tmp, folders


@pytest.mark.slow  # the SVD-based strategies (TSV-M, Iso-CTS) take minutes on a loaded 2-core machine
@pytest.mark.parametrize("name", available_methods())
def test_every_strategy_runs_continually(trained, every_strategy_run, name):
    """3 continual stages with each registered strategy; one that cannot run
    there is refused when the scenario loads, with the reason."""
    _, trained_out, _ = trained
    tmp, folders = every_strategy_run
    method = get_method(name)
    reason = _refusal(name)
    if reason is not None:
        with pytest.raises(ConfigError, match=reason):
            _scenario(tmp, stages=_checkpoint_stages(trained_out), merge=[{"method": name}],
                      calibration=_calibration_for(name))
        return
    out = folders[name]
    result = _metrics(out)[name]
    assert set(result["per_task"]) == set(NAMES)
    assert all(0.0 <= v <= 1.0 for v in result["per_task"].values())
    rows = (out / result["accuracy_matrix"]).read_text().strip().splitlines()
    assert len(rows) == 4 and all(line.count(",") == 3 for line in rows)  # header + one row per stage
    for t in range(3):
        record = json.loads((out / "eval" / name / f"stage-{t:02d}.json").read_text())
        assert set(record["accuracy"]) >= set(NAMES[: t + 1])
    merged = sorted(p.name for p in (out / "merge" / name).glob("merged-*.safetensors"))
    assert merged == ["merged-00.safetensors", "merged-01.safetensors", "merged-02.safetensors"]
    if method.min_models > 1 and not method.supports_incremental():
        # defined for two or more models: at stage 0 the merge is that stage's fine-tuned model
        first = load_state_dict(out / "merge" / name / "merged-00.safetensors")
        encoder = load_state_dict(trained_out / "finetune" / "independent" / NAMES[0] / "encoder.safetensors")
        assert all(torch.allclose(first[k], encoder[k], atol=1e-6) for k in encoder)
        second = load_state_dict(out / "merge" / name / "merged-01.safetensors")
        assert any(not torch.allclose(second[k], encoder[k]) for k in encoder if encoder[k].is_floating_point())


# ---------------------------------------------------------------- resume
def test_resume_restores_states_instead_of_replaying(trained, tmp_path, monkeypatch):
    """Killed at TIES' merge of the last stage: the rerun restores TIES from
    its one saved state (after stage 1) and absorbs stage 2 only, and replays
    TSV-M's absorbs with lazy readers of the stored fine-tunes. A finished
    run keeps no state (nothing is left to resume)."""
    _, trained_out, _ = trained
    methods = [{"method": "task_arithmetic", "scaling_grid": [0.3, 1.0]},
               {"method": "ties", "hyperparameters": {"scaling": 1.0, "density": 0.5}},
               {"method": "tsv_m"}]
    scenario = _scenario(tmp_path, stages=_checkpoint_stages(trained_out), merge=methods)
    reference = tmp_path / "reference"
    _run(scenario, reference)

    out = tmp_path / "run"
    merges = []

    def kill_at_ties_last(kind, name):
        if kind == "merge":
            merges.append(name)
            if name == "ties/02":
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(scenario, out, hook=kill_at_ties_last)
    # only the latest state and merged model per method are on disk
    assert sorted(p.name for p in (out / "merge" / "ties").glob("state-*")) == ["state-01.safetensors"]
    assert sorted(p.name for p in (out / "merge" / "ties").glob("merged-*")) == ["merged-01.safetensors"]

    absorbed = Counter()
    restored = Counter()
    original_absorb, original_load = MergeStrategy.absorb, None
    from cl_merge.merging.lifecycle import IncrementalStrategy

    original_load = IncrementalStrategy.load_state_dict

    def absorb(self, task):
        absorbed[self.name] += 1
        if self.name == "tsv_m":
            assert isinstance(task.task_vector, artifacts.DerivedTaskVector)
        return original_absorb(self, task)

    def load(self, state, n):
        restored[(self.name, n)] += 1
        return original_load(self, state, n)

    monkeypatch.setattr(MergeStrategy, "absorb", absorb)
    monkeypatch.setattr(IncrementalStrategy, "load_state_dict", load)
    _run(scenario, out)
    # ScalingSearch forwards absorb to its inner strategy: both count under the method's name
    assert restored == Counter({("ties", 2): 1})
    assert absorbed["ties"] == 1 and absorbed["task_arithmetic"] == 0
    assert absorbed["tsv_m"] == 3
    assert _metrics(out) == _metrics(reference)
    assert not list(out.glob("merge/*/state-*"))


def test_finished_run_resumes_by_file_checks(trained, tmp_path, monkeypatch):
    """Rerunning a finished run enters neither the fine-tune function nor any
    strategy: every step is found on disk."""
    _, trained_out, _ = trained
    scenario = _scenario(tmp_path, stages=TASKS, init="previous_finetuned",
                         train={**BASE["train"], "max_steps": 1},
                         merge=[{"method": "ties"}, {"method": "tsv_m"}],
                         baselines={"zero_shot": True, "individual": True, "sequential_finetune": True})
    out = tmp_path / "run"
    _run(scenario, out)
    before = _metrics(out)

    def refuse(*args, **kwargs):
        raise AssertionError("entered on a finished run")

    import sys

    import cl_merge.lit.finetune  # noqa: F401  (the package re-exports the function under the module's name)

    lit_finetune = sys.modules["cl_merge.lit.finetune"]
    from cl_merge.runner.finetuning import StageFinetuner
    from cl_merge.runner.loop import MethodRow

    monkeypatch.setattr(lit_finetune, "finetune", refuse)
    monkeypatch.setattr(StageFinetuner, "__call__", refuse)
    monkeypatch.setattr(MethodRow, "advance_to", refuse)
    _run(scenario, out)
    assert _metrics(out) == before


# ---------------------------------------------------------------- data-based strategies
SEEN: list[dict] = []


class _Recording(MergeStrategy):
    """Test-only data-based strategy: records what it is given; merges as a
    plain average of the task vectors."""

    needs = frozenset({"model", "data"})
    data_split = "train"
    needs_labels = True

    def _start(self):
        self.sum = None
        SEEN.append({"start": True, "module_keys": sorted(self.context.module.state_dict()),
                     "pretrained_keys": sorted(self.pretrained), "transductive": self.context.transductive})

    def _absorb(self, task):
        batches = list(task.batches)
        out = self.context.call(self.pretrained, batches[0])
        logits = task.head(out)
        SEEN.append({"index": task.index, "name": task.name,
                     "batches": [b.clone() for b in batches],
                     "labels": None if task.labels is None else torch.cat(list(task.labels)),
                     "logits_shape": tuple(logits.shape),
                     "context_head_is_task_head": self.context.heads[task.index] is task.head})
        tv = {k: task.task_vector[k] for k in task.task_vector.keys()}
        self.sum = tv if self.sum is None else {k: self.sum[k] + v for k, v in tv.items()}

    def current(self, **overrides):
        if self.sum is None:
            return dict(self.pretrained)
        n = self.num_absorbed
        return {k: (v + self.sum[k] / n).to(v.dtype) if k in self.sum else v for k, v in self.pretrained.items()}


class _RecordingTTA(_Recording):
    data_split = "test"
    needs_labels = False


@dataclasses.dataclass
class _RecordingMethod(MergeMethod):
    name = "test_recording"

    def create_strategy(self, key_filter=None, device=None):
        return _Recording(self)


@dataclasses.dataclass
class _RecordingTTAMethod(MergeMethod):
    name = "test_recording_tta"

    def create_strategy(self, key_filter=None, device=None):
        return _RecordingTTA(self)


@pytest.fixture
def recording_methods():
    from cl_merge.merging import registry

    registry.register(_RecordingMethod)
    registry.register(_RecordingTTAMethod)
    SEEN.clear()
    yield
    registry._REGISTRY.pop(_RecordingMethod.name, None)
    registry._REGISTRY.pop(_RecordingTTAMethod.name, None)
    SEEN.clear()


def test_data_based_strategy_gets_seeded_calibration_batches(trained, tmp_path, recording_methods):
    _, trained_out, _ = trained
    cal = {"n_per_class": 2, "labeled": True, "split": "train", "batch_size": 8}
    scenario = _scenario(tmp_path, stages=_checkpoint_stages(trained_out),
                         merge=[{"method": "test_recording"}], calibration=cal)
    _run(scenario, tmp_path / "a")
    start, *tasks = SEEN
    assert start["module_keys"] == start["pretrained_keys"] and not start["transductive"]
    assert [t["index"] for t in tasks] == [0, 1, 2] and [t["name"] for t in tasks] == NAMES
    for t in tasks:
        images = torch.cat(t["batches"])
        assert images.shape[0] == 2 * 10 and images.dim() == 4  # 2 per class of 10 digit classes
        assert max(b.shape[0] for b in t["batches"]) == 8
        assert sorted(Counter(t["labels"].tolist()).values()) == [2] * 10
        assert t["logits_shape"][1] == 10 and t["context_head_is_task_head"]
    # seeded: a second run draws the same examples
    first = [torch.cat(t["batches"]) for t in tasks]
    SEEN.clear()
    _run(scenario, tmp_path / "b")
    again = [torch.cat(t["batches"]) for t in SEEN[1:]]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # the merge is what the strategy returned: the average of the task vectors
    theta0 = _theta0(scenario)
    tvs = [artifacts.task_vector(trained_out / "finetune" / "independent" / n, theta0) for n in NAMES]
    merged = load_state_dict(tmp_path / "a" / "merge" / "test_recording" / "merged-02.safetensors")
    key = next(iter(tvs[0]))
    assert torch.allclose(merged[key], theta0[key] + sum(tv[key] for tv in tvs) / 3, atol=1e-6)


def test_test_time_calibration_marks_the_run_transductive(trained, tmp_path, recording_methods):
    _, trained_out, _ = trained
    scenario = _scenario(tmp_path, stages=_checkpoint_stages(trained_out, 2),
                         merge=[{"method": "test_recording_tta"}, {"method": "task_arithmetic"}],
                         calibration={"n_per_class": 1, "split": "test"})
    out = tmp_path / "run"
    _run(scenario, out)
    assert SEEN[0]["transductive"] and SEEN[1]["labels"] is None
    record = json.loads((out / "eval" / "test_recording_tta" / "stage-01.json").read_text())
    assert record["transductive"] is True
    metrics = _metrics(out)
    assert metrics["test_recording_tta"]["metrics"]["transductive"] is True
    assert "transductive" not in metrics["task_arithmetic"]["metrics"]
    summary = (out / "summary.md").read_text()
    assert "test_recording_tta [transductive]" in summary and "task_arithmetic [transductive]" not in summary


def test_calibration_is_validated(trained, tmp_path, recording_methods):
    _, trained_out, _ = trained
    stages = _checkpoint_stages(trained_out, 2)
    with pytest.raises(ConfigError, match="'test_recording' needs calibration data"):
        _scenario(tmp_path, stages=stages, merge=[{"method": "test_recording"}])
    with pytest.raises(ConfigError, match="calibration.split: test .* only for test-time methods"):
        _scenario(tmp_path, stages=stages, merge=[{"method": "test_recording"}],
                  calibration={"n_per_class": 1, "split": "test"})
    with pytest.raises(ConfigError, match="needs labeled calibration data"):
        _scenario(tmp_path, stages=stages, merge=[{"method": "test_recording"}],
                  calibration={"n_per_class": 1, "labeled": False})
    with pytest.raises(ConfigError, match="test labels are never given"):
        _scenario(tmp_path, stages=stages, merge=[{"method": "test_recording_tta"}],
                  calibration={"n_per_class": 1, "labeled": True, "split": "test"})
    big = _scenario(tmp_path, stages=stages, merge=[{"method": "test_recording"}],
                    calibration={"n_per_class": 500, "labeled": True})
    with pytest.raises(ConfigError, match=r"n_per_class: 500 per class is more than the 'train' split of task 'digits'"):
        _run(big, tmp_path / "big")
    assert not (tmp_path / "big").exists()  # found from the labels, before the run folder is made


# ---------------------------------------------------------------- device
def test_device_follows_the_configuration(trained, tmp_path):
    from cl_merge.runner.run import _order_run, _setup, resolve_device

    _, trained_out, _ = trained
    scenario = _scenario(tmp_path, stages=_checkpoint_stages(trained_out, 2), merge=[{"method": "task_arithmetic"}],
                         train={**BASE["train"], "accelerator": "cpu"})
    options = RunOptions(out_dir=tmp_path / "run", progress=False, wandb_mode="disabled", log=lambda m: None)
    assert resolve_device(scenario, options) == ("cpu", torch.device("cpu"))
    setup = _setup(scenario, options)
    order_run = _order_run(scenario, scenario.stages, setup.top, setup, options)
    assert order_run.device == torch.device("cpu") and order_run.pool.model.device.type == "cpu"
    assert order_run.finetuner.train_cfg.accelerator == "cpu"
    if not torch.cuda.is_available():
        options.accelerator = "gpu"
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device(scenario, options)
    else:
        options.accelerator = "auto"
        gpu = _scenario(tmp_path, stages=_checkpoint_stages(trained_out, 2), merge=[{"method": "task_arithmetic"}])
        assert resolve_device(gpu, options)[1].type == "cuda"


def test_per_task_head_wrappers_reach_evaluation():
    """A merge result with per-task modules between encoder and head
    (Surgery's adapters) is evaluated through them, task by task."""
    from cl_merge.merging.base import PerTaskMergeResult
    from cl_merge.runner.loop import OrderRun

    calls = []

    class Result(PerTaskMergeResult):
        def wrap_head(self, index, head):
            calls.append(index)
            return ("wrapped", index, head)

    result = Result({"w": torch.zeros(1)}, lambda i: {"w": torch.full((1,), float(i))}, 2)

    class Pool:
        def accuracy(self, encoder, stages, index, seen_upto, split="test", wrap_head=None):
            assert wrap_head is not None and wrap_head("head") == ("wrapped", index, "head")
            return {f"t{index}": float(encoder["w"])}

    run = OrderRun.__new__(OrderRun)  # only the evaluation path is exercised
    run.pool, run.stages = Pool(), [None, None]
    assert run.accuracies(result, [0, 1], seen_upto=1) == {"t0": 0.0, "t1": 1.0}
    assert calls == [0, 1]


# ---------------------------------------------------------------- the accuracy benchmarks' view of a run
def test_benchmark_scripts_open_a_finished_run(trained, monkeypatch):
    """scripts/bench_data_merging.py and bench_continual.py read task vectors,
    heads and calibration tensors of a finished run through the runner: that
    access must keep working as the runner changes (it broke once)."""
    import sys

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    monkeypatch.syspath_prepend(str(scripts))
    from _bench_runs import batches_of, open_order_run, split_tensors

    scenario, out, _ = trained
    counts = Counter()
    options = RunOptions(out_dir=out, progress=False, wandb_mode="disabled", log=lambda m: None,
                         hook=lambda kind, name: counts.update([kind]))
    order_run, stages = open_order_run(scenario, options)
    tv = order_run.task_vector("independent", 1)
    encoder = load_state_dict(out / "finetune" / "independent" / NAMES[1] / "encoder.safetensors")
    assert all(torch.equal(tv[k], encoder[k] - order_run.theta0[k]) for k in encoder)
    assert counts["finetune"] == 0  # found done, not redone
    inputs, labels = split_tensors(order_run, stages[0], "train", 20, seed=3)
    again, _ = split_tensors(order_run, stages[0], "train", 20, seed=3)
    assert inputs.shape[0] == labels.shape[0] == 20 and torch.equal(inputs, again)
    assert [len(b) for b in batches_of(inputs, 8)] == [8, 8, 4]
    accuracy = order_run.pool.accuracy(dict(order_run.theta0), stages, 0, 0)[stages[0].name]
    assert 0.0 <= accuracy <= 1.0
