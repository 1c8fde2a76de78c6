"""The strategy lifecycle: every data-free strategy through start/absorb/current
gives what the batch merge gives; scaling search; data/model refused where
they make no sense; the merge context's calling convention."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cl_merge
from cl_merge.errors import HyperparameterError, MergeInputError
from cl_merge.merging import (
    BatchStrategy,
    IncrementalStrategy,
    MergeContext,
    ScalingSearch,
    TaskInput,
    available_methods,
    build_strategy,
    get_method,
    method_class,
)


FLOAT_KEYS = ("blocks.0.w", "blocks.1.b")


def _models(num=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # layer-indexed keys so depth-aware strategies (LiNeS) find their blocks
    pre = {"blocks.0.w": torch.randn(6, 4, generator=gen), "blocks.1.b": torch.randn(4, generator=gen),
           "count": torch.tensor(7)}
    fts = [{k: (v + 0.1 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v) for k, v in pre.items()}
           for _ in range(num)]
    return pre, fts


def _data_free(name: str) -> bool:
    return getattr(method_class(name), "create_strategy", None) is None


@pytest.mark.parametrize("name", [n for n in available_methods() if _data_free(n)])
def test_lifecycle_matches_batch_merge(name):
    cls = method_class(name)
    num = cls.max_models if cls.max_models is not None else 3
    pre, fts = _models(num)
    strategy = build_strategy(get_method(name))
    assert isinstance(strategy, IncrementalStrategy if get_method(name).supports_incremental() else BatchStrategy)
    strategy.start(pre)
    for i, ft in enumerate(fts):
        strategy.absorb(TaskInput(i, {k: ft[k] - pre[k] for k in FLOAT_KEYS}))
    out = strategy.current()
    ref = cl_merge.merge(pre, fts, name)
    for key in FLOAT_KEYS:
        torch.testing.assert_close(out[key], ref[key], atol=1e-5, rtol=1e-5)
    assert torch.equal(out["count"], pre["count"])


def test_incremental_state_round_trip():
    pre, fts = _models(3)
    first = build_strategy(get_method("ties", density=0.5))
    first.start(pre)
    for i, ft in enumerate(fts[:2]):
        first.update({k: ft[k] - pre[k] for k in FLOAT_KEYS})
    second = build_strategy(get_method("ties", density=0.5))
    second.start(pre)
    second.load_state_dict(first.state_dict(), 2)
    for s in (first, second):
        s.update({k: fts[2][k] - pre[k] for k in FLOAT_KEYS})
    assert torch.equal(first.current()["blocks.0.w"], second.current()["blocks.0.w"])
    third = build_strategy(get_method("ties", density=0.5))
    third.start(pre)
    with pytest.raises(MergeInputError, match="holds 3 task.*expected 2"):
        third.load_state_dict(first.state_dict(), 2)


def test_batch_strategy_restores_by_replay():
    pre, _ = _models(1)
    assert build_strategy(get_method("tsv_m")).state_dict() is None


def test_scaling_search_picks_best_and_prefers_small_on_ties():
    pre, fts = _models(2)
    target = cl_merge.merge(pre, fts, "task_arithmetic", scaling=0.5)

    def score(weights):  # closeness to the λ = 0.5 merge
        return -float((weights["blocks.0.w"] - target["blocks.0.w"]).abs().sum())

    search = ScalingSearch(build_strategy(get_method("task_arithmetic")), [0.1, 0.5, 1.0], score)
    search.start(pre)
    for i, ft in enumerate(fts):
        search.absorb(TaskInput(i, {k: ft[k] - pre[k] for k in FLOAT_KEYS}))
    assert search.choose() == 0.5
    torch.testing.assert_close(search.current()["blocks.0.w"], target["blocks.0.w"])
    flat = ScalingSearch(build_strategy(get_method("task_arithmetic")), [1.0, -0.2, 0.3], lambda w: 1.0)
    flat.start(pre)
    flat.absorb(TaskInput(0, {k: fts[0][k] - pre[k] for k in FLOAT_KEYS}))
    assert flat.choose() == -0.2  # equal scores: the smallest |scaling|


def test_scaling_search_needs_a_scaling_hyperparameter():
    with pytest.raises(HyperparameterError, match="no 'scaling'"):
        ScalingSearch(build_strategy(get_method("average")), [0.5], lambda w: 0.0)


def test_data_free_method_refuses_data_and_model():
    pre, fts = _models(2)
    with pytest.raises(MergeInputError, match="data-free.*data="):
        cl_merge.merge(pre, fts, "task_arithmetic", data=[[torch.zeros(1)], [torch.zeros(1)]])
    with pytest.raises(MergeInputError, match="data-free.*model="):
        cl_merge.merge(pre, fts, "ties", model=nn.Linear(2, 2))


class _Affine(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x, shift=None):
        out = self.lin(x)
        return out if shift is None else out + shift


def test_context_calls_module_under_given_weights_with_each_batch_form():
    module = _Affine()
    weights = {"lin.weight": torch.ones(2, 3), "lin.bias": torch.zeros(2)}
    ctx = MergeContext(module=module)
    x = torch.tensor([[1.0, 2.0, 3.0]])
    assert torch.equal(ctx.call(weights, x), torch.tensor([[6.0, 6.0]]))
    assert torch.equal(ctx.call(weights, (x, torch.ones(2))), torch.tensor([[7.0, 7.0]]))
    assert torch.equal(ctx.call(weights, {"x": x, "shift": torch.ones(2)}), torch.tensor([[7.0, 7.0]]))
    # the module's own values are untouched
    assert not torch.equal(module.lin.weight.detach(), torch.ones(2, 3))
    heads = [lambda f: f * 2]
    assert torch.equal(MergeContext(module=module, heads=heads).logits(0, weights, x), torch.tensor([[12.0, 12.0]]))


def test_context_key_check_names_the_mismatch():
    ctx = MergeContext(module=_Affine())
    with pytest.raises(MergeInputError, match="lacks 'other'"):
        ctx.check_keys({"other": torch.zeros(1)})
    with pytest.raises(MergeInputError, match="shape"):
        ctx.check_keys({"lin.weight": torch.zeros(3, 3), "lin.bias": torch.zeros(2)})


@pytest.mark.parametrize("name", ["opcm", "dop", "cofima", "fisher", "regmean", "adamerging"])
def test_methods_with_their_own_strategy_never_reach_the_entry_engine(name):
    from cl_merge.errors import HyperparameterError, MergeInputError
    from cl_merge.merging import IncrementalMerger
    from cl_merge.merging.base import run_merge

    method = get_method(name)
    assert not method.supports_incremental()  # incremental, if at all, through its strategy
    pre = {"w": torch.zeros(4, 4)}
    with pytest.raises(MergeInputError, match=f"{name} folds the models in .* not run_merge"):
        run_merge(method, pre, [{"w": torch.ones(4, 4)}, {"w": torch.ones(4, 4)}])
    with pytest.raises(HyperparameterError, match="runs through its own strategy"):
        IncrementalMerger(method, pre)
