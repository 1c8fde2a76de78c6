"""TIES fed fine-tuned weights (τ_t formed chunk by chunk in cache), its
mask-arithmetic disjoint merge, and the chunked per-tensor threshold."""

import pytest
import torch

import cl_merge
from cl_merge.merging import incremental_merger
from cl_merge.merging._topk import kth_largest_in_tensor
from cl_merge.merging.ties import disjoint_merge, empty_sign_state, fold_trimmed_


def models(num=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # "w" spans several chunks of the in-place path and of the counting pass
    pre = {"w": torch.randn(800, 700, generator=gen), "b": torch.randn(300, generator=gen),
           "s": torch.randn(4, 4, generator=gen)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in pre.items()} for _ in range(num)]
    return pre, fts


def reference_ties(pre, fts, density, scaling, aggregate, per_tensor):
    """The paper's steps with sorts and torch.where (k = ⌊density·n⌋, keep |τ| >= k-th largest)."""
    keys = list(pre)
    taus = [{k: ft[k] - pre[k] for k in keys} for ft in fts]

    def threshold(values):
        flat = values.reshape(-1).abs()
        k = max(1, int(density * flat.numel() + 1e-6))
        return flat.sort(descending=True).values[k - 1]

    trimmed = []
    for tau in taus:
        if per_tensor:
            trimmed.append({k: torch.where(v.abs() >= threshold(v), v, 0.0) for k, v in tau.items()})
        else:
            thr = threshold(torch.cat([v.reshape(-1) for v in tau.values()]))
            trimmed.append({k: torch.where(v.abs() >= thr, v, 0.0) for k, v in tau.items()})
    out = {}
    for key in keys:
        stack = torch.stack([t[key] for t in trimmed])
        sign = torch.sign(stack.sum(0))
        agree = (torch.sign(stack) == sign) & (stack != 0)
        total = (stack * agree).sum(0)
        merged = total / agree.sum(0).clamp(min=1) if aggregate == "mean" else total
        out[key] = pre[key] + scaling * merged
    return out


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("aggregate", ["mean", "sum"])
def test_ties_matches_reference(scope, aggregate):
    pre, fts = models()
    out = cl_merge.merge(pre, fts, "ties", density=0.2, scaling=0.5, topk_scope=scope, aggregate=aggregate)
    expected = reference_ties(pre, fts, 0.2, 0.5, aggregate, per_tensor=scope == "per_tensor")
    for key in pre:
        torch.testing.assert_close(out[key], expected[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_batch_equals_incremental_to_the_bit(scope):
    pre, fts = models(seed=3)
    batch = cl_merge.merge(pre, fts, "ties", density=0.3, topk_scope=scope)
    merger = incremental_merger(pre, "ties", density=0.3, topk_scope=scope)
    for ft in fts:
        merger.update_finetuned(ft)
    for key in pre:
        assert torch.equal(batch[key], merger.current()[key]), key


def test_same_on_a_requested_cpu_device():
    pre, fts = models(seed=4)
    plain = cl_merge.merge(pre, fts, "ties", density=0.2, topk_scope="per_tensor")
    on_cpu = cl_merge.merge(pre, fts, "ties", density=0.2, topk_scope="per_tensor", device="cpu")
    assert all(torch.equal(plain[k], on_cpu[k]) for k in pre)


def test_task_vector_inputs_agree_with_weights():
    pre, fts = models(seed=5)
    taus = [{k: ft[k] - pre[k] for k in pre} for ft in fts]
    from cl_merge.merging import get_method, run_merge

    method = get_method("ties", density=0.2)
    from_weights = run_merge(method, pre, fts)
    from_taus = run_merge(method, pre, taus, task_vectors=True)
    for key in pre:
        torch.testing.assert_close(from_taus[key], from_weights[key], rtol=1e-6, atol=1e-6)


def test_disjoint_merge_equals_nested_where():
    gen = torch.Generator().manual_seed(1)
    trimmed = [torch.randn(5000, generator=gen) * (torch.rand(5000, generator=gen) < 0.4) for _ in range(4)]
    trimmed[1][:50] = -trimmed[0][:50]  # totals of exactly 0 elect sign 0
    trimmed[2][:50] = 0
    trimmed[3][:50] = 0
    for aggregate in ("mean", "sum"):
        state = empty_sign_state(trimmed[0])
        if aggregate == "sum":
            del state["pos_count"], state["neg_count"]
        for t in trimmed:
            fold_trimmed_(state, t, 1e-12)
        before = {k: v.clone() for k, v in state.items()}
        got = disjoint_merge(state, aggregate)
        total = state["pos_sum"] + state["neg_sum"]
        if aggregate == "mean":
            pos = state["pos_sum"] / state["pos_count"].clamp(min=1)
            neg = state["neg_sum"] / state["neg_count"].clamp(min=1)
        else:
            pos, neg = state["pos_sum"], state["neg_sum"]
        assert torch.equal(got, torch.where(total > 0, pos, torch.where(total < 0, neg, 0.0)))
        assert bool((got[:50] == 0).all())
        assert all(torch.equal(before[k], state[k]) for k in state)  # the state is not modified


@pytest.mark.parametrize("n", [1000, 300_000])  # partial sort / bracketed counting pass
def test_kth_largest_of_a_difference(n):
    gen = torch.Generator().manual_seed(n)
    a, b = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    for k in (1, n // 5, n):
        expected = float((a - b).abs().sort(descending=True).values[k - 1])
        assert kth_largest_in_tensor(a, k, minus=b) == expected
        assert kth_largest_in_tensor(a - b, k) == expected
