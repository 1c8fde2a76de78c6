"""The stage runner end to end on tiny data: outputs, determinism, resume
after an interruption at every kind of step, refusal of a foreign run folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import run_quietly
import yaml

import cl_merge  # noqa: F401  (torchvision compat first)
from cl_merge.errors import ConfigError
from cl_merge.runner import RunOptions
from cl_merge.runner.loop import accuracy_rows
from cl_merge.scenario import load_scenario

TINY = {
    "description": "three tiny stages for tests",
    "setting": "task_incremental",
    "model": {"family": "clip", "name": "clmerge-tiny-clip", "pretrained": None},
    "stages": [
        {"dataset": "digits"},
        {"dataset": "digits", "variant": "invert"},
        {"dataset": "digits", "variant": "rotate90"},
    ],
    "init": "pretrained",
    "merge": [
        {"method": "task_arithmetic", "scaling_grid": [0.3, 1.0]},
        {"method": "ties", "hyperparameters": {"scaling": 1.0, "density": 0.5}},
    ],
    "baselines": {"zero_shot": True, "individual": True, "sequential_finetune": False},
    "train": {"lr": 1.0e-3, "max_steps": 3, "batch_size": 16, "warmup_steps": 1, "max_train": 160},
    "eval": {"batch_size": 128, "max_test": 60},
    "seed": 0,
}


class Interrupt(RuntimeError):
    """Stands in for a kill at a chosen step."""


pytestmark = pytest.mark.usefixtures("isolated_run_env")


def _scenario(tmp_path: Path, overrides=(), **changes):
    body = {k: v for k, v in {**TINY, **changes}.items() if v is not None}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(body))
    return load_scenario(path, overrides=list(overrides))


_run = run_quietly


def _results(out: Path) -> dict:
    body = json.loads((out / "metrics.json").read_text())
    return {r["name"]: (r["metrics"], r["per_task"]) for r in body["results"]}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    import os

    os.environ["CL_MERGE_CACHE_DIR"] = str(tmp / "cache")
    scenario = _scenario(tmp)
    out = tmp / "run"
    _run(scenario, out)
    return scenario, out


def _theta0(scenario):
    from cl_merge.models import create_model

    return create_model(scenario.model.family, scenario.model.name, None, init_seed=scenario.seed).encoder_state_dict()


def test_end_to_end_outputs(reference_run):
    scenario, out = reference_run
    for name in ("config.yaml", "run.json", "metrics.json", "summary.md", "summary.csv",
                 "accuracy_matrix.task_arithmetic.csv", "plots/accuracy_vs_tasks.png",
                 "plots/accuracy_matrix.ties.png"):
        assert (out / name).exists(), name
    results = _results(out)
    assert set(results) == {"task_arithmetic", "ties", "zero_shot", "individual"}
    for name, (metrics, per_task) in results.items():
        assert set(per_task) == set(scenario.task_names)
        assert all(0.0 <= v <= 1.0 for v in per_task.values())
    # each fine-tune is stored once (its encoder; the task vector is derived), in a
    # folder named by the task; only the last merged model per method is kept
    ft = out / "finetune" / "independent"
    assert sorted(p.parent.name for p in ft.glob("*/encoder.safetensors")) == sorted(scenario.task_names)
    assert not list(ft.glob("*/task_vector.safetensors"))
    assert sorted(p.name for p in (out / "merge" / "ties").glob("merged-*")) == ["merged-02.safetensors"]
    # the scaling grid was decided on the validation split, and recorded
    chosen = json.loads((out / "merge" / "task_arithmetic" / "chosen-02.json").read_text())
    assert chosen["scaling"] in (0.3, 1.0) and set(chosen["validation_accuracy"]) == {"0.3", "1.0"}
    body = json.loads((out / "metrics.json").read_text())
    ta = next(r for r in body["results"] if r["name"] == "task_arithmetic")
    assert ta["hyperparameters"]["scaling"] == chosen["scaling"]
    # TA's matrix: lower triangle filled, one row per stage
    rows = (out / "accuracy_matrix.task_arithmetic.csv").read_text().strip().splitlines()
    assert len(rows) == 4 and rows[0].startswith("stage,")


def test_metrics_follow_the_matrix(reference_run):
    _, out = reference_run
    body = json.loads((out / "metrics.json").read_text())
    ta = next(r for r in body["results"] if r["name"] == "task_arithmetic")
    lines = (out / ta["accuracy_matrix"]).read_text().strip().splitlines()[1:]
    matrix = [[float(x) if x else math.nan for x in line.split(",")[1:]] for line in lines]
    final = sum(matrix[-1]) / 3
    assert ta["metrics"]["final_accuracy"] == pytest.approx(final)
    forgetting = sum(max(matrix[t][i] for t in range(i, 2)) - matrix[2][i] for i in range(2)) / 2
    assert ta["metrics"]["forgetting"] == pytest.approx(forgetting)


def test_same_config_same_numbers(reference_run, tmp_path):
    scenario, out = reference_run
    again = tmp_path / "again"
    _run(scenario, again)
    assert _results(again) == _results(out)


def test_rerun_skips_everything(reference_run):
    scenario, out = reference_run
    seen = []
    _run(scenario, out, hook=lambda kind, name: seen.append(kind))
    assert "finetune_step" not in seen and "merge" not in seen and "evaluate" not in seen


def test_refuses_run_folder_of_another_config(reference_run, tmp_path):
    scenario, out = reference_run
    other = _scenario(tmp_path, overrides=["train.max_steps=4"])
    with pytest.raises(ConfigError, match="different config"):
        _run(other, out)


@pytest.mark.slow
@pytest.mark.parametrize("kind, occurrence", [
    ("finetune_step", 5),  # mid fine-tune of the second stage
    ("task_vector", 2),
    ("merge", 3),
    ("evaluate", 6),
])
def test_resume_after_interruption(reference_run, tmp_path, kind, occurrence):
    scenario, reference_out = reference_run
    out = tmp_path / "run"
    count = {"n": 0}

    def hook(step_kind, name):
        if step_kind == kind:
            count["n"] += 1
            if count["n"] == occurrence:
                raise Interrupt(f"killed at {step_kind} {name}")

    with pytest.raises(Interrupt):
        _run(scenario, out, hook=hook)
    assert not (out / "metrics.json").exists()
    # nothing half-written: no temp files left beside artifacts
    assert not [p for p in out.rglob("*.tmp*")]
    _run(scenario, out)
    assert _results(out) == _results(reference_out)


def test_accuracy_rows_fill_individual_diagonal():
    records = {"individual": {0: {"accuracy": {"a": 0.5}}, 1: {"accuracy": {"b": 0.7}}}}
    matrix = accuracy_rows(records, ["a", "b"])["individual"]
    assert matrix[0][0] == 0.5 and math.isnan(matrix[0][1])
    assert matrix[1] == [0.5, 0.7]  # task a's own model did not change after stage 0


def test_bad_scenarios_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="stages"):
        _scenario(tmp_path, stages=[])
    with pytest.raises(Exception, match="nonexistent_method|unknown merging method"):
        _scenario(tmp_path, merge=[{"method": "nonexistent_method"}])
    with pytest.raises(ConfigError, match="order_seed"):
        _scenario(tmp_path, order="random", orders=2, order_seed="abc")


def test_stage_jobs_then_run_picks_them_up(tmp_path):
    """Independent fine-tunes as separate jobs (a cluster job array), then the
    plain run finds them done and trains nothing."""
    from cl_merge.runner.run import finetune_stage

    scenario = _scenario(tmp_path, merge=[{"method": "task_arithmetic"}],
                         baselines={"zero_shot": False, "individual": False})
    out = tmp_path / "jobs"
    options = RunOptions(out_dir=out, progress=False, wandb_mode="disabled", log=lambda msg: None)
    for stage in range(3):
        finetune_stage(scenario, options, stage)
    assert sorted(p.parent.name for p in (out / "finetune" / "independent").glob("*/metadata.json")) == \
        sorted(scenario.task_names)
    seen = []
    _run(scenario, out, hook=lambda kind, name: seen.append(kind))
    assert "finetune_step" not in seen
    assert (out / "metrics.json").exists()
    with pytest.raises(ConfigError, match="out of range"):
        finetune_stage(scenario, options, 7)


def test_class_incremental_with_random_orders(tmp_path):
    scenario = _scenario(
        tmp_path, setting="class_incremental", stages=None,
        **{"split": {"dataset": "digits", "num_tasks": 2}, "order": "random", "orders": 2, "order_seed": 3,
           "merge": [{"method": "magmax"}], "baselines": {"zero_shot": True, "individual": False}},
    )
    out = tmp_path / "ci"
    records = _run(scenario, out)
    assert len(records) == 2
    labels = {r.label for r in records[0].results}
    assert "magmax" in labels and "magmax [task-aware]" in labels
    assert (out / "order-00" / "metrics.json").exists() and (out / "order-01" / "metrics.json").exists()
    assert "±" in (out / "summary.md").read_text()
    assert (out / "plots" / "accuracy_vs_tasks.png").exists()


def test_multi_task_with_a_checkpoint_stage(reference_run, tmp_path):
    """A stage that brings its own fine-tuned checkpoint; all merged at once."""
    _, ref_out = reference_run
    ckpt = ref_out / "finetune" / "independent" / "digits_invert" / "encoder.safetensors"
    stages = [{"dataset": "digits"}, {"dataset": "digits", "variant": "invert", "checkpoint": str(ckpt)}]
    scenario = _scenario(tmp_path, setting="multi_task", stages=stages,
                         merge=[{"method": "tsv_m"}, {"method": "task_arithmetic"}])
    out = tmp_path / "mt"
    _run(scenario, out)
    results = _results(out)
    assert set(results) >= {"tsv_m", "task_arithmetic", "zero_shot", "individual"}
    assert set(results["tsv_m"][1]) == {s.name for s in scenario.stages}
    from cl_merge.runner import artifacts

    theta0 = _theta0(scenario)
    imported = artifacts.task_vector(out / "finetune" / "independent" / "digits_invert", theta0)
    ref_tv = artifacts.task_vector(ref_out / "finetune" / "independent" / "digits_invert", theta0)
    assert set(imported) == set(ref_tv) and len(ref_tv) > 0
    assert all((imported[k] == ref_tv[k]).all() for k in ref_tv)


@pytest.mark.slow
def test_offline_default_benchmark_is_meaningful(tmp_path, monkeypatch):
    """The main command as `make demo` runs it: pretraining (cached once),
    six stages, TA/TIES/MagMax and the baselines. Fine-tuned accuracy is far
    above zero-shot and the merged models land in between."""
    monkeypatch.delenv("CL_MERGE_CACHE_DIR", raising=False)  # the real cache: pretraining is reused
    from cl_merge.cli import main

    out = tmp_path / "offline"
    assert main(["run", "--out", str(out), "--wandb", "disabled", "--no-progress"]) == 0
    body = json.loads((out / "metrics.json").read_text())
    final = {r["name"]: r["metrics"]["final_accuracy"] for r in body["results"]}
    assert len(body["tasks"]) >= 6
    assert final["individual"] >= final["zero_shot"] + 0.20
    for method in ("task_arithmetic", "ties", "magmax"):
        assert final["zero_shot"] < final[method] < final["individual"], (method, final)
    assert (out / "plots" / "accuracy_vs_tasks.png").exists()
    assert (out / "plots" / "accuracy_matrix.ties.png").exists()
