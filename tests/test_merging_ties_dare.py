"""TIES, DARE, Breadcrumbs, MagMax, Model Stock and SLERP: hand-computed
cases, properties, incremental == batch, dtypes, validation."""

import math

import pytest
import torch

import cl_merge  # noqa: F401  (torchvision compat first)
from cl_merge.errors import HyperparameterError
from cl_merge.merging import get_method, incremental_merger, merge
from cl_merge.merging._topk import KthLargestMagnitude, keep_count, kth_largest_in_tensor, kth_largest_magnitude
from cl_merge.merging.dare import drop_and_rescale

T = torch.tensor


def models_from_deltas(base, deltas):
    """Fine-tuned state dicts θ_t = θ0 + τ_t."""
    return [{k: base[k] + d[k] for k in base} for d in deltas]


def random_models(num_tasks=4, seed=0, shapes=None):
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"a.weight": (6, 5), "a.bias": (5,), "b.weight": (4, 4, 3), "scale": ()}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(num_tasks)]
    return base, fts


def run_incremental(base, fts, method, **hp):
    merger = incremental_merger(base, method, **hp)
    for ft in fts:
        merger.update_finetuned(ft)
    return merger.current()


# ============================================================== radix selection
@pytest.mark.parametrize("n", [1, 7, 1000, 70_000])
def test_kth_largest_matches_sort(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.logspace(-30, 10, n)  # wide exponent range
    x[: n // 3] = x[: n // 3].round()  # many ties and zeros
    sorted_mag = x.abs().sort(descending=True).values
    chunks = list(x.split(max(1, n // 5)))
    for k in sorted({1, max(1, n // 2), n}):
        assert kth_largest_magnitude(chunks, k) == float(sorted_mag[k - 1])  # radix, streamed
        assert kth_largest_in_tensor(x.reshape(-1, 1), k) == float(sorted_mag[k - 1])  # kthvalue or radix


def test_kth_largest_streams_with_callable_and_rejects_bad_k():
    chunks = [T([0.0, -2.0]), T([1.0, 3.0])]
    assert kth_largest_magnitude(lambda: iter(chunks), 2) == 2.0
    with pytest.raises(ValueError):
        KthLargestMagnitude(0)
    with pytest.raises(ValueError):
        kth_largest_magnitude(chunks, 5)


def test_keep_count():
    assert keep_count(0.29, 100) == 29  # 0.29 * 100 == 28.999... in binary
    assert keep_count(0.2, 6) == 1
    assert keep_count(0.01, 6) == 1  # at least one
    assert keep_count(1.0, 6) == 6


# ============================================================== TIES
# three task vectors of one 2x3 tensor, density 0.5 -> k = 3 per task
TIES_DELTAS = [
    {"w": T([[4.0, -1.0, 2.0], [0.5, -3.0, 1.0]])},   # top-3 |.|: 4, 3, 2 -> [[4,0,2],[0,-3,0]]
    {"w": T([[-2.0, 5.0, 1.0], [3.0, -1.0, 0.5]])},   # top-3: 5, 3, 2     -> [[-2,5,0],[3,0,0]]
    {"w": T([[5.0, 0.5, -6.0], [-3.0, 0.1, 1.0]])},   # top-3: 6, 5, 3     -> [[5,0,-6],[-3,0,0]]
]
TIES_BASE = {"w": torch.ones(2, 3)}


def test_ties_hand_computed_mean():
    # Σ trimmed = [[7, 5, -4], [0, -3, 0]] -> elected signs [[+,+,-],[0,-,0]]
    # agreeing: (0,0) {4,5} -> 4.5; (0,1) {5}; (0,2) {-6}; (1,0) zero sum -> 0 (paper's sgn);
    # (1,1) {-3}; (1,2) nothing kept -> 0
    out = merge(TIES_BASE, models_from_deltas(TIES_BASE, TIES_DELTAS), "ties", density=0.5, scaling=1.0)
    expected = 1.0 + T([[4.5, 5.0, -6.0], [0.0, -3.0, 0.0]])
    assert torch.equal(out["w"], expected)


def test_ties_hand_computed_sum():
    # disjoint sum: [[9, 5, -6], [0, -3, 0]]; θ = 1 + 0.5 * that
    out = merge(TIES_BASE, models_from_deltas(TIES_BASE, TIES_DELTAS), "ties", density=0.5, scaling=0.5,
                aggregate="sum")
    assert torch.equal(out["w"], T([[5.5, 3.5, -2.0], [1.0, -0.5, 1.0]]))


def test_ties_keeps_all_ties_at_threshold():
    # k = max(1, ⌊6/6 · 1⌋) = 1, threshold 3: the three 3s are all kept
    base = {"w": torch.zeros(2, 3)}
    tv = {"w": T([[3.0, -3.0, 3.0], [1.0, 2.0, -1.0]])}
    out = merge(base, models_from_deltas(base, [tv]), "ties", density=1 / 6, scaling=1.0)
    assert torch.equal(out["w"], T([[3.0, -3.0, 3.0], [0.0, 0.0, 0.0]]))


def test_ties_global_versus_per_tensor_scope():
    base = {"a": torch.zeros(2, 3), "b": torch.zeros(3)}
    tv = {"a": T([[10.0, 9.0, 8.0], [7.0, 6.0, 5.0]]), "b": T([1.0, 2.0, 3.0])}
    fts = models_from_deltas(base, [tv])
    # global: 9 entries, k = ⌊4.5⌋ = 4 -> threshold 7: "b" loses everything
    glob = merge(base, fts, "ties", density=0.5, scaling=1.0)
    assert torch.equal(glob["a"], T([[10.0, 9.0, 8.0], [7.0, 0.0, 0.0]]))
    assert torch.equal(glob["b"], T([0.0, 0.0, 0.0]))
    # per tensor: "a" k = 3 (threshold 8), "b" k = 1 (threshold 3)
    per = merge(base, fts, "ties", density=0.5, scaling=1.0, topk_scope="per_tensor")
    assert torch.equal(per["a"], T([[10.0, 9.0, 8.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(per["b"], T([0.0, 0.0, 3.0]))


def test_ties_global_threshold_equals_sorted_topk():
    base, fts = random_models(num_tasks=3, seed=1, shapes={"x": (40, 30), "y": (77,), "z": (5, 5, 5)})
    method = get_method("ties", density=0.2)
    from cl_merge.core.state_dict import DictSource
    from cl_merge.merging.base import TensorStream
    stream = TensorStream(DictSource(base), [DictSource(f) for f in fts], list(base))
    thresholds = method.prepare(stream)
    for i, ft in enumerate(fts):
        flat = torch.cat([(ft[k] - base[k]).reshape(-1) for k in base]).abs()
        k = keep_count(0.2, flat.numel())
        assert thresholds[i] == float(flat.sort(descending=True).values[k - 1])


def test_ties_density_one_without_conflicts_is_plain_average():
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(4, 5, generator=g)}
    deltas = [{"w": torch.rand(4, 5, generator=g) + 0.1} for _ in range(3)]  # all positive: no conflicts
    fts = models_from_deltas(base, deltas)
    out = merge(base, fts, "ties", density=1.0, scaling=1.0)
    mean = sum(d["w"] for d in deltas) / 3
    torch.testing.assert_close(out["w"], base["w"] + mean)
    # disjoint sum with density 1 and no conflicts is task arithmetic
    summed = merge(base, fts, "ties", density=1.0, scaling=0.3, aggregate="sum")
    torch.testing.assert_close(summed["w"], merge(base, fts, "task_arithmetic", scaling=0.3)["w"])


def test_ties_one_task_density_one_gives_the_finetuned_model():
    base, fts = random_models(num_tasks=1)
    out = merge(base, fts, "ties", density=1.0, scaling=1.0)
    for k in base:
        torch.testing.assert_close(out[k], fts[0][k])


@pytest.mark.parametrize("hp", [
    {},
    {"topk_scope": "per_tensor"},
    {"aggregate": "sum", "scaling": 0.3},
    {"density": 1.0},
])
def test_ties_incremental_equals_batch(hp):
    base, fts = random_models(num_tasks=4, seed=5)
    batch = merge(base, fts, "ties", **hp)
    inc = run_incremental(base, fts, "ties", **hp)
    for k in base:
        assert torch.equal(batch[k], inc[k]), k


def test_ties_incremental_state_is_constant_in_tasks_and_resumes():
    base, fts = random_models(num_tasks=3, seed=6)
    merger = incremental_merger(base, "ties")
    merger.update_finetuned(fts[0])
    size = sum(t.numel() for t in merger.state_dict().values())
    merger.update_finetuned(fts[1])
    assert sum(t.numel() for t in merger.state_dict().values()) == size
    resumed = incremental_merger(base, "ties")
    saved = {k: v.clone() for k, v in merger.state_dict().items()}
    restored = {k: v.clone() for k, v in saved.items()}
    resumed.load_state_dict(restored)
    resumed.update_finetuned(fts[2])
    merger.update_finetuned(fts[2])
    for k in base:
        assert torch.equal(resumed.current()[k], merger.current()[k])
    # the tensors handed to load_state_dict were not updated in place
    assert all(torch.equal(restored[k], saved[k]) for k in saved)


# ============================================================== DARE
def test_dare_zero_drop_rate_is_task_arithmetic():
    base, fts = random_models(num_tasks=3)
    out = merge(base, fts, "dare_task_arithmetic", drop_rate=0.0, scaling=0.3)
    ta = merge(base, fts, "task_arithmetic", scaling=0.3)
    for k in base:
        torch.testing.assert_close(out[k], ta[k])


def test_dare_entries_are_dropped_or_rescaled_exactly():
    # 2x3 hand case: every entry of DARE(τ) with p = 0.5 is 0 or exactly 2τ
    tau = T([[1.0, -2.0, 0.5], [4.0, -0.25, 3.0]])
    out = drop_and_rescale(tau, 0.5, seed=0, task_index=0, key="w")
    assert torch.all((out == 0) | (out == 2 * tau))
    big = torch.full((200_000,), 3.0)
    dropped = drop_and_rescale(big, 0.9, seed=1, task_index=0, key="w")
    assert set(dropped.unique().tolist()) <= {0.0, float(T(3.0) / (1 - 0.9))}  # float32 division
    assert abs(float((dropped == 0).float().mean()) - 0.9) < 0.005


def test_dare_seeded_reproducible_and_seed_sensitive():
    base, fts = random_models(num_tasks=2)
    a = merge(base, fts, "dare_task_arithmetic", drop_rate=0.5, seed=7)
    b = merge(base, fts, "dare_task_arithmetic", drop_rate=0.5, seed=7)
    c = merge(base, fts, "dare_task_arithmetic", drop_rate=0.5, seed=8)
    assert all(torch.equal(a[k], b[k]) for k in base)
    assert not torch.equal(a["a.weight"], c["a.weight"])
    # masks depend on (seed, task index, key), not on the order keys are streamed
    rev_base = dict(reversed(list(base.items())))
    rev_fts = [dict(reversed(list(f.items()))) for f in fts]
    d = merge(rev_base, rev_fts, "dare_task_arithmetic", drop_rate=0.5, seed=7)
    assert all(torch.equal(a[k], d[k]) for k in base)
    # nor on the global RNG
    torch.manual_seed(123)
    e = merge(base, fts, "dare_task_arithmetic", drop_rate=0.5, seed=7)
    assert all(torch.equal(a[k], e[k]) for k in base)


def test_dare_mean_over_seeds_approaches_task_arithmetic():
    # E[DARE(τ)] = τ: per entry the std of one draw is |τ|·sqrt(p/(1-p)) = |τ| for p = 0.5;
    # averaged over 400 seeds of 2 tasks the standard error is <= sqrt(2)/20 ≈ 0.07
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.zeros(2, 3)}
    deltas = [{"w": torch.rand(2, 3, generator=g) * 2 - 1} for _ in range(2)]
    fts = models_from_deltas(base, deltas)
    runs = torch.stack([merge(base, fts, "dare_task_arithmetic", drop_rate=0.5, scaling=1.0, seed=s)["w"]
                        for s in range(400)])
    ta = merge(base, fts, "task_arithmetic", scaling=1.0)["w"]
    assert torch.allclose(runs.mean(0), ta, atol=0.25)
    assert runs.std(0).max() > 0.1  # really random


@pytest.mark.parametrize("method,hp", [
    ("dare_task_arithmetic", {"drop_rate": 0.5}),
    ("dare_ties", {}),
    ("dare_ties", {"topk_scope": "per_tensor", "aggregate": "sum", "density": 0.5}),
])
def test_dare_incremental_equals_batch(method, hp):
    base, fts = random_models(num_tasks=3, seed=9)
    batch = merge(base, fts, method, **hp)
    inc = run_incremental(base, fts, method, **hp)
    for k in base:
        assert torch.equal(batch[k], inc[k]), k


def test_dare_ties_with_no_drop_is_ties():
    base, fts = random_models(num_tasks=3, seed=2)
    a = merge(base, fts, "dare_ties", drop_rate=0.0, density=0.3)
    b = merge(base, fts, "ties", density=0.3)
    assert all(torch.equal(a[k], b[k]) for k in base)
    c = merge(base, fts, "dare_ties", drop_rate=0.5, density=0.3)
    assert not torch.equal(a["a.weight"], c["a.weight"])


def test_dare_ties_trims_the_heap_between_draws_without_changing_the_merge(monkeypatch):
    import cl_merge.merging.dare as dare

    base, fts = random_models(num_tasks=3, seed=4)
    want = merge(base, fts, "dare_ties", density=0.3)
    trims = []
    monkeypatch.setattr(dare, "TRIM_EVERY_BYTES", 1)  # after every draw
    monkeypatch.setattr(dare, "release_freed_heap", lambda: trims.append(1))
    got = merge(base, fts, "dare_ties", density=0.3)
    assert trims and all(torch.equal(got[k], want[k]) for k in base)


# ============================================================== Breadcrumbs
def test_breadcrumbs_hand_computed():
    base = {"w": torch.ones(2, 3)}
    # gamma 1/6 -> drop the single largest |τ|; density 0.5 -> keep the next 3
    t1 = T([[0.1, -5.0, 2.0], [-3.0, 0.5, 1.0]])   # drop -5; keep 3, 2, 1 -> [[0,0,2],[-3,0,1]]
    t2 = T([[6.0, -0.2, 0.3], [0.4, -2.0, 1.5]])   # drop 6;  keep 2, 1.5, 0.4 -> [[0,0,0],[0.4,-2,1.5]]
    fts = models_from_deltas(base, [{"w": t1}, {"w": t2}])
    out = merge(base, fts, "breadcrumbs", density=0.5, gamma=1 / 6, scaling=0.5)
    # Σ = [[0,0,2],[-2.6,-2,2.5]]; θ = 1 + 0.5·Σ
    torch.testing.assert_close(out["w"], T([[1.0, 1.0, 2.0], [-0.3, 0.0, 2.25]]))


def test_breadcrumbs_full_density_is_task_arithmetic_and_incremental():
    base, fts = random_models(num_tasks=3, seed=4)
    out = merge(base, fts, "breadcrumbs", density=1.0, gamma=0.0, scaling=0.3)
    ta = merge(base, fts, "task_arithmetic", scaling=0.3)
    for k in base:
        torch.testing.assert_close(out[k], ta[k])
    batch = merge(base, fts, "breadcrumbs")
    inc = run_incremental(base, fts, "breadcrumbs")
    assert all(torch.equal(batch[k], inc[k]) for k in base)


def test_breadcrumbs_one_task_scaling_one_keeps_middle_band():
    base = {"w": torch.zeros(10)}
    tv = {"w": torch.arange(1.0, 11.0)}  # |τ| = 1..10
    out = merge(base, models_from_deltas(base, [tv]), "breadcrumbs", density=0.5, gamma=0.2, scaling=1.0)
    # drop the top 2 (10, 9), keep the next 5 (8..4), drop 3, 2, 1
    assert torch.equal(out["w"], T([0, 0, 0, 4, 5, 6, 7, 8, 0, 0.0]))


# ============================================================== MagMax
def test_magmax_hand_computed_later_task_wins_ties():
    base = {"w": torch.full((2, 3), 10.0)}
    t1 = T([[1.0, -3.0, 2.0], [0.0, 4.0, -1.0]])
    t2 = T([[-2.0, 3.0, 1.0], [0.5, -4.0, -1.0]])
    # max-|τ|: [[-2, 3 (tie -> later), 2], [0.5, -4 (tie -> later), -1]]
    out = merge(base, models_from_deltas(base, [{"w": t1}, {"w": t2}]), "magmax", scaling=0.5)
    assert torch.equal(out["w"], 10.0 + 0.5 * T([[-2.0, 3.0, 2.0], [0.5, -4.0, -1.0]]))


def test_magmax_one_task_and_incremental():
    base, fts = random_models(num_tasks=1)
    out = merge(base, fts, "magmax", scaling=1.0)
    for k in base:
        torch.testing.assert_close(out[k], fts[0][k])
    base, fts = random_models(num_tasks=4, seed=11)
    batch = merge(base, fts, "magmax")
    inc = run_incremental(base, fts, "magmax")
    assert all(torch.equal(batch[k], inc[k]) for k in base)


# ============================================================== Model Stock
def test_model_stock_two_models_hand_computed():
    base = {"w": torch.ones(2, 3)}
    t1 = T([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    t2 = T([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    # cos = 1/√2, t = 2c/(1+c) = 2(√2 − 1); θ = θ0 + t·mean(τ), mean = [[1, .5, 0], [0, 0, 0]]
    out = merge(base, models_from_deltas(base, [{"w": t1}, {"w": t2}]), "model_stock")
    t = 2 * (math.sqrt(2) - 1)
    torch.testing.assert_close(out["w"], 1.0 + t * T([[1.0, 0.5, 0.0], [0.0, 0.0, 0.0]]))


def test_model_stock_three_models_angle_versus_cosine():
    base = {"w": torch.zeros(2, 3)}
    e1 = T([[1.0, 0, 0], [0, 0, 0]])
    e2 = T([[0, 1.0, 0], [0, 0, 0]])
    fts = models_from_deltas(base, [{"w": e1}, {"w": e2}, {"w": e1}])
    mean = (2 * e1 + e2) / 3
    # pairwise: cos(1,2)=0, cos(1,3)=1, cos(2,3)=0
    # angles: mean (π/2 + 0 + π/2)/3 = π/3 -> cos 0.5 -> t = 3·0.5/(1 + 2·0.5) = 0.75
    angle = merge(base, fts, "model_stock")
    torch.testing.assert_close(angle["w"], 0.75 * mean)
    # cosines: mean 1/3 -> t = 1/(1 + 2/3) = 0.6
    cosine = merge(base, fts, "model_stock", angle_average="cosine")
    torch.testing.assert_close(cosine["w"], 0.6 * mean)


def test_model_stock_zero_norm_and_identical_models():
    base = {"w": torch.ones(2, 3)}
    tv = {"w": T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])}
    zero = {"w": torch.zeros(2, 3)}
    out = merge(base, models_from_deltas(base, [tv, zero]), "model_stock")
    assert torch.equal(out["w"], base["w"])  # cos 0 -> t 0 -> the anchor
    out = merge(base, models_from_deltas(base, [zero, zero]), "model_stock")
    assert torch.equal(out["w"], base["w"])
    same = models_from_deltas(base, [tv, tv])  # cos 1 -> t 1 -> the fine-tuned model
    torch.testing.assert_close(merge(base, same, "model_stock")["w"], same[0]["w"])


def test_model_stock_needs_two_models_and_incremental_needs_cosine():
    base, fts = random_models(num_tasks=1)
    with pytest.raises(HyperparameterError, match="model_stock"):
        merge(base, fts, "model_stock")
    with pytest.raises(HyperparameterError, match="angle_average='cosine'"):
        incremental_merger(base, "model_stock")
    base, fts = random_models(num_tasks=4, seed=12)
    batch = merge(base, fts, "model_stock", angle_average="cosine")
    inc = run_incremental(base, fts, "model_stock", angle_average="cosine")
    assert all(torch.equal(batch[k], inc[k]) for k in base)


# ============================================================== SLERP
def test_slerp_hand_computed():
    base = {"w": torch.zeros(2, 3)}
    a = {"w": T([[1.0, 0, 0], [0, 0, 0]])}
    b = {"w": T([[0, 1.0, 0], [0, 0, 0]])}
    # orthogonal unit vectors, Ω = π/2: weights sin(π/4)/sin(π/2) = √2/2 each
    mid = merge(base, [a, b], "slerp", t=0.5)
    torch.testing.assert_close(mid["w"], math.sqrt(0.5) * T([[1.0, 1.0, 0], [0, 0, 0]]))
    assert torch.equal(merge(base, [a, b], "slerp", t=0.0)["w"], a["w"])
    assert torch.equal(merge(base, [a, b], "slerp", t=1.0)["w"], b["w"])
    # colinear -> linear interpolation: between a and 3a at t = .5 is 2a
    c = {"w": 3 * a["w"]}
    torch.testing.assert_close(merge(base, [a, c], "slerp", t=0.5)["w"], 2 * a["w"])
    # θ0 plays no part
    other = {"w": torch.full((2, 3), 5.0)}
    assert torch.equal(merge(other, [a, b], "slerp")["w"], mid["w"])


def test_slerp_requires_exactly_two_models():
    base, fts = random_models(num_tasks=3)
    with pytest.raises(HyperparameterError, match="exactly 2"):
        merge(base, fts, "slerp")
    with pytest.raises(HyperparameterError, match="exactly 2"):
        merge(base, fts[:1], "slerp")
    with pytest.raises(HyperparameterError, match="no incremental form"):
        incremental_merger(base, "slerp")


# ============================================================== all methods
ALL = [
    ("ties", {}), ("ties", {"topk_scope": "per_tensor"}), ("dare_task_arithmetic", {}), ("dare_ties", {}),
    ("breadcrumbs", {}), ("magmax", {}), ("model_stock", {}), ("slerp", {}),
]


@pytest.mark.parametrize("method,hp", ALL)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_round_trip(method, hp, dtype):
    base, fts = random_models(num_tasks=2)
    base = {k: v.to(dtype) for k, v in base.items()}
    fts = [{k: v.to(dtype) for k, v in f.items()} for f in fts]
    out = merge(base, fts, method, **hp)
    for k in base:
        assert out[k].dtype == dtype and out[k].shape == base[k].shape
        assert torch.isfinite(out[k].float()).all()


@pytest.mark.parametrize("method,hp", ALL)
def test_inputs_not_mutated(method, hp):
    base, fts = random_models(num_tasks=2)
    saved = ({k: v.clone() for k, v in base.items()}, [{k: v.clone() for k, v in f.items()} for f in fts])
    merge(base, fts, method, **hp)
    assert all(torch.equal(base[k], saved[0][k]) for k in base)
    assert all(torch.equal(f[k], s[k]) for f, s in zip(fts, saved[1]) for k in f)


@pytest.mark.parametrize("method,hp,match", [
    ("ties", {"density": 0.0}, "density"),
    ("ties", {"density": 1.5}, "density"),
    ("ties", {"density": -0.1}, "density"),
    ("ties", {"aggregate": "median"}, "aggregate"),
    ("ties", {"topk_scope": "layer"}, "topk_scope"),
    ("dare_task_arithmetic", {"drop_rate": 1.0}, "drop_rate"),
    ("dare_task_arithmetic", {"drop_rate": -0.1}, "drop_rate"),
    ("dare_task_arithmetic", {"seed": -1}, "seed"),
    ("dare_ties", {"drop_rate": 1.0}, "drop_rate"),
    ("dare_ties", {"density": 0.0}, "density"),
    ("dare_ties", {"aggregate": "max"}, "aggregate"),
    ("breadcrumbs", {"density": 0.95, "gamma": 0.1}, "density \\+ gamma"),
    ("breadcrumbs", {"gamma": 1.0}, "gamma"),
    ("breadcrumbs", {"density": 0.0}, "density"),
    ("magmax", {"scaling": "big"}, "scaling"),
    ("model_stock", {"angle_average": "median"}, "angle_average"),
    ("slerp", {"t": 1.5}, "t must be"),
])
def test_hyperparameter_validation(method, hp, match):
    with pytest.raises(HyperparameterError, match=match) as info:
        get_method(method, **hp)
    message = str(info.value)
    assert method in message and "\n" not in message
