"""Data-based merging: RegMean, RegMean++, Fisher, AdaMerging, Surgery."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import cl_merge  # noqa: F401  (torchvision shim first)
from cl_merge.errors import ClMergeError, HyperparameterError, MergeInputError
from cl_merge.merging import MergeContext, TaskInput, get_method, merge
from cl_merge.merging._data import GramCollector, cycle_batches, take_examples
from cl_merge.merging.adamerging import ties_masked_task_vectors
from cl_merge.merging.fisher import fisher_weighted_average
from cl_merge.merging.lifecycle import merge_with_strategy
from cl_merge.merging.surgery import SurgeryResult

pytestmark = pytest.mark.filterwarnings("ignore:.*fewer than num_examples")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def two_layer(seed=1, d_in=4, d_hidden=5, d_out=3, act=None):
    torch.manual_seed(seed)
    layers = [nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, d_out)]
    if act is not None:
        layers.insert(1, act)
    return nn.Sequential(*layers)


def perturbed(state, n, scale=0.3, seed=0):
    g = gen(seed)
    return [{k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()} for _ in range(n)]


def reduce(gram, ratio):
    return gram * ratio + torch.diag(torch.diag(gram)) * (1 - ratio)


def closed_form(grams, weights, ratio):
    """(Σ G̃_i)⁻¹ Σ G̃_i W_iᵀ, transposed: RegMean's solution, by hand."""
    lhs = sum(reduce(g, ratio) for g in grams).double()
    rhs = sum(reduce(g, ratio).double() @ w.double().T for g, w in zip(grams, weights))
    return torch.linalg.solve(lhs, rhs).T


# ----------------------------------------------------------------- RegMean
def test_regmean_closed_form_two_layer_linear_model_and_stopping_rule():
    pre = two_layer().state_dict()
    fts = perturbed(pre, 2)
    g = gen(1)
    data = [[torch.randn(3, 4, generator=g) for _ in range(3)] for _ in range(2)]
    out = merge(pre, fts, method="regmean", model=two_layer(seed=7), data=data, num_examples=5,
                reduce_non_diagonal_ratio=0.8)
    # 5 examples in batches of 3: checked before each batch, so two batches (6 rows) are used
    grams0, grams1 = [], []
    for ft, batches in zip(fts, data):
        x = torch.cat(batches[:2])
        h = x @ ft["0.weight"].T + ft["0.bias"]
        grams0.append(x.T @ x / 6)
        grams1.append(h.T @ h / 6)
    expected0 = closed_form(grams0, [f["0.weight"] for f in fts], 0.8)
    expected1 = closed_form(grams1, [f["1.weight"] for f in fts], 0.8)
    torch.testing.assert_close(out["0.weight"].double(), expected0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["1.weight"].double(), expected1, atol=1e-5, rtol=1e-5)
    # biases are averaged
    torch.testing.assert_close(out["0.bias"], (fts[0]["0.bias"] + fts[1]["0.bias"]) / 2)
    # the third batch was not used: with all 9 rows the result differs
    all_rows = merge(pre, fts, method="regmean", model=two_layer(), data=data, num_examples=9,
                     reduce_non_diagonal_ratio=0.8)
    assert not torch.allclose(all_rows["0.weight"], out["0.weight"], atol=1e-4)


def test_regmean_accepts_fusion_bench_names():
    pre = two_layer().state_dict()
    fts = perturbed(pre, 2)
    data = [[torch.randn(3, 4, generator=gen(15)) for _ in range(3)] for _ in range(2)]
    ours = merge(pre, fts, method="regmean", model=two_layer(), data=data, num_examples=4, exclude=["1.*"])
    theirs = merge(pre, fts, method="regmean", model=two_layer(), data=data, num_regmean_examples=4,
                   exclude_param_names_regex=[r"1\."])
    for key in pre:
        torch.testing.assert_close(ours[key], theirs[key])
    torch.testing.assert_close(theirs["1.weight"], pre["1.weight"])


def test_regmean_of_identical_models_is_that_model():
    pre = two_layer().state_dict()
    ft = perturbed(pre, 1)[0]
    data = [[torch.randn(6, 4, generator=gen(2))]] * 2
    out = merge(pre, [ft, ft], method="regmean", model=two_layer(), data=data)
    for key in ft:
        torch.testing.assert_close(out[key], ft[key], atol=1e-5, rtol=1e-5)


class TupleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = two_layer(act=nn.Tanh())

    def forward(self, x, shift):
        return self.net(x + shift)


class DictModel(TupleModel):
    def forward(self, x=None, shift=None):  # noqa: D401 - called as module(**batch)
        return self.net(x + shift)


def test_regmean_python_contract_with_tensor_tuple_and_dict_batches():
    pre = TupleModel().state_dict()
    fts = perturbed(pre, 3)
    g = gen(3)
    xs = [[torch.randn(4, 4, generator=g) for _ in range(2)] for _ in range(3)]
    shift = torch.full((1, 4), 0.5)
    as_tuple = [[(x, shift) for x in task] for task in xs]
    as_dict = [[{"x": x, "shift": shift} for x in task] for task in xs]
    as_tensor = [[x + shift for x in task] for task in xs]
    out_tuple = merge(pre, fts, method="regmean", model=TupleModel(), data=as_tuple, num_examples=8)
    out_dict = merge(pre, fts, method="regmean", model=DictModel(), data=as_dict, num_examples=8)
    tensor_model = TupleModel().net
    strip = lambda sd: {k[len("net."):]: v for k, v in sd.items()}  # noqa: E731
    out_tensor = merge(strip(pre), [strip(f) for f in fts], method="regmean", model=tensor_model,
                       data=as_tensor, num_examples=8)
    for key, value in out_tensor.items():
        torch.testing.assert_close(out_tuple["net." + key], value, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out_dict["net." + key], value, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out_tuple["net.0.weight"], sum(f["net.0.weight"] for f in fts) / 3, atol=1e-4)


class AttentionModel(nn.Module):
    def __init__(self, batch_first=True):
        super().__init__()
        torch.manual_seed(4)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.attn(x, x, x, need_weights=False)[0].mean(dim=1 if self.attn.batch_first else 0))


def manual_attention_values(mha: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """Concatenated heads' outputs, by hand (batch first)."""
    e, h = mha.embed_dim, mha.num_heads
    q, k, v = (x @ w.T + b for w, b in zip(mha.in_proj_weight.split(e), mha.in_proj_bias.split(e)))
    split = lambda t: t.reshape(t.shape[0], t.shape[1], h, e // h).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(e // h), dim=-1) @ v
    return att.transpose(1, 2).reshape(x.shape[0], x.shape[1], e)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_in_proj_and_out_proj_get_grams(batch_first):
    model = AttentionModel(batch_first).eval()
    x = torch.randn(2, 5, 8, generator=gen(5))
    inp = x if batch_first else x.transpose(0, 1)
    with torch.no_grad(), GramCollector(model) as collector:
        model(inp)
    assert set(collector.grams) == {"attn.in_proj_weight", "attn.out_proj.weight", "fc.weight"}
    rows = x.reshape(-1, 8)
    torch.testing.assert_close(collector.grams["attn.in_proj_weight"], rows.T @ rows / 10)
    with torch.no_grad():
        values = manual_attention_values(model.attn, x).reshape(-1, 8)
    torch.testing.assert_close(collector.grams["attn.out_proj.weight"], values.T @ values / 10, atol=1e-5, rtol=1e-5)


def test_regmean_merges_in_proj_weight_with_the_block_input_gram():
    pre = AttentionModel().state_dict()
    fts = perturbed(pre, 2, scale=0.2)
    g = gen(6)
    data = [[torch.randn(3, 4, 8, generator=g)] for _ in range(2)]
    out = merge(pre, fts, method="regmean", model=AttentionModel(), data=data, num_examples=3)
    grams = [(b[0].reshape(-1, 8).T @ b[0].reshape(-1, 8)) / 12 for b in data]
    expected = closed_form(grams, [f["attn.in_proj_weight"] for f in fts], 0.95)
    torch.testing.assert_close(out["attn.in_proj_weight"].double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["attn.in_proj_bias"], (fts[0]["attn.in_proj_bias"] + fts[1]["attn.in_proj_bias"]) / 2)


def test_regmean_incremental_state_resumes():
    pre = two_layer(act=nn.ReLU()).state_dict()
    fts = perturbed(pre, 3)
    g = gen(7)
    data = [[torch.randn(5, 4, generator=g)] for _ in range(3)]
    whole = merge(pre, fts, method="regmean", model=two_layer(act=nn.ReLU()), data=data)
    method = get_method("regmean")
    first = method.create_strategy()
    first.start(pre, MergeContext(module=two_layer(act=nn.ReLU())))
    for i in range(2):
        first.absorb(TaskInput(i, {k: fts[i][k] - pre[k] for k in pre}, batches=data[i]))
    resumed = method.create_strategy()
    resumed.start(pre, MergeContext(module=two_layer(act=nn.ReLU())))
    resumed.load_state_dict(first.state_dict(), 2)
    resumed.absorb(TaskInput(2, {k: fts[2][k] - pre[k] for k in pre}, batches=data[2]))
    for key in whole:
        torch.testing.assert_close(resumed.current()[key], whole[key], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------- RegMean++
def test_regmean_plusplus_uses_the_merged_model_inputs_layer_by_layer():
    pre = two_layer().state_dict()
    fts = perturbed(pre, 2)
    g = gen(8)
    data = [[torch.randn(6, 4, generator=g)] for _ in range(2)]
    out = merge(pre, fts, method="regmean_plusplus", model=two_layer(), data=data, num_examples=6)
    x = [d[0] for d in data]
    w0 = closed_form([xi.T @ xi / 6 for xi in x], [f["0.weight"] for f in fts], 0.95).float()
    b0 = (fts[0]["0.bias"] + fts[1]["0.bias"]) / 2
    torch.testing.assert_close(out["0.weight"], w0, atol=1e-5, rtol=1e-5)
    hidden = [xi @ w0.T + b0 for xi in x]  # the merged first layer feeds the second
    w1 = closed_form([h.T @ h / 6 for h in hidden], [f["1.weight"] for f in fts], 0.95).float()
    torch.testing.assert_close(out["1.weight"], w1, atol=1e-5, rtol=1e-5)
    plain = merge(pre, fts, method="regmean", model=two_layer(), data=data, num_examples=6)
    assert not torch.allclose(plain["1.weight"], out["1.weight"], atol=1e-4)


# ----------------------------------------------------------------- Fisher
def test_fisher_with_identical_fishers_equals_averaging():
    g = gen(9)
    weights = [{"w": torch.randn(3, 2, generator=g), "b": torch.randn(3, generator=g)} for _ in range(3)]
    fisher = {"w": torch.rand(3, 2, generator=g), "b": torch.rand(3, generator=g)}
    out = fisher_weighted_average(weights, [fisher] * 3)
    for key in fisher:
        torch.testing.assert_close(out[key], sum(w[key] for w in weights) / 3)
    # normalisation removes a model-wide scale: 10·F counts as much as F
    scaled = fisher_weighted_average(weights[:2], [fisher, {k: 10 * v for k, v in fisher.items()}], floor=0.0)
    for key in fisher:
        torch.testing.assert_close(scaled[key], (weights[0][key] + weights[1][key]) / 2)
    unnormalised = fisher_weighted_average(weights[:2], [fisher, {k: 10 * v for k, v in fisher.items()}],
                                           normalize=False, floor=0.0)
    torch.testing.assert_close(unnormalised["b"], (weights[0]["b"] + 10 * weights[1]["b"]) / 11)


def test_fisher_exact_estimator_matches_softmax_regression_formula():
    # logits = W x + b: Σ_y p_y (∂ log p_y / ∂W_jk)² = p_j (1 − p_j) x_k²
    pre = nn.Linear(4, 3).state_dict()
    ft = perturbed(pre, 1, scale=0.5)[0]
    x = torch.randn(7, 4, generator=gen(10))
    strategy = get_method("fisher", num_examples=7).create_strategy()
    strategy.start(pre, MergeContext(module=nn.Linear(4, 3)))
    task = TaskInput(0, {k: ft[k] - pre[k] for k in pre}, batches=[x[:4], x[4:]])
    fisher = strategy.fisher_of(task, strategy.task_weights(task))
    p = torch.softmax(x @ ft["weight"].T + ft["bias"], dim=-1)
    torch.testing.assert_close(fisher["weight"], ((p * (1 - p))[:, :, None] * x[:, None, :] ** 2).mean(0))
    torch.testing.assert_close(fisher["bias"], (p * (1 - p)).mean(0))


def test_fisher_merge_weights_each_entry_by_the_models_fishers():
    pre = nn.Linear(4, 3).state_dict()
    fts = perturbed(pre, 2, scale=0.5)
    g = gen(11)
    data = [[torch.randn(8, 4, generator=g)] for _ in range(2)]
    out = merge(pre, fts, method="fisher", model=nn.Linear(4, 3), data=data, num_examples=8)
    fishers = []
    for ft, batches in zip(fts, data):
        p = torch.softmax(batches[0] @ ft["weight"].T + ft["bias"], dim=-1)
        fishers.append({"weight": ((p * (1 - p))[:, :, None] * batches[0][:, None, :] ** 2).mean(0),
                        "bias": (p * (1 - p)).mean(0)})
    expected = fisher_weighted_average(fts, fishers)
    for key in pre:
        torch.testing.assert_close(out[key], expected[key], atol=1e-6, rtol=1e-5)
    batch_estimate = merge(pre, fts, method="fisher", model=nn.Linear(4, 3), data=data, estimator="batch")
    assert not torch.allclose(batch_estimate["weight"], out["weight"], atol=1e-5)


# ----------------------------------------------------------------- AdaMerging
def _ada_setup(n=3, seed=12):
    model = two_layer(act=nn.Tanh())
    pre = model.state_dict()
    fts = perturbed(pre, n, scale=0.5, seed=seed)
    g = gen(seed + 1)
    data = [[torch.randn(8, 4, generator=g)] for _ in range(n)]
    return model, pre, fts, data


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_adamerging_with_frozen_coefficients_is_task_arithmetic(granularity):
    model, pre, fts, data = _ada_setup()
    out = merge(pre, fts, method="adamerging", model=model, data=data, max_steps=0, init_value=0.4,
                granularity=granularity)
    expected = merge(pre, fts, method="task_arithmetic", scaling=0.4)
    for key in pre:
        torch.testing.assert_close(out[key], expected[key], atol=1e-6, rtol=1e-6)


def _entropy_of(model, weights, data):
    from cl_merge.merging._data import entropy

    with torch.no_grad():
        return sum(float(entropy(torch.func.functional_call(model, weights, (d[0],)))) for d in data)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_adamerging_one_step_lowers_the_entropy(granularity):
    model, pre, fts, data = _ada_setup()
    before = merge(pre, fts, method="adamerging", model=model, data=data, max_steps=0, granularity=granularity)
    strategy = get_method("adamerging", max_steps=1, batch_size=8, lr=1e-2, granularity=granularity).create_strategy()
    after = merge_with_strategy(strategy, pre, fts, context=MergeContext(module=model), data=data)
    assert strategy.history[0] == pytest.approx(_entropy_of(model, before, data), rel=1e-5)
    assert _entropy_of(model, after, data) < _entropy_of(model, before, data)
    assert not torch.equal(strategy.coefficients, torch.full_like(strategy.coefficients, 0.3))


def test_adamerging_resume_reuses_the_saved_coefficients(monkeypatch):
    model, pre, fts, data = _ada_setup()
    method = get_method("adamerging", max_steps=3, batch_size=4, lr=1e-2)
    first = method.create_strategy()
    learned = merge_with_strategy(first, pre, fts, context=MergeContext(module=model), data=data)
    state = first.state_dict()
    assert set(state) == {"coefficients"} and state["coefficients"].shape == (3, len(pre))

    rerun = method.create_strategy()
    monkeypatch.setattr(type(rerun), "learn", lambda self, taus: pytest.fail("coefficients learned again"))
    rerun.start(pre, MergeContext(module=model))
    rerun.load_state_dict(state, 3)
    for i, ft in enumerate(fts):
        rerun.absorb(TaskInput(i, {k: ft[k] - pre[k] for k in pre}, batches=data[i]))
    again = rerun.current()
    for key in pre:
        torch.testing.assert_close(again[key], learned[key])
    with pytest.raises(MergeInputError, match="coefficients have shape"):
        rerun.load_state_dict(state, 2)


def test_adamerging_plus_plus_trims_and_elects_signs():
    pre = {"w": torch.zeros(4)}
    taus = [{"w": torch.tensor([3.0, -1.0, 0.5, 2.0])}, {"w": torch.tensor([-1.0, -2.0, 4.0, -0.1])}]
    masked = ties_masked_task_vectors(pre, taus, density=0.5)
    # top-2 of each: {3, 2} and {-2, 4}; elected signs of (3, -2, 4, 2): +, -, +, +
    torch.testing.assert_close(masked[0]["w"], torch.tensor([3.0, 0.0, 0.0, 2.0]))
    torch.testing.assert_close(masked[1]["w"], torch.tensor([0.0, -2.0, 4.0, 0.0]))
    model, pre2, fts, data = _ada_setup()
    out = merge(pre2, fts, method="adamerging", model=model, data=data, max_steps=0, ties_trim=True, density=1.0)
    plain = merge(pre2, fts, method="adamerging", model=model, data=data, max_steps=0)
    assert not torch.allclose(out["0.weight"], plain["0.weight"])  # sign election drops disagreeing entries


# ----------------------------------------------------------------- Surgery
def test_surgery_adapters_start_as_identity_and_training_lowers_the_l1_gap():
    model, pre, fts, data = _ada_setup()
    base = merge(pre, fts, method="task_arithmetic", scaling=0.3)
    frozen = merge(pre, fts, method="surgery", model=model, data=data, steps=0, base_method="task_arithmetic")
    assert isinstance(frozen, SurgeryResult)
    z = torch.randn(5, 3, generator=gen(14))
    torch.testing.assert_close(frozen.wrap_head(1, None)(z), z)
    for key in pre:
        torch.testing.assert_close(frozen.task_state_dict(2)[key], base[key])

    strategy = get_method("surgery", steps=30, batch_size=8, lr=1e-2, rank=4,
                          base_method="task_arithmetic").create_strategy()
    result = merge_with_strategy(strategy, pre, fts, context=MergeContext(module=model), data=data)
    assert strategy.history[-1] < strategy.history[0]
    head = nn.Linear(3, 2)
    wrapped = result.wrap_head(0, head)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(z), head(result.adapt(0, z)))
    state = strategy.state_dict()
    resumed = get_method("surgery", steps=30, batch_size=8, lr=1e-2, rank=4,
                         base_method="task_arithmetic").create_strategy()
    resumed.start(pre, MergeContext(module=model))
    for i, ft in enumerate(fts):
        resumed.absorb(TaskInput(i, {k: ft[k] - pre[k] for k in pre}, batches=data[i]))
    resumed.load_state_dict(state, 3)
    again = resumed.current()
    with torch.no_grad():
        torch.testing.assert_close(again.adapt(2, z), result.adapt(2, z))


def test_surgery_refuses_a_base_method_that_learns_on_training_data():
    with pytest.raises(HyperparameterError, match="train"):
        get_method("surgery", base_method="regmean").create_strategy()
    with pytest.raises(ClMergeError, match="unknown"):
        get_method("surgery", base_method="nope")


# ----------------------------------------------------------------- batches
def test_take_examples_and_cycle_batches():
    batches = [torch.arange(3), torch.arange(3, 6), torch.arange(6, 9)]
    assert len(list(take_examples(batches, 4))) == 2
    assert len(list(take_examples(batches, 3))) == 1
    with pytest.warns(UserWarning, match="fewer than num_examples"):
        assert len(list(take_examples(batches, 100))) == 3
    stream = cycle_batches([(b, b * 10) for b in batches], 4)
    first, second, third = next(stream), next(stream), next(stream)
    torch.testing.assert_close(first[0], torch.tensor([0, 1, 2, 3]))
    torch.testing.assert_close(second[1], torch.tensor([40, 50, 60, 70]))
    torch.testing.assert_close(third[0], torch.tensor([8, 0, 1, 2]))


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize("method", ["regmean", "regmean_plusplus", "fisher", "adamerging", "surgery"])
def test_data_based_methods_name_what_is_missing(method):
    pre = two_layer().state_dict()
    fts = perturbed(pre, 2)
    data = [[torch.randn(4, 4)]] * 2
    with pytest.raises(MergeInputError, match="needs a model"):
        merge(pre, fts, method=method, data=data)
    with pytest.raises(MergeInputError, match="needs calibration data"):
        merge(pre, fts, method=method, model=two_layer())
    with pytest.raises(MergeInputError, match=r"data has batches for 1 task\(s\) but 2"):
        merge(pre, fts, method=method, model=two_layer(), data=data[:1])
    with pytest.raises(MergeInputError, match=r"model's '0.weight' has shape \[6, 4\]"):
        merge(pre, fts, method=method, model=two_layer(d_hidden=6), data=data)
    with pytest.raises(MergeInputError, match="model's state dict does not match"):
        merge(pre, fts, method=method, model=two_layer(act=nn.Linear(5, 5)), data=data)
    with pytest.raises(MergeInputError, match="the data is empty"):
        merge(pre, fts, method=method, model=two_layer(), data=[[], []])


def test_data_free_method_refuses_data_and_model():
    pre = two_layer().state_dict()
    with pytest.raises(MergeInputError, match="data-free"):
        merge(pre, perturbed(pre, 2), method="task_arithmetic", data=[[torch.randn(2, 4)]] * 2)
    with pytest.raises(MergeInputError, match="data-free"):
        merge(pre, perturbed(pre, 2), method="ties", model=two_layer())


def test_task_vector_of_the_wrong_shape_is_named():
    pre = two_layer().state_dict()
    fts = perturbed(pre, 2)
    fts[1]["1.weight"] = torch.zeros(3, 6)
    with pytest.raises(MergeInputError, match="1.weight"):
        merge(pre, fts, method="regmean", model=two_layer(), data=[[torch.randn(4, 4)]] * 2)


@pytest.mark.parametrize("method, hparams", [("regmean", {"num_examples": 0}),
                                             ("regmean", {"reduce_non_diagonal_ratio": 1.5}),
                                             ("fisher", {"estimator": "sampled"}),
                                             ("adamerging", {"granularity": "block"}),
                                             ("adamerging", {"lr": 0}),
                                             ("surgery", {"rank": 0})])
def test_bad_hyperparameters(method, hparams):
    with pytest.raises(HyperparameterError):
        get_method(method, **hparams)


def test_merge_output_does_not_alias_or_mutate_inputs():
    pre = two_layer().state_dict()
    fts = perturbed(pre, 2)
    copies = [{k: v.clone() for k, v in sd.items()} for sd in [pre] + fts]
    data = [[torch.randn(4, 4)]] * 2
    for method in ("regmean", "fisher", "adamerging"):
        out = merge(pre, fts, method=method, model=two_layer(), data=data, **({"max_steps": 1} if method == "adamerging" else {}))
        out["0.weight"].add_(1.0)
    for original, copy in zip([pre] + fts, copies):
        for key in copy:
            assert torch.equal(original[key], copy[key])


@pytest.mark.parametrize("method, hparams", [("fisher", {}), ("adamerging", {"max_steps": 2, "batch_size": 4})])
def test_heads_from_the_task_or_the_context_give_the_same_merge(method, hparams):
    encoder = nn.Linear(4, 5)
    pre = encoder.state_dict()
    fts = perturbed(pre, 2)
    heads = [nn.Linear(5, 3), nn.Linear(5, 2)]
    data = [[torch.randn(4, 4, generator=gen(16))] for _ in range(2)]
    results = []
    for via_context in (True, False):
        strategy = get_method(method, **hparams).create_strategy()
        strategy.start(pre, MergeContext(module=encoder, heads=heads if via_context else None))
        for i, ft in enumerate(fts):
            strategy.absorb(TaskInput(i, {k: ft[k] - pre[k] for k in pre}, batches=data[i],
                                      head=None if via_context else heads[i]))
        results.append(strategy.current())
    for key in pre:
        torch.testing.assert_close(results[0][key], results[1][key])
    headless = merge(pre, fts, method=method, model=encoder, data=data, **hparams)
    assert not torch.allclose(headless["weight"], results[0]["weight"])


@pytest.mark.parametrize("name,hparams,phrase", [
    ("fisher", {"num_examples": 4}, "the Fishers are computed"),
    ("regmean", {"num_examples": 4}, "the Gram matrices are computed"),
    ("regmean_plusplus", {"num_examples": 4}, "the Gram matrices are computed"),
    ("adamerging", {"max_steps": 1}, "the coefficients are learned"),
    ("surgery", {"steps": 1, "base_hyperparameters": {"max_steps": 1}}, "the adapters are trained"),
])
def test_data_based_current_refuses_overrides_and_starts_at_theta0(name, hparams, phrase):
    model = two_layer(act=nn.Tanh())
    pre = {k: v.detach().clone() for k, v in model.state_dict().items()}
    strategy = get_method(name, **hparams).create_strategy()
    strategy.start(pre, MergeContext(module=model))
    before = strategy.current()
    assert all(torch.equal(before[k], pre[k]) for k in pre)  # nothing absorbed: θ0
    tv = perturbed(pre, 1)[0]
    strategy.absorb(TaskInput(0, {k: tv[k] - pre[k] for k in pre}, batches=[torch.randn(4, 4, generator=gen(3))]))
    first = next(iter(strategy.method.hparam_names()))
    with pytest.raises(HyperparameterError, match=f"cannot change once {phrase}"):
        strategy.current(**{first: getattr(strategy.method, first)})  # even a valid value
    with pytest.raises(HyperparameterError, match="unknown hyperparameter 'nonsense'"):
        strategy.current(nonsense=1)
