"""``cl-merge run S --dry-run``: every shipped scenario validates to what a
run would build and prints its plan; nothing is written, no data or weights
are read; the counts and the disk estimate follow the scenario."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import cl_merge  # noqa: F401  (torchvision compat first)
from cl_merge.cli import main
from cl_merge.errors import ConfigError
from cl_merge.runner.plan import build_plan
from cl_merge.scenario import list_scenarios, load_scenario

SHIPPED = list_scenarios()


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CL_MERGE_CACHE_DIR", str(tmp_path / "cache"))  # an offline tag must not pretrain anything


def test_every_shipped_scenario_dry_runs(tmp_path, capsys):
    assert len(SHIPPED) >= 10
    for name in SHIPPED:
        out = tmp_path / name
        assert main(["run", name, "--dry-run", "--out", str(out)]) == 0, name
        text = capsys.readouterr().out
        assert f"scenario {name}" in text and "fine-tunes:" in text and "disk (estimate):" in text, name
        assert not out.exists(), f"{name}: a dry run created {out}"
    assert not (tmp_path / "cache").exists()  # no pretraining, no head cache: nothing was built for real


def _plan(tmp_path: Path, overrides=(), **changes):
    body = {
        "setting": "task_incremental",
        "model": {"family": "clip", "name": "clmerge-tiny-clip", "pretrained": None},
        "stages": ["digits", {"dataset": "digits", "variant": "invert"}, {"dataset": "digits", "variant": "rotate90"}],
        "merge": [{"method": "task_arithmetic"}, {"method": "ties", "hyperparameters": {"density": 0.5}}],
        "baselines": {"zero_shot": True, "individual": True},
        "train": {"max_steps": 3},
        "seed": 0,
        **changes,
    }
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(body))
    return build_plan(load_scenario(path, list(overrides)))


def test_counts_shared_and_per_order_fine_tunes(tmp_path):
    plan = _plan(tmp_path)
    assert plan.finetunes == {"independent": 3} and plan.merges == {"task_arithmetic": 3, "ties": 3}
    # 4 rows x 3 stages; tasks per stage: 1, 2, 3 for TA/TIES/zero-shot, 1 for individual
    assert plan.evaluations == 12 and plan.task_evaluations == 3 * (1 + 2 + 3) + 3
    # five orders: independent fine-tunes shared by all (one per task), merges per order
    plan = _plan(tmp_path, ["orders=5"], init="pretrained")
    assert plan.finetunes == {"independent": 3} and plan.merges["ties"] == 15 and len(plan.orders) == 5
    # sequential fine-tuning: a chain per order
    plan = _plan(tmp_path, ["orders=5", "init=previous_finetuned"])
    assert plan.finetunes == {"independent": 3, "sequential": 15}
    plan = _plan(tmp_path, ["init=previous_merged"])
    assert plan.finetunes == {"independent": 3, "merged-chain": 6}  # one chain per merging row
    plan = _plan(tmp_path, ["setting=multi_task"])
    assert plan.merges == {"task_arithmetic": 1, "ties": 1} and not any(plan.incremental.values())


def test_disk_estimate_from_parameter_count(tmp_path):
    plan = _plan(tmp_path)
    numel = plan.encoder_numel
    # the tiny CLIP image tower, built on the meta device: parameters and float buffers
    from cl_merge.models import create_model

    real = create_model("clip", "clmerge-tiny-clip", None, head_cache_dir=None).encoder_state_dict()
    assert numel == sum(v.numel() for v in real.values() if v.is_floating_point())
    copy = 4 * numel
    disk = plan.disk_bytes()
    assert disk["fine-tunes"] == 3 * copy  # a fine-tune is stored once, as its encoder
    assert disk["merged models"] == 2 * copy  # keep.merged: last -> the latest merged encoder per row
    # task arithmetic keeps a running sum (one copy per stage); TIES keeps more per stage
    assert plan.state_copies["task_arithmetic"] == pytest.approx(3.0, rel=0.05)
    assert plan.state_copies["ties"] > plan.state_copies["task_arithmetic"]
    # keep.states: last -> only the latest state per row (its size: one stage's)
    latest = sum(c / 3 for c in plan.state_copies.values()) * copy
    assert disk["strategy states"] == pytest.approx(latest, rel=1e-6)
    everything = _plan(tmp_path, keep={"merged": "all", "states": "all"}).disk_bytes()
    assert everything["merged models"] == 6 * copy  # one merged encoder per (row, stage)
    assert everything["strategy states"] > disk["strategy states"]


def test_vit_family_is_sized_too(tmp_path):
    plan = _plan(tmp_path, model={"family": "vit", "name": "clmerge-tiny-vit", "pretrained": None})
    assert 400_000 < plan.encoder_numel < 500_000  # the preset's 0.46M parameters


@pytest.mark.parametrize("changes, expected", [
    ({"model": {"family": "clip", "name": "ViT-B-99", "pretrained": None}}, "plan.yaml: model.name: unknown CLIP model"),
    ({"model": {"family": "clip", "name": "ViT-B-32", "pretrained": "laion9"}}, "plan.yaml: model.pretrained: unknown tag"),
    ({"model": {"family": "vit", "name": "no_such_vit", "pretrained": None}}, "plan.yaml: model.name: unknown timm model"),
])
def test_unknown_models_fail_the_dry_run(tmp_path, changes, expected):
    with pytest.raises(ConfigError) as info:
        _plan(tmp_path, **changes)
    assert expected in str(info.value)


def test_gpu_without_gpu_fails_validation(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="plan.yaml: accelerator: 'gpu' asked for, but torch sees no CUDA GPU"):
        _plan(tmp_path, ["train.accelerator=gpu"])
    path = tmp_path / "plan.yaml"
    out = tmp_path / "run"
    assert main(["run", str(path), "--accelerator", "gpu", "--out", str(out)]) == 2
    assert not out.exists()


def test_missing_checkpoint_is_a_warning_in_the_plan(tmp_path, capsys):
    stages = ["digits", {"dataset": "digits", "variant": "invert", "checkpoint": "nowhere/x.safetensors"}]
    plan = _plan(tmp_path, stages=stages)
    assert plan.imported == 1 and plan.finetunes == {"independent": 1}
    assert "nowhere/x.safetensors does not exist" in plan.format()
