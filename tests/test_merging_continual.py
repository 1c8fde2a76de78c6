"""Continual merging strategies with a running state of their own: OPCM,
DOP, CoFiMA, and the batch WUDI merging. Hand-computed cases, agreement
with independent float64 re-derivations of the reference formulas, objective
decrease, save/restore mid-sequence."""

import math

import pytest
import torch
from torch import nn

import cl_merge  # noqa: F401  (torchvision compat first)
from cl_merge.core.io import load_state_dict, save_state_dict
from cl_merge.errors import HyperparameterError, MergeInputError
from cl_merge.merging import build_strategy, get_method, incremental_merger, merge
from cl_merge.merging.opcm import leading_block_size, project_task_matrix

T = torch.tensor


def random_setup(num_tasks=4, seed=0, dtype=torch.float32, shapes=None, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"a.weight": (6, 5), "a.bias": (6,), "b.weight": (3, 7), "conv": (2, 3, 2, 2), "scale": ()}
    base = {k: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for k, s in shapes.items()}
    base["position_ids"] = torch.arange(4)
    tvs = [{k: (scale * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(dtype)
            for k, v in base.items() if v.is_floating_point()} for _ in range(num_tasks)]
    fts = [{k: (base[k] + tv[k]) if k in tv else base[k] for k in base} for tv in tvs]
    return base, tvs, fts


def run_merger(base, tvs, method, **hp):
    merger = incremental_merger(base, method, **hp)
    for tv in tvs:
        merger.update(tv)
    return merger.current()


# ============================================================== OPCM
def opcm_reference(theta0, finetuned, alpha):
    """FusionBench's OPCM (general version), re-derived step by step in
    float64 on state dicts whose 2-D entries are all linear weights: it keeps
    the merged *model*, recomputes its task vector each step, and rescales
    to the running mean of the task-vector norms."""
    keys = [k for k, v in theta0.items() if v.is_floating_point()]
    base = {k: theta0[k].double() for k in keys}
    tv_norm = lambda model: math.sqrt(sum(float(((model[k] - base[k]) ** 2).sum()) for k in keys))  # noqa: E731
    merged = {k: finetuned[0][k].double() for k in keys}
    norms = [tv_norm(merged)]
    previous_lambda = 1.0
    for model in finetuned[1:]:
        model = {k: model[k].double() for k in keys}
        norms.append(tv_norm(model))
        average = sum(norms) / len(norms)
        lam = 1.0
        new = {}
        for k in keys:
            previous_tv = merged[k] - base[k]
            task_tv = model[k] - base[k]
            if previous_tv.dim() == 2:
                u, s, vh = torch.linalg.svd(previous_tv, full_matrices=True)
                v = vh.T
                split = int((s.cumsum(0) / s.sum() > alpha).float().argmax())
                projected = u.T @ task_tv @ v
                projected.diagonal().fill_(0)
                projected[:split, :split] = 0
                new[k] = base[k] + (previous_lambda * previous_tv + u @ projected @ v.T) / lam
            else:
                new[k] = base[k] + (previous_lambda * previous_tv + task_tv) / lam
        step_norm = tv_norm(new)
        lam *= step_norm / average
        merged = {k: base[k] + (new[k] - base[k]) * (average / step_norm) for k in keys}
        previous_lambda = lam
    return merged


@pytest.mark.parametrize("alpha", [0.5, 0.2, 0.9])
def test_opcm_agrees_with_reference_formulas(alpha):
    base, tvs, fts = random_setup(num_tasks=5, seed=1)
    ours = run_merger(base, tvs, "opcm", alpha=alpha)
    ref = opcm_reference(base, fts, alpha)
    for k in ref:
        assert ours[k].dtype == base[k].dtype
        assert torch.allclose(ours[k].double(), ref[k], atol=2e-5, rtol=0), k
    assert torch.equal(ours["position_ids"], base["position_ids"])


def test_opcm_float64_inputs_are_merged_in_float64():
    base, tvs, fts = random_setup(num_tasks=4, seed=2, dtype=torch.float64)
    ours = run_merger(base, tvs, "opcm")
    ref = opcm_reference(base, fts, 0.5)
    for k in ref:
        assert ours[k].dtype == torch.float64
        assert torch.allclose(ours[k], ref[k], atol=1e-11, rtol=0), k


def test_opcm_merge_in_list_order_equals_incremental():
    base, tvs, fts = random_setup(num_tasks=4, seed=3)
    batch = merge(base, fts, method="opcm", alpha=0.4)
    running = run_merger(base, tvs, "opcm", alpha=0.4)
    reordered = merge(base, fts[::-1], method="opcm", alpha=0.4)
    for k in base:
        assert torch.allclose(batch[k], running[k], atol=1e-5, rtol=0)  # θ0 + τ rounds in float32
    assert not torch.allclose(batch["a.weight"], reordered["a.weight"], atol=1e-4)  # order matters


def test_opcm_first_task_is_the_finetuned_model_and_none_is_theta0():
    base, tvs, fts = random_setup(num_tasks=1, seed=4)
    merger = incremental_merger(base, "opcm")
    assert all(torch.equal(merger.current()[k], base[k]) for k in base)
    merger.update(tvs[0])
    assert all(torch.allclose(merger.current()[k], fts[0][k], atol=1e-7) for k in base)


def test_opcm_hand_computed_2x2():
    # τ1 = diag(3, 1): U = V = I, s = [3, 1], cumulative share [0.75, 1] > 0.5 first at 0: r = 0;
    # P = τ2 with its diagonal zeroed: step = τ1 + [[0, 1], [2, 0]] = [[3, 1], [2, 1]], ‖step‖ = √15;
    # norms √10 and 5: mean m = (√10 + 5)/2; merged = step·m/√15, λ = √15/m
    base = {"w": torch.zeros(2, 2)}
    tau1, tau2 = T([[3.0, 0.0], [0.0, 1.0]]), T([[2.0, 1.0], [2.0, 4.0]])
    merger = incremental_merger(base, "opcm", alpha=0.5)
    merger.update({"w": tau1})
    merger.update({"w": tau2})
    mean = (math.sqrt(10) + 5) / 2
    expected = T([[3.0, 1.0], [2.0, 1.0]]) * mean / math.sqrt(15)
    assert torch.allclose(merger.current()["w"], expected, atol=1e-6)
    assert merger.scalars["previous_lambda"] == pytest.approx(math.sqrt(15) / mean, rel=1e-9)


def test_opcm_hand_computed_3x2_with_bias():
    # τ1 = [[3,0],[0,1],[0,0]]: full U = I3, V = I2, r = 0; P = τ2 with P[0,0], P[1,1] zeroed
    # (the third row has no diagonal entry and is kept); the bias is added as in task arithmetic
    base = {"w": torch.ones(3, 2), "b": torch.zeros(2)}
    tau1 = {"w": T([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), "b": T([0.0, 0.0])}
    tau2 = {"w": T([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), "b": T([1.0, -1.0])}
    out = merge(base, [{k: base[k] + t[k] for k in base} for t in (tau1, tau2)], method="opcm")
    step_w = T([[3.0, 2.0], [3.0, 1.0], [5.0, 6.0]])
    step_b = T([1.0, -1.0])
    step_norm = math.sqrt(84 + 2)
    mean = (math.sqrt(10) + math.sqrt(91 + 2)) / 2
    assert torch.allclose(out["w"], 1 + step_w * mean / step_norm, atol=1e-5)
    assert torch.allclose(out["b"], step_b * mean / step_norm, atol=1e-6)


@pytest.mark.parametrize("alpha,r", [(0.3, 0), (0.5, 1), (0.8, 2), (0.95, 3)])
def test_opcm_larger_alpha_zeroes_a_larger_leading_block(alpha, r):
    # s = [4, 3, 2, 1]: cumulative shares 0.4, 0.7, 0.9, 1.0
    merged = torch.diag(T([4.0, 3.0, 2.0, 1.0]))
    assert leading_block_size(torch.linalg.svdvals(merged), alpha) == r
    added = project_task_matrix(merged, torch.ones(4, 4), alpha)
    zero = torch.eye(4, dtype=torch.bool)
    zero[:r, :r] = True
    assert torch.allclose(added[zero], torch.zeros(()), atol=1e-6)
    assert torch.allclose(added[~zero].abs(), torch.ones(()), atol=1e-6)


@pytest.mark.parametrize("shape", [(7, 4), (4, 7), (5, 5)])
@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_opcm_thin_projection_equals_the_full_basis_formula(shape, alpha):
    g = torch.Generator().manual_seed(sum(shape))
    merged, task = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    u, s, vh = torch.linalg.svd(merged, full_matrices=True)
    p = u.T @ task @ vh.T
    p.diagonal().zero_()
    r = leading_block_size(s, alpha)
    p[:r, :r] = 0
    assert torch.allclose(project_task_matrix(merged, task, alpha), u @ p @ vh, atol=1e-12)


def test_opcm_block_size_grows_with_alpha_on_random_matrices():
    s = torch.linalg.svdvals(torch.randn(12, 9, generator=torch.Generator().manual_seed(0)))
    sizes = [leading_block_size(s, a) for a in (0.0, 0.2, 0.4, 0.6, 0.8, 0.99)]
    assert sizes == sorted(sizes) and sizes[0] == 0 and sizes[-1] > sizes[2]
    assert leading_block_size(torch.zeros(3), 0.5) == 0  # zero matrix: no share exceeds alpha


def test_opcm_additive_keys_are_added_not_projected():
    base, tvs, fts = random_setup(num_tasks=3, seed=5)
    ours = run_merger(base, tvs, "opcm", additive_keys=["b.*"])
    # reference: treat b.weight as non-2-D by flattening it (additive in the reference)
    flat = lambda sd: {k: (v.reshape(-1) if k == "b.weight" else v) for k, v in sd.items()}  # noqa: E731
    ref = opcm_reference(flat(base), [flat(f) for f in fts], 0.5)
    assert torch.allclose(ours["b.weight"].reshape(-1).double(), ref["b.weight"], atol=2e-5)
    assert torch.allclose(ours["a.weight"].double(), ref["a.weight"], atol=2e-5)


def test_opcm_state_round_trip_mid_sequence(tmp_path):
    base, tvs, _ = random_setup(num_tasks=4, seed=6)
    straight = incremental_merger(base, "opcm", alpha=0.6)
    for tv in tvs[:2]:
        straight.update(tv)
    save_state_dict(straight.state_dict(), tmp_path / "state.safetensors")
    for tv in tvs[2:]:
        straight.update(tv)
    resumed = build_strategy(get_method("opcm", alpha=0.6))
    resumed.start(base)
    resumed.load_state_dict(load_state_dict(tmp_path / "state.safetensors"), 2)
    for tv in tvs[2:]:
        resumed.update(tv)
    for k in base:
        assert torch.equal(resumed.current()[k], straight.current()[k]), k
    with pytest.raises(MergeInputError, match="holds 2 task"):
        resumed.load_state_dict(load_state_dict(tmp_path / "state.safetensors"), 3)


def test_opcm_reads_lazy_task_vectors_from_files(tmp_path):
    from cl_merge.core.io import CheckpointReader

    base, tvs, _ = random_setup(num_tasks=3, seed=13)
    readers = []
    for i, tv in enumerate(tvs):
        partial = {k: v for k, v in tv.items() if k != "scale"}  # a float entry left out: a zero delta
        readers.append(CheckpointReader(save_state_dict(partial, tmp_path / f"tv{i}.safetensors")))
    lazy = run_merger(base, readers, "opcm")
    in_memory = run_merger(base, [{k: v for k, v in tv.items() if k != "scale"} for tv in tvs], "opcm")
    assert all(torch.equal(lazy[k], in_memory[k]) for k in base)
    assert torch.equal(lazy["scale"], base["scale"])


def test_opcm_memory_is_one_merged_task_vector():
    base, tvs, _ = random_setup(num_tasks=6, seed=7)
    merger = incremental_merger(base, "opcm")
    for tv in tvs:
        merger.update(tv)
        state = merger.state_dict()
        tensors = [v for k, v in state.items() if not k.startswith("scalar/")]
        assert sum(t.numel() for t in tensors) == sum(v.numel() for v in base.values() if v.is_floating_point())


def test_opcm_validation_and_overrides():
    with pytest.raises(HyperparameterError, match="alpha"):
        get_method("opcm", alpha=1.5)
    base, tvs, _ = random_setup(num_tasks=2, seed=8)
    merger = incremental_merger(base, "opcm")
    merger.update(tvs[0])
    with pytest.raises(HyperparameterError, match="alpha"):
        merger.current(alpha=0.2)
    bad = dict(tvs[1])
    bad["a.weight"] = torch.zeros(2, 2)
    with pytest.raises(MergeInputError, match="shape mismatch for 'a.weight'"):
        merger.update(bad)
    nan = dict(tvs[1])
    nan["a.bias"] = torch.full((6,), float("nan"))
    with pytest.raises(MergeInputError, match="NaN"):
        merger.update(nan)
    merger.update(tvs[1])  # the rejected inputs left the state intact
    clean = run_merger(base, tvs, "opcm")
    assert all(torch.equal(merger.current()[k], clean[k]) for k in base)


# ============================================================== DOP
from cl_merge.merging.dop import ProjectedDistance, dop_optimize, min_norm_weight, principal_subspace  # noqa: E402


def test_min_norm_weight_hand_cases():
    e1, e2 = T([1.0, 0.0]), T([0.0, 1.0])
    assert min_norm_weight(e1, e2) == pytest.approx(0.5)  # orthogonal, equal norms
    assert min_norm_weight(e1, 2 * e2) == pytest.approx(0.8)  # γ = v22/(v11+v22) = 4/5
    assert min_norm_weight(e1, 2 * e1) == 0.999  # <g1,g2> >= ‖g1‖²: all weight on g1
    assert min_norm_weight(2 * e1, e1) == 0.001


def test_principal_subspace_keeps_components_below_epsilon():
    m = torch.diag(T([4.0, 3.0, 2.0, 1.0]))  # shares 0.4, 0.7, 0.9, 1.0
    assert principal_subspace(m, 0.85)[1].tolist() == [4.0, 3.0]
    assert principal_subspace(m, 0.9)[1].tolist() == [4.0, 3.0]  # searchsorted: the share reaching ε is left out
    assert principal_subspace(m, 0.99999)[1].tolist() == [4.0, 3.0, 2.0]
    assert principal_subspace(torch.zeros(3, 2), 0.5)[1].numel() == 0


def test_projected_distance_value_and_gradient_match_autograd():
    g = torch.Generator().manual_seed(0)
    task, target, w = (torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    u, s, v = principal_subspace(task, 0.9)
    for space in ("uv", "u", "v"):
        for power in (1.0, 0.5):
            loss, grad = ProjectedDistance(target, u, s, v, space, power).value_and_grad(w)
            wp = w.clone().requires_grad_(True)
            d = wp - target
            ref = torch.zeros((), dtype=torch.float64)
            if space in ("uv", "u"):
                ref = ref + torch.linalg.matrix_norm(torch.diag(s ** power) @ u.T @ d) ** 2
            if space in ("uv", "v"):
                ref = ref + torch.linalg.matrix_norm(d @ v @ torch.diag(s ** power)) ** 2
            ref.backward()
            assert loss == pytest.approx(float(ref.detach()), rel=1e-12)
            assert torch.allclose(grad, wp.grad, atol=1e-12)


def test_dop_reduces_its_objective():
    g = torch.Generator().manual_seed(1)
    old, new = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    common = dict(num_steps=150, lr=1e-2, ema=True, ema_beta=0.9, alpha=0.8, svd_epsilon=0.99999,
                  svd_proj_space="uv", singular_value_power=1.0)
    _, fixed = dop_optimize(old, new, old, new, mgda=False, **common)
    objective = [0.8 * lo + 0.2 * ln for lo, ln, _ in fixed]
    assert objective[-1] < 0.7 * objective[0]  # two conflicting targets: the minimum is > 0
    merged, balanced = dop_optimize(old, new, old, new, mgda=True, **common)
    weighted = [a * lo + (1 - a) * ln for lo, ln, a in balanced]
    assert weighted[-1] < weighted[0]
    assert all(0.001 <= a <= 0.999 for _, _, a in balanced)
    # first step's α by hand: EMA from 0.8 towards the min-norm weight of the loss-normalised gradients
    start = (old + new) / 2
    normalised = []
    for side in (old, new):
        loss, grad = ProjectedDistance(side, *principal_subspace(side, 0.99999), "uv", 1.0).value_and_grad(start)
        normalised.append(grad / loss)
    assert balanced[0][2] == pytest.approx(0.9 * 0.8 + 0.1 * min_norm_weight(*normalised), rel=1e-6)


def test_dop_defaults_reduce_the_objective_on_task_vector_scale():
    g = torch.Generator().manual_seed(2)
    old, new = 0.01 * torch.randn(16, 12, generator=g), 0.01 * torch.randn(16, 12, generator=g)
    method = get_method("dop")
    merged, history = method.optimize(old, new)
    assert len(history) == 200
    first = history[0][2] * history[0][0] + (1 - history[0][2]) * history[0][1]
    last = history[-1][2] * history[-1][0] + (1 - history[-1][2]) * history[-1][1]
    assert last < first


def test_dop_strategy_identical_models_and_averaged_other_entries():
    base, tvs, fts = random_setup(num_tasks=2, seed=9)
    same = merge(base, [fts[0], fts[0]], method="dop", num_steps=20)
    assert all(torch.allclose(same[k], fts[0][k], atol=1e-6) for k in base)  # zero losses: no step moves
    out = merge(base, fts, method="dop", num_steps=5)
    for k in ("a.bias", "conv", "scale"):
        assert torch.allclose(out[k], (fts[0][k] + fts[1][k]) / 2, atol=1e-6)
    old, new = tvs[0]["a.weight"], tvs[1]["a.weight"]
    expected, _ = get_method("dop", num_steps=5).optimize(old, new)
    assert torch.allclose(out["a.weight"], base["a.weight"] + expected, atol=1e-6)


def test_dop_state_round_trip_mid_sequence():
    base, tvs, _ = random_setup(num_tasks=3, seed=10)
    straight = incremental_merger(base, "dop", num_steps=10)
    straight.update(tvs[0])
    straight.update(tvs[1])
    state = {k: v.clone() for k, v in straight.state_dict().items()}
    straight.update(tvs[2])
    resumed = build_strategy(get_method("dop", num_steps=10))
    resumed.start(base)
    resumed.load_state_dict(state, 2)
    resumed.update(tvs[2])
    assert all(torch.equal(resumed.current()[k], straight.current()[k]) for k in base)


def test_dop_validation():
    for bad in (dict(svd_proj_space="w"), dict(alpha=2.0), dict(num_steps=-1), dict(lr=0)):
        with pytest.raises(HyperparameterError):
            get_method("dop", **bad)


# ============================================================== WUDI
from cl_merge.merging.wudi import wudi_objective, wudi_optimize  # noqa: E402


def test_wudi_objective_hand_computed():
    # τ1 = [[1,0],[0,0]], τ2 = [[0,0],[0,2]], τ_m = [[1,1],[0,2]]:
    # (τm − τ1)τ1ᵀ = [[0,1],[0,2]]·[[1,0],[0,0]] = 0; (τm − τ2)τ2ᵀ = [[1,1],[0,0]]·[[0,0],[0,2]] = [[0,2],[0,0]]
    # objective = 0/1 + 4/4 = 1
    t1, t2 = T([[1.0, 0.0], [0.0, 0.0]]), T([[0.0, 0.0], [0.0, 2.0]])
    assert wudi_objective(T([[1.0, 1.0], [0.0, 2.0]]), [t1, t2]) == pytest.approx(1.0)
    # orthogonal task vectors: the sum already has zero objective, and Adam leaves it there
    assert wudi_objective(t1 + t2, [t1, t2]) == 0.0
    assert torch.equal(wudi_optimize([t1, t2], num_steps=50, lr=1e-2), t1 + t2)


def test_wudi_first_adam_step_by_hand():
    # gradient 2 Σ_i (τm − τi) τiᵀ τi / ‖τi‖²; Adam's first step moves each entry by lr·sign(gradient)
    t1, t2 = T([[1.0, 2.0], [0.0, 1.0]]), T([[0.0, 1.0], [1.0, 0.0]])
    tm = t1 + t2
    grad = 2 * ((tm - t1) @ t1.T @ t1 / 6 + (tm - t2) @ t2.T @ t2 / 2)
    out = wudi_optimize([t1, t2], num_steps=1, lr=1e-3)
    assert torch.allclose(out, tm - 1e-3 * torch.sign(grad), atol=1e-8)


def test_wudi_gradient_equals_autograd_of_the_objective():
    g = torch.Generator().manual_seed(3)
    tvs = [torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(3)]
    tm = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    loss = sum(((tm - t) @ t.T).square().sum() / t.square().sum() for t in tvs)
    loss.backward()
    # one step of plain gradient: Adam with lr tiny is sign-like, so compare through the closed form instead
    a = sum(t.T @ t / t.square().sum() for t in tvs)
    b = sum(t @ t.T @ t / t.square().sum() for t in tvs)
    assert torch.allclose(2 * (tm.detach() @ a - b), tm.grad, atol=1e-10)


def test_wudi_reduces_its_objective_and_merges_other_entries():
    base, tvs, fts = random_setup(num_tasks=3, seed=11)
    out = merge(base, fts, method="wudi", num_steps=100, lr=1e-3)
    for k in ("a.weight", "b.weight"):
        merged_tv = out[k] - base[k]
        start = wudi_objective(sum(tv[k] for tv in tvs), [tv[k] for tv in tvs])
        assert wudi_objective(merged_tv, [tv[k] for tv in tvs]) < 0.9 * start
    assert torch.allclose(out["a.bias"], base["a.bias"] + sum(tv["a.bias"] for tv in tvs) / 3, atol=1e-6)
    kept = merge(base, fts, method="wudi", num_steps=1, other_entries="pretrained")
    assert torch.equal(kept["conv"], base["conv"])
    single = merge(base, fts[:1], method="wudi")  # one task: zero objective, θ0 + τ1
    assert all(torch.allclose(single[k], fts[0][k], atol=1e-6) for k in base)
    with pytest.raises(HyperparameterError, match="other_entries"):
        get_method("wudi", other_entries="max")


# ============================================================== CoFiMA and the diagonal Fisher
from cl_merge.merging import MergeContext, TaskInput  # noqa: E402
from cl_merge.merging._fisher_stats import diagonal_fisher  # noqa: E402
from cl_merge.merging.cofima import fisher_weighted_step  # noqa: E402


class TinyClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)
        self.unused = nn.Linear(2, 2)  # gets no gradient: zero Fisher
        self.register_buffer("offset", torch.zeros(3))

    def forward(self, x):
        return self.head(torch.tanh(self.body(x))) + self.offset


def tiny_setup(num_tasks=3, seed=0, rows=6, num_batches=3):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TinyClassifier()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tvs = [{k: 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(num_tasks)]
    data = [[torch.randn(rows, 4, generator=g) for _ in range(num_batches)] for _ in range(num_tasks)]
    labels = [[torch.randint(0, 3, (rows,), generator=g) for _ in range(num_batches)] for _ in range(num_tasks)]
    return model, base, tvs, data, labels


def autograd_fisher(model, weights, batches, labels=None, reduction="mean"):
    """Independent computation: load the weights into a copy of the module and backpropagate per batch."""
    import copy

    m = copy.deepcopy(model)
    m.load_state_dict(weights)
    total = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    rows = 0
    for i, x in enumerate(batches):
        m.zero_grad()
        logits = m(x)
        if labels is None:
            p = torch.softmax(logits, -1).detach()
            objective = (p.sqrt() * torch.log_softmax(logits, -1)).sum()
            objective = objective / x.shape[0] if reduction == "mean" else objective
        else:
            objective = nn.functional.cross_entropy(logits, labels[i], reduction=reduction)
        objective.backward()
        for n, p in m.named_parameters():
            if p.grad is not None:
                total[n] += p.grad ** 2
        rows += x.shape[0]
    scale = 1 / (len(batches) if reduction == "mean" else rows)
    return {n: t * scale for n, t in total.items()}


@pytest.mark.parametrize("with_labels,reduction", [(True, "mean"), (False, "sum"), (True, "sum")])
def test_diagonal_fisher_matches_autograd_on_the_module(with_labels, reduction):
    model, base, tvs, data, labels = tiny_setup()
    weights = {k: base[k] + tvs[0][k] for k in base}
    ours = diagonal_fisher(MergeContext(module=model), weights, data[0], None,
                           labels=labels[0] if with_labels else None, reduction=reduction)
    ref = autograd_fisher(model, weights, data[0], labels[0] if with_labels else None, reduction)
    for name, value in ref.items():
        assert torch.allclose(ours[name], value, atol=1e-9, rtol=1e-5), name
    assert torch.equal(ours["unused.weight"], torch.zeros(2, 2))
    assert torch.equal(ours["offset"], torch.zeros(3))  # a buffer in the forward pass with no parameter role
    assert all(torch.equal(model.state_dict()[k], base[k]) for k in base)  # the module's own values untouched


@pytest.mark.parametrize("with_labels", [True, False])
def test_exact_diagonal_fisher_is_the_per_example_definition(with_labels):
    # the exact estimator: one example at a time, Σ_y p_y g_y² (expected) or g_label² (empirical)
    model, base, tvs, data, labels = tiny_setup(rows=3, num_batches=2)
    weights = {k: base[k] + tvs[1][k] for k in base}
    ours = diagonal_fisher(MergeContext(module=model), weights, data[0], None, estimator="exact",
                           labels=labels[0] if with_labels else None)
    import copy

    m = copy.deepcopy(model)
    m.load_state_dict(weights)
    ref = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    xs, ys = torch.cat(data[0]), torch.cat(labels[0])
    for x, y in zip(xs, ys):
        log_p = torch.log_softmax(m(x[None]), -1)[0]
        classes = [(int(y), 1.0)] if with_labels else [(c, float(log_p[c].exp())) for c in range(3)]
        for c, weight in classes:
            m.zero_grad()
            log_p[c].backward(retain_graph=True)
            for n, p in m.named_parameters():
                if p.grad is not None:
                    ref[n] += weight * p.grad ** 2 / len(xs)
    for name, value in ref.items():
        assert torch.allclose(ours[name], value, atol=1e-9, rtol=1e-5), name
    with pytest.raises(MergeInputError, match="reduction must be 'sum'"):
        diagonal_fisher(MergeContext(module=model), weights, data[0], None, estimator="exact", reduction="mean")


def test_diagonal_fisher_counts_examples_before_each_batch():
    model, base, tvs, data, labels = tiny_setup(rows=4)
    weights = {k: base[k] + tvs[0][k] for k in base}
    # 5 examples asked: batches of 4 rows, the second batch starts below 5 and is used, the third is not
    limited = diagonal_fisher(MergeContext(module=model), weights, data[0], 5, labels=labels[0], reduction="mean")
    ref = autograd_fisher(model, weights, data[0][:2], labels[0][:2])
    assert torch.allclose(limited["body.weight"], ref["body.weight"], atol=1e-9, rtol=1e-5)
    with pytest.raises(MergeInputError, match="no calibration batch"):
        diagonal_fisher(MergeContext(module=model), weights, [], None)


def test_fisher_weighted_step_by_hand():
    merged, task = T([1.0, 2.0, 3.0]), T([3.0, 0.0, 1.0])
    fm, ft = T([1.0, 0.0, 0.0]), T([1.0, 2.0, 0.0])
    out = fisher_weighted_step(merged, task, fm, ft, alpha=0.4)
    # entry 0: (0.6·1·1 + 0.4·1·3)/(0.6 + 0.4) = 1.8; entry 1: only the task has Fisher: 0;
    # entry 2: no Fisher: plain average 0.6·3 + 0.4·1 = 2.2
    assert torch.allclose(out, T([1.8, 0.0, 2.2]))


def cofima_run(model, base, tvs, data, labels, upto=None, **hp):
    strategy = build_strategy(get_method("cofima", **hp))
    strategy.start(base, MergeContext(module=model))
    for i, tv in enumerate(tvs[:upto]):
        strategy.absorb(TaskInput(i, tv, batches=data[i], labels=labels[i]))
    return strategy


@pytest.mark.parametrize("previous_fisher", ["finetuned", "merged"])
def test_cofima_follows_the_formula(previous_fisher):
    model, base, tvs, data, labels = tiny_setup()
    alpha, clip = 0.4, 0.05
    strategy = cofima_run(model, base, tvs, data, labels, alpha=alpha, fisher_max=clip,
                          previous_fisher=previous_fisher)
    weights = lambda tv: {k: base[k] + tv[k] for k in base}  # noqa: E731
    fisher = lambda w, i: {k: v.clamp(max=clip) for k, v in autograd_fisher(model, w, data[i], labels[i]).items()}  # noqa: E731
    merged = dict(tvs[0])
    previous = fisher(weights(tvs[0]), 0)
    for i in (1, 2):
        current = fisher(weights(tvs[i]), i)
        new = {}
        for k in merged:
            fm, ft = previous.get(k, torch.zeros_like(merged[k])), current.get(k, torch.zeros_like(merged[k]))
            den = (1 - alpha) * fm + alpha * ft
            plain = (1 - alpha) * merged[k] + alpha * tvs[i][k]
            new[k] = torch.where(den > 0, ((1 - alpha) * fm * merged[k] + alpha * ft * tvs[i][k]) / den, plain)
        merged = new
        previous = current if previous_fisher == "finetuned" else fisher(weights(merged), i)
    out = strategy.current()
    for k in base:
        assert torch.allclose(out[k], base[k] + merged[k], atol=1e-5), k
    assert any(float(v.max()) == pytest.approx(clip) for v in previous.values())  # the clip is active


def test_cofima_state_round_trip_and_needs():
    model, base, tvs, data, labels = tiny_setup()
    straight = cofima_run(model, base, tvs, data, labels)
    half = cofima_run(model, base, tvs, data, labels, upto=2)
    resumed = build_strategy(get_method("cofima"))
    resumed.start(base, MergeContext(module=model))
    resumed.load_state_dict({k: v.clone() for k, v in half.state_dict().items()}, 2)
    resumed.absorb(TaskInput(2, tvs[2], batches=data[2], labels=labels[2]))
    assert all(torch.equal(resumed.current()[k], straight.current()[k]) for k in base)
    assert "fisher/body.weight" in half.state_dict()
    with pytest.raises(MergeInputError, match="needs a model"):
        build_strategy(get_method("cofima")).start(base)
    no_data = build_strategy(get_method("cofima"))
    no_data.start(base, MergeContext(module=model))
    with pytest.raises(MergeInputError, match="needs calibration data"):
        no_data.absorb(TaskInput(0, tvs[0]))
    with pytest.raises(MergeInputError, match="no labels"):
        no_data.absorb(TaskInput(0, tvs[0], batches=data[0]))


def test_cofima_through_merge_with_the_expected_fisher():
    model, base, tvs, data, _ = tiny_setup(num_tasks=2)
    fts = [{k: base[k] + tv[k] for k in base} for tv in tvs]
    out = merge(base, fts, method="cofima", fisher="expected", model=model, data=data[:2])
    assert all(out[k].shape == base[k].shape for k in base)
    # between the two models entry-wise (a convex combination)
    lo, hi = torch.minimum(fts[0]["body.weight"], fts[1]["body.weight"]), torch.maximum(fts[0]["body.weight"],
                                                                                       fts[1]["body.weight"])
    assert bool(((out["body.weight"] >= lo - 1e-6) & (out["body.weight"] <= hi + 1e-6)).all())
    with pytest.raises(HyperparameterError, match="previous_fisher"):
        get_method("cofima", previous_fisher="cumulative")


def test_sequential_methods_refuse_the_per_entry_engine_with_a_clear_error():
    from cl_merge.merging import run_merge

    base, _, fts = random_setup(num_tasks=2, seed=12)
    for name in ("opcm", "dop", "cofima"):
        with pytest.raises(MergeInputError, match="one at a time"):
            run_merge(get_method(name), base, fts)
