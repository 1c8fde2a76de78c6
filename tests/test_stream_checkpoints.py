"""Stream-of-checkpoints scenarios with the timm ViT family: each imported
stage gets a head (the file beside its checkpoint, else one fitted on the
task's training data with the imported encoder frozen), and the run goes end
to end; the linear-probe fit itself."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import cl_merge  # noqa: F401
from cl_merge.core.io import load_state_dict, save_state_dict
from cl_merge.models import create_model
from cl_merge.models.heads import fit_linear_head
from cl_merge.runner import RunOptions, run_scenario
from cl_merge.scenario import load_scenario


pytestmark = pytest.mark.usefixtures("isolated_run_env")


def test_fit_linear_head_reaches_the_regularised_optimum():
    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(4, 6, generator=g)
    labels = torch.arange(200) % 4
    features = 5 + 10 * (centers[labels] + 0.3 * torch.randn(200, 6, generator=g))  # off-centre, large scale
    head = fit_linear_head(features, labels, 4, weight_decay=1e-3)
    assert (head(features).argmax(-1) == labels).float().mean() == 1.0
    # first-order optimality of the documented objective, in the standardised coordinates
    mean, std = features.mean(0), features.std(0, unbiased=False)
    w_z = (head.weight.detach() * std).requires_grad_(True)
    b_z = (head.bias.detach() + head.weight.detach() @ mean).requires_grad_(True)
    z = (features - mean) / std
    loss = torch.nn.functional.cross_entropy(z @ w_z.T + b_z, labels) + 1e-3 * w_z.pow(2).sum()
    grads = torch.autograd.grad(loss, [w_z, b_z])
    assert max(float(g.abs().max()) for g in grads) < 1e-4
    again = fit_linear_head(features, labels, 4, weight_decay=1e-3)
    assert torch.equal(again.weight, head.weight)


def test_vit_stream_of_checkpoints_with_heads(tmp_path):
    model = create_model("vit", "clmerge-tiny-vit", init_seed=0)
    theta0 = model.encoder_state_dict()
    ckpts = tmp_path / "ckpts"
    g = torch.Generator().manual_seed(1)
    # stage 0: a safetensors encoder with its head beside it (<stem>.head.safetensors)
    first = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in theta0.items()}
    save_state_dict(first, ckpts / "digits.safetensors")
    given_head = torch.nn.Linear(model.feature_dim, 10)
    save_state_dict(given_head.state_dict(), ckpts / "digits.head.safetensors")
    # stage 1: a whole pickled timm module (torch.save(model)), no head: one is fitted
    model.load_encoder_state_dict({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in theta0.items()})
    second = model.encoder_state_dict()
    torch.save(model.encoder, ckpts / "invert.pt")
    body = {
        "setting": "task_incremental",
        "model": {"family": "vit", "name": "clmerge-tiny-vit"},
        "stages": [{"dataset": "digits", "checkpoint": "ckpts/digits.safetensors"},
                   {"dataset": "digits", "variant": "invert", "checkpoint": "ckpts/invert.pt"}],
        "merge": [{"method": "task_arithmetic", "hyperparameters": {"scaling": 0.5}}],
        "baselines": {"zero_shot": False, "individual": True},
        "train": {"max_train": 200},
        "eval": {"max_test": 80},
        "seed": 0,
    }
    path = tmp_path / "stream.yaml"
    path.write_text(yaml.safe_dump(body))
    scenario = load_scenario(path)
    out = tmp_path / "run"
    logs = []
    run_scenario(scenario, RunOptions(out_dir=out, progress=False, wandb_mode="disabled", log=logs.append))

    results = {r["name"]: r for r in json.loads((out / "metrics.json").read_text())["results"]}
    assert {"task_arithmetic", "individual"} <= set(results)
    # independent fine-tunes (and imports) are stored once per run, by task
    stage0 = out / "finetune" / "independent" / "digits"
    stage1 = out / "finetune" / "independent" / "digits_invert"
    assert all(torch.equal(load_state_dict(stage0 / "encoder.safetensors")[k], first[k]) for k in first)
    assert all(torch.equal(load_state_dict(stage1 / "encoder.safetensors")[k], second[k]) for k in second)
    head0 = load_state_dict(stage0 / "head.safetensors")
    assert torch.equal(head0["weight"], given_head.weight) and torch.equal(head0["bias"], given_head.bias)
    assert json.loads((stage0 / "metadata.json").read_text())["head"].endswith("digits.head.safetensors")
    assert json.loads((stage1 / "metadata.json").read_text())["head"].startswith("fitted")
    assert any("fitted a linear head" in line for line in logs)
    # the fitted head is a working linear probe of the imported encoder: far above chance (0.1) on test data
    individual = results["individual"]["per_task"]
    assert individual["digits_invert"] > 0.5, individual
    # a rerun finds every artifact and changes nothing
    before = (stage1 / "head.safetensors").read_bytes()
    run_scenario(scenario, RunOptions(out_dir=out, progress=False, wandb_mode="disabled", log=lambda m: None))
    assert (stage1 / "head.safetensors").read_bytes() == before
