"""Evaluation runs on the configured device and precision (checked on CPU by
configuration), streams the test split instead of caching tensors, and
agrees with the plain evaluate() loop."""

import cl_merge  # noqa: F401  (torchvision compatibility shim first)
import pytest
import torch

from cl_merge.errors import ConfigError
from cl_merge.lit import evaluate
from cl_merge.lit.evaluate import autocast_for, resolve_device
from cl_merge.models import create_model
from cl_merge.runner.evaluation import TaskPool
from cl_merge.scenario import scenario_from_dict


def _scenario(**eval_fields):
    return scenario_from_dict({
        "name": "dev", "setting": "task_incremental",
        "model": {"family": "clip", "name": "clmerge-tiny-clip"},
        "stages": [{"dataset": "digits", "classes": [0, 1, 2, 3, 4]}, {"dataset": "digits", "classes": [5, 6, 7, 8, 9]}],
        "merge": "task_arithmetic", "eval": {"batch_size": 64, "max_test": 60, **eval_fields},
    })


def test_resolve_device_follows_the_configuration():
    assert resolve_device("cpu", "auto") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    if torch.cuda.is_available():
        assert resolve_device("gpu", [0]) == torch.device("cuda", 0)
    else:
        with pytest.raises(ConfigError, match="accelerator 'gpu': no CUDA GPU"):
            resolve_device("gpu", 1)
    with pytest.raises(ConfigError, match="accelerator 'tpu'"):
        resolve_device("tpu")


def test_autocast_matches_the_precision_setting():
    with autocast_for(torch.device("cpu"), "bf16-mixed"):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast_for(torch.device("cpu"), "32-true"):
        assert not torch.is_autocast_enabled("cpu")


def test_pool_moves_the_model_to_the_configured_device_without_a_finetune(monkeypatch):
    model = create_model("clip", "clmerge-tiny-clip", head_cache_dir=None)
    moved = []
    original = type(model).to

    def record(self, device):
        moved.append(torch.device(device))
        return original(self, device)

    monkeypatch.setattr(type(model), "to", record)
    pool = TaskPool(_scenario(), model, accelerator="cpu", precision="bf16-mixed")
    assert moved == [torch.device("cpu")] and pool.device == torch.device("cpu")
    assert all(v.device.type == "cpu" for v in pool.theta0.values())


def test_pool_streams_under_autocast_and_agrees_with_evaluate():
    sc = _scenario()
    model = create_model("clip", "clmerge-tiny-clip", head_cache_dir=None)
    pool = TaskPool(sc, model, accelerator="cpu", precision="bf16-mixed")
    seen = []
    hook = model.encoder.register_forward_hook(lambda *a: seen.append(torch.is_autocast_enabled("cpu")))
    stages = sc.stages
    theta = pool.theta0
    result = pool.accuracy(theta, stages, 1, 1)
    hook.remove()
    assert seen and all(seen)  # every batch ran under bf16 autocast
    assert not any(isinstance(v, torch.Tensor) for v in vars(pool).values())  # no cached test tensors
    task = pool.task(stages[1])
    head, _ = pool.head(stages, 1, 1)
    fp32_pool = TaskPool(sc, model, accelerator="cpu")
    plain = evaluate(model, theta, head, task.test, batch_size=64)
    assert fp32_pool.accuracy(theta, stages, 1, 1)["digits_t01"] == pytest.approx(plain, abs=1e-6)
    assert abs(result["digits_t01"] - plain) <= 0.1  # bf16 changes a few borderline predictions at most
