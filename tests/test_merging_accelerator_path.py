"""The accelerator's branches of every data-free strategy, run on the CPU.

On a GPU an entry is one kernel call and torch's own linear algebra runs;
on the CPU entry-wise merges go in cache-sized chunks, the tasks'
decompositions run on threads and scipy's LAPACK takes some of them. All
strategies choose through ``_placement.host_kernels``; replacing it runs
the GPU's code here, and the results must match the CPU's: bit for bit
for the entry-wise strategies (chunking changes no arithmetic), to float32
accuracy where a different eigensolver runs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import data_free_methods

from cl_merge.merging import (
    PerTaskMergeResult,
    _placement,
    get_method,
    incremental_merger,
    merge,
)

# bigger than one chunk of every entry-wise kernel (2^19 entries), and
# matrices whose small side reaches the threaded decompositions (128)
SHAPES = {
    "visual.transformer.resblocks.0.mlp.c_fc.weight": (1100, 480),
    "visual.transformer.resblocks.0.mlp.c_fc.bias": (1100,),
    "visual.transformer.resblocks.1.attn.out_proj.weight": (160, 160),
}
# the optimisation-based strategies: a few steps exercise the same code
FEW_STEPS = {"dop": {"num_steps": 5}, "wudi": {"num_steps": 5}}
# the one incremental form that needs a hyperparameter other than its default
INCREMENTAL_HPARAMS = {**FEW_STEPS, "model_stock": {"angle_average": "cosine"}}


DATA_FREE = data_free_methods()


@pytest.fixture(scope="module")
def models():
    g = torch.Generator().manual_seed(0)
    pre = {k: 0.02 * torch.randn(shape, generator=g) for k, shape in SHAPES.items()}
    pre["visual.steps"] = torch.tensor(3)
    fts = [{k: v + 0.002 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in pre.items()} for _ in range(3)]
    return pre, fts


def _count(method: str) -> int:
    return 2 if method in ("slerp", "model_stock") else 3


def _as_accelerator(monkeypatch):
    monkeypatch.setattr(_placement, "host_kernels", lambda tensor: False)


def _compare(method: str, pre, host, accelerator):
    elementwise = get_method(method, **FEW_STEPS.get(method, {})).elementwise
    for key in pre:
        if elementwise or not host[key].is_floating_point():
            assert torch.equal(host[key], accelerator[key]), (method, key)
            continue
        moved = (host[key] - pre[key]).norm()
        assert float((host[key] - accelerator[key]).norm()) <= 2e-5 * float(moved), (method, key)


@pytest.mark.parametrize("method", DATA_FREE)
def test_accelerator_branches_agree_with_the_cpu_ones(method, models, monkeypatch):
    pre, fts = models
    fts = fts[:_count(method)]
    hparams = FEW_STEPS.get(method, {})
    torch.manual_seed(0)
    host = merge(pre, fts, method, **hparams)
    _as_accelerator(monkeypatch)
    torch.manual_seed(0)
    accelerator = merge(pre, fts, method, **hparams)
    if isinstance(host, PerTaskMergeResult):
        for task in range(len(fts)):
            _compare(method, pre, host.task_state_dict(task), accelerator.task_state_dict(task))
    else:
        _compare(method, pre, host, accelerator)


INCREMENTAL = [m for m in DATA_FREE if get_method(m, **INCREMENTAL_HPARAMS.get(m, {})).incremental]


@pytest.mark.parametrize("method", INCREMENTAL)
def test_incremental_accelerator_branches_agree_with_the_cpu_ones(method, models, monkeypatch):
    pre, fts = models
    fts = fts[:_count(method)]
    hparams = INCREMENTAL_HPARAMS.get(method, {})

    def fold():
        torch.manual_seed(0)
        merger = incremental_merger(pre, method, **hparams)
        for ft in fts:
            merger.update_finetuned(ft)
        return merger.current()

    host = fold()
    _as_accelerator(monkeypatch)
    _compare(method, pre, host, fold())


def test_the_switch_is_consulted(models, monkeypatch):
    """The replacement reaches the strategies (else the tests above would
    compare the CPU's branches with themselves)."""
    pre, fts = models
    asked = []

    def spy(tensor):
        asked.append(tensor.shape)
        return False

    monkeypatch.setattr(_placement, "host_kernels", spy)
    merge(pre, fts, "task_arithmetic")
    merge(pre, fts, "ties", topk_scope="per_tensor")
    merge(pre, fts, "tsv_m")
    assert (1100, 480) in asked and (160, 160) in asked
