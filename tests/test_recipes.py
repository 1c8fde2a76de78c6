"""Fine-tuning recipes: every optimizer and scheduler the schema accepts is
implemented, the scenario's ``train`` section maps onto TrainConfig in one
place (bad values fail at load, naming file and field), and the shipped
scenarios carry the published recipes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

import cl_merge  # noqa: F401  (torchvision compat first)
from cl_merge.errors import ConfigError, HyperparameterError
from cl_merge.lit.config import TrainConfig
from cl_merge.lit.module import WarmupSchedule, build_optimizer
from cl_merge.scenario import load_scenario

TINY = {
    "setting": "task_incremental",
    "model": {"family": "clip", "name": "clmerge-tiny-clip", "pretrained": None},
    "stages": [{"dataset": "digits"}],
    "merge": [{"method": "task_arithmetic"}],
    "baselines": {"zero_shot": False, "individual": False},
    "train": {"lr": 1.0e-2, "max_steps": 3, "batch_size": 16, "warmup_steps": 0, "max_train": 64},
    "eval": {"batch_size": 64, "max_test": 20},
    "seed": 0,
}


def _write(tmp_path: Path, **train) -> Path:
    body = {**TINY, "train": {**TINY["train"], **train}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


# ---------------------------------------------------------------------- schedules and optimizers
def test_schedules_by_hand():
    # warm-up 2 of 10 steps: factors 1/2, 1, then the decay over the remaining 8 steps
    cos, lin, const = (WarmupSchedule(2, 10, k) for k in ("cosine", "linear", "constant"))
    assert [cos(s) for s in (0, 1)] == [0.5, 1.0] == [lin(s) for s in (0, 1)] == [const(s) for s in (0, 1)]
    assert cos(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))  # = 0.5
    assert lin(6) == pytest.approx(0.5) and lin(10) == 0.0 and lin(4) == pytest.approx(0.75)
    assert const(9) == 1.0 and const(100) == 1.0
    assert cos(10) == pytest.approx(0.0) and cos(2) == 1.0
    with pytest.raises(HyperparameterError, match="scheduler"):
        WarmupSchedule(0, 10, "step")


def test_sgd_with_momentum_by_hand():
    w = torch.nn.Parameter(torch.tensor([1.0]))
    opt = build_optimizer([w], TrainConfig(optimizer="sgd", lr=0.1, weight_decay=0.0))
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9  # the default
    for _ in range(2):  # loss = w: gradient 1 each step; velocity 1 then 1.9
        opt.zero_grad()
        w.sum().backward()
        opt.step()
    assert w.item() == pytest.approx(1.0 - 0.1 * 1.0 - 0.1 * 1.9)


def test_adam_and_adamw_differ_in_weight_decay():
    def one_step(name):
        w = torch.nn.Parameter(torch.tensor([4.0]))
        opt = build_optimizer([w], TrainConfig(optimizer=name, lr=0.1, weight_decay=0.5))
        (w * 0).sum().backward()  # zero loss gradient: only weight decay moves w
        opt.step()
        return w.item(), type(opt)

    adamw, adamw_cls = one_step("adamw")
    adam, adam_cls = one_step("adam")
    assert adamw_cls is torch.optim.AdamW and adam_cls is torch.optim.Adam
    assert adamw == pytest.approx(4.0 * (1 - 0.1 * 0.5))  # decoupled: w -= lr·wd·w, no Adam step
    assert adam == pytest.approx(4.0 - 0.1, abs=1e-4)  # L2 gradient wd·w through Adam's normalisation: one lr step


def test_train_config_refuses_bad_recipe_fields():
    with pytest.raises(HyperparameterError, match="momentum"):
        TrainConfig(optimizer="sgd", momentum=1.5)
    with pytest.raises(HyperparameterError, match="seed"):
        TrainConfig(seed=-3)


# ---------------------------------------------------------------------- one mapping, validated at load
def test_scenario_train_section_builds_the_train_config(tmp_path):
    sc = load_scenario(_write(tmp_path, optimizer="sgd", momentum=0.5, scheduler="linear", grad_clip=None,
                              warmup_steps=None, max_steps=40))
    cfg = sc.train.to_train_config(seed=sc.seed)
    assert (cfg.optimizer, cfg.momentum, cfg.scheduler, cfg.grad_clip) == ("sgd", 0.5, "linear", None)
    assert cfg.warmup_steps == 4  # null: min(500, max_steps // 10)
    # the runner builds the very same object
    from cl_merge.runner.finetuning import train_config_for

    assert train_config_for(sc) == cfg
    assert train_config_for(sc, accelerator="cpu").accelerator == "cpu"


@pytest.mark.parametrize("train, expected", [
    ({"optimizer": "rmsprop"}, "recipe.yaml: train.optimizer: must be one of 'adam', 'adamw', 'sgd'"),
    ({"scheduler": "step"}, "recipe.yaml: train.scheduler: must be one of"),
    ({"momentum": 1.0}, "recipe.yaml: train: momentum must be in [0, 1)"),
    ({"lr": 0.0}, "recipe.yaml: train: lr must be > 0"),
    ({"grad_clip": -1.0}, "recipe.yaml: train: grad_clip must be > 0 or null"),
    ({"num_workers": -1}, "recipe.yaml: train: num_workers must be >= 0"),
])
def test_bad_train_values_fail_at_load(tmp_path, train, expected):
    with pytest.raises(ConfigError) as info:
        load_scenario(_write(tmp_path, **train))
    assert expected in str(info.value)


def test_negative_seed_is_a_clear_load_error(tmp_path):
    path = _write(tmp_path)
    with pytest.raises(ConfigError, match=r"recipe.yaml: seed: must be in 0\.\.\d+, got -3"):
        load_scenario(path, ["seed=-3"])
    with pytest.raises(ConfigError, match="seed: must be in"):
        load_scenario(path, ["seed=4294967296"])


def test_num_workers_is_not_part_of_the_fingerprint(tmp_path):
    path = _write(tmp_path)
    a = load_scenario(path).fingerprint()
    assert a == load_scenario(path, ["train.num_workers=4"]).fingerprint()
    assert a != load_scenario(path, ["train.optimizer=sgd"]).fingerprint()


# ---------------------------------------------------------------------- shipped recipes
@pytest.mark.parametrize("name", ["clip_vitb32_ta8_continual", "clip_vitb32_ta8_multitask",
                                  "clip_vitb32_tall14_continual", "clip_vitb32_tall20_continual"])
def test_fusionbench_scenarios_follow_its_clip_recipe(name):
    sc = load_scenario(name)
    cfg = sc.train.to_train_config(seed=sc.seed)
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.max_steps) == ("adam", 1e-5, 0.0, 128, 4000)
    assert (cfg.scheduler, cfg.warmup_steps, cfg.grad_clip, cfg.trainable) == ("cosine", 0, None, "all")
    assert (sc.model.family, sc.model.name, sc.model.pretrained) == ("clip", "ViT-B-32", "openai")
    if "continual" in name:
        ties = next(m for m in sc.methods if m.method == "ties")
        assert ties.hyperparameters["density"] == 0.2 and ties.hyperparameters["aggregate"] == "sum"
        assert ties.hyperparameters["scaling"] == (0.3 if "ta8" in name else 0.1)


def test_magmax_scenario_follows_its_script():
    sc = load_scenario("magmax_8tasks")
    cfg = sc.train.to_train_config(seed=sc.seed)
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.batch_size) == ("adamw", 1e-5, 0.1, 128)
    assert (cfg.scheduler, cfg.warmup_steps, cfg.grad_clip) == ("cosine", 500, 1.0)
    assert sc.task_names == ["stanford_cars", "mnist", "eurosat", "svhn", "resisc45", "sun397", "dtd", "gtsrb"]
    assert sc.init == "previous_finetuned" and sc.methods[0].hyperparameters == {"scaling": 0.5}


def test_class_incremental_cifar100_uses_magmax_class_order():
    # the first classes of MagMax's fixed CIFAR100 order (danielm1405/magmax src/datasets/cifar100.py)
    head = [70, 89, 11, 13, 63, 53, 86, 57, 41, 43]
    for n in (5, 10, 20):
        sc = load_scenario(f"cifar100_ci_{n}")
        assert len(sc.stages) == n and all(len(s.classes) == 100 // n for s in sc.stages)
        flat = [c for s in sc.stages for c in s.classes]
        assert sorted(flat) == list(range(100)) and flat[:10] == head
        assert flat[-1] == 32  # the order's last class ends the last split


def test_class_order_must_be_a_permutation(tmp_path):
    body = {**TINY, "stages": None, "setting": "class_incremental",
            "split": {"dataset": "digits", "num_tasks": 2, "class_order": [0, 1, 2, 3, 4, 5, 6, 7, 8, 8]}}
    path = tmp_path / "ci.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in body.items() if v is not None}))
    with pytest.raises(ConfigError, match="ci.yaml: split.class_order: must list every class 0..9 once"):
        load_scenario(path)


# ---------------------------------------------------------------------- a scenario with sgd trains
def test_scenario_with_sgd_trains(tmp_path, monkeypatch):
    monkeypatch.setenv("CL_MERGE_CACHE_DIR", str(tmp_path / "cache"))
    from cl_merge.core.io import load_state_dict
    from cl_merge.runner import RunOptions, run_scenario

    sc = load_scenario(_write(tmp_path, optimizer="sgd", scheduler="constant"))
    out = tmp_path / "run"
    run_scenario(sc, RunOptions(out_dir=out, progress=False, wandb_mode="disabled", log=lambda m: None))
    stage = next(p for p in (out / "finetune" / "independent").iterdir() if (p / "metadata.json").exists())
    meta = json.loads((stage / "metadata.json").read_text())
    assert meta["train_config"]["optimizer"] == "sgd" and meta["train_config"]["scheduler"] == "constant"
    assert meta["global_step"] == 3
    from cl_merge.models import create_model
    from cl_merge.runner import artifacts

    theta0 = create_model("clip", "clmerge-tiny-clip", None, init_seed=sc.seed).encoder_state_dict()
    tv = artifacts.task_vector(stage, theta0)
    assert sum(float(tv[k].abs().sum()) for k in tv) > 0  # the weights moved
    assert (out / "metrics.json").exists()
