"""TALL masks, Consensus, EMR, TSV-M, Iso-C and Iso-CTS: hand-computed cases,
properties, incremental == batch, dtypes, validation."""

import math

import pytest
import torch

import cl_merge  # noqa: F401  (compat shims first)
from cl_merge.errors import HyperparameterError
from cl_merge.merging import IncrementalMerger, PerTaskMergeResult, get_method, incremental_merger, merge
from cl_merge.merging._masks import pack_masks, unpack_mask
from cl_merge.merging._svd import orthogonalized_merge, polar_factor
from cl_merge.merging.iso import cts_split
from cl_merge.merging.tall_masks import tall_mask

T = torch.tensor


def finetuned_from(pre, task_vectors):
    return [{k: pre[k] + tv[k] if k in tv else pre[k].clone() for k in pre} for tv in task_vectors]


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


def random_model(gen, with_buffer=False):
    sd = {
        "visual.conv1.weight": torch.randn(4, 3, 2, 2, generator=gen),  # 4-D kernel: mean
        "visual.class_embedding": torch.randn(5, generator=gen),  # 1-D: mean
        "visual.positional_embedding": torch.randn(3, 5, generator=gen),  # 2-D: matrix
        "visual.attn.weight": torch.randn(6, 5, generator=gen),
        "visual.attn.bias": torch.randn(6, generator=gen),
        "text_projection": torch.randn(5, 4, generator=gen),  # 2-D, excluded: mean
    }
    if with_buffer:
        sd["position_ids"] = torch.arange(4)
    return sd


def random_task_vectors(gen, pre, n):
    return [{k: 0.1 * torch.randn(v.shape, generator=gen) for k, v in pre.items() if v.is_floating_point()}
            for _ in range(n)]


# ------------------------------------------------------------------ TALL masks
TAU1 = T([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]])
TAU2 = T([[2.0, 3.0, -1.0], [-1.0, 1.0, 0.0]])
THETA0 = torch.full((2, 3), 10.0)


def test_tall_masks_hand_computed():
    # τ_MTL = τ1+τ2 = [[3,1,-.5],[2,1,-1]], λ = 0.5
    # m1: |τ1| = [[1,2,.5],[3,0,1]] > .5|τ2| = [[1,1.5,.5],[.5,.5,0]] -> [[F,T,F],[T,F,T]] (ties are off)
    # m2: |τ2| = [[2,3,1],[1,1,0]] > .5|τ1| = [[.5,1,.25],[1.5,0,.5]] -> [[T,T,T],[F,T,F]]
    pre = {"w": THETA0}
    result = merge(pre, finetuned_from(pre, [{"w": TAU1}, {"w": TAU2}]), "tall_masks", tall_lambda=0.5)
    assert isinstance(result, PerTaskMergeResult) and result.num_tasks == 2
    close(result["w"], T([[13.0, 11.0, 9.5], [12.0, 11.0, 9.0]]))  # θ0 + τ_MTL
    close(result.task_state_dict(0)["w"], T([[10.0, 11.0, 10.0], [12.0, 10.0, 9.0]]))
    close(result.task_state_dict(1)["w"], T([[13.0, 11.0, 9.5], [10.0, 11.0, 10.0]]))


def test_tall_masks_scaling_scales_the_multitask_vector_and_the_mask():
    # scaling 0.5: τ_MTL = [[1.5,.5,-.25],[1,.5,-.5]]; λ = 1
    # m1: |τ1| > |τ_MTL − τ1| = [[.5,2.5,.75],[2,.5,.5]] -> [[T,F,F],[T,F,T]]
    pre = {"w": torch.zeros(2, 3)}
    result = merge(pre, finetuned_from(pre, [{"w": TAU1}, {"w": TAU2}]), "tall_masks", tall_lambda=1.0, scaling=0.5)
    close(result["w"], T([[1.5, 0.5, -0.25], [1.0, 0.5, -0.5]]))
    close(result.task_state_dict(0)["w"], T([[1.5, 0.0, 0.0], [1.0, 0.0, -0.5]]))


def test_tall_lambda_zero_keeps_every_nonzero_entry_of_the_task():
    gen = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(4, 5, generator=gen)}
    tvs = [{"w": torch.randn(4, 5, generator=gen) * (torch.rand(4, 5, generator=gen) > 0.5)} for _ in range(3)]
    result = merge(pre, finetuned_from(pre, tvs), "tall_masks", tall_lambda=0.0)
    for t, tv in enumerate(tvs):
        expected = torch.where(tv["w"] != 0, result["w"], pre["w"])
        assert torch.equal(result.task_state_dict(t)["w"], expected)


def test_tall_lambda_per_task_list():
    pre = {"w": torch.zeros(2, 3)}
    fts = finetuned_from(pre, [{"w": TAU1}, {"w": TAU2}])
    mixed = merge(pre, fts, "tall_masks", tall_lambda=[0.5, 1.0])
    low = merge(pre, fts, "tall_masks", tall_lambda=0.5)
    high = merge(pre, fts, "tall_masks", tall_lambda=1.0)
    assert torch.equal(mixed.task_state_dict(0)["w"], low.task_state_dict(0)["w"])
    assert torch.equal(mixed.task_state_dict(1)["w"], high.task_state_dict(1)["w"])
    with pytest.raises(HyperparameterError, match="tall_lambda lists 3 values for 2"):
        merge(pre, fts, "tall_masks", tall_lambda=[0.5, 0.5, 0.5])


def test_per_task_result_api_and_buffers():
    gen = torch.Generator().manual_seed(1)
    pre = random_model(gen, with_buffer=True)
    fts = finetuned_from(pre, random_task_vectors(gen, pre, 3))
    for method in ("tall_masks", "emr"):
        result = merge(pre, fts, method)
        assert list(result) == list(pre) and len(result) == len(pre)
        assert torch.equal(result["position_ids"], pre["position_ids"])
        task = result.task_state_dict(2)
        assert list(task) == list(pre) and torch.equal(task["position_ids"], pre["position_ids"])
        for bad in (3, -1):
            with pytest.raises(IndexError, match="out of range for 3 tasks"):
                result.task_state_dict(bad)


def test_tall_masks_single_task_retrieves_the_finetuned_model():
    # one task: τ_MTL = τ, |τ_MTL − τ| = 0, the mask is τ ≠ 0 and θ_1 comes back
    gen = torch.Generator().manual_seed(2)
    pre = random_model(gen)
    fts = finetuned_from(pre, random_task_vectors(gen, pre, 1))
    result = merge(pre, fts, "tall_masks")
    for key in pre:
        close(result.task_state_dict(0)[key], fts[0][key])


# ------------------------------------------------------------------ consensus
def test_consensus_hand_computed():
    # τ1=[1,2,0,-1], τ2=[1,-2,3,0], τ3=[1,1,0,4]; Σ=[3,1,3,3]; λ=0.5
    # m1: [1,2,0,1] > .5·[2,1,3,4]=[1,.5,1.5,2] -> [F,T,F,F]
    # m2: [1,2,3,0] > .5·[2,3,0,3]=[1,1.5,0,1.5] -> [F,T,T,F]
    # m3: [1,1,0,4] > .5·[2,3,3,1]=[1,1.5,1.5,.5] -> [F,F,F,T]
    # votes = [0,2,1,1]
    pre = {"b": torch.zeros(4)}
    tvs = [{"b": T([1.0, 2.0, 0.0, -1.0])}, {"b": T([1.0, -2.0, 3.0, 0.0])}, {"b": T([1.0, 1.0, 0.0, 4.0])}]
    fts = finetuned_from(pre, tvs)
    two = merge(pre, fts, "consensus", tall_lambda=0.5, min_agreement=2, scaling=0.5)
    close(two["b"], T([0.0, 0.5, 0.0, 0.0]))  # 0.5 · [0,1,0,0]
    one = merge(pre, fts, "consensus", tall_lambda=0.5, min_agreement=1, scaling=0.5)
    close(one["b"], T([0.0, 0.5, 1.5, 1.5]))  # 0.5 · [0,1,3,3]


def test_consensus_limits():
    gen = torch.Generator().manual_seed(3)
    pre = random_model(gen)
    tvs = random_task_vectors(gen, pre, 3)
    fts = finetuned_from(pre, tvs)
    ta = merge(pre, fts, "task_arithmetic", scaling=0.4)
    none_removed = merge(pre, fts, "consensus", min_agreement=0, scaling=0.4)
    all_removed = merge(pre, fts, "consensus", min_agreement=4, scaling=0.4)
    any_mask = merge(pre, fts, "consensus", min_agreement=1, scaling=0.4, tall_lambda=0.3)
    for key in pre:
        close(none_removed[key], ta[key])
        assert torch.equal(all_removed[key], pre[key])
        # k = 1: task arithmetic restricted to the union of the TALL masks
        deltas = [ft[key] - pre[key] for ft in fts]
        total = sum(deltas[1:], deltas[0].clone())
        union = torch.zeros_like(total, dtype=torch.bool)
        for d in deltas:
            union |= tall_mask(d, total, 0.3)
        close(any_mask[key], pre[key] + 0.4 * total * union)


# ------------------------------------------------------------------ EMR
def test_emr_hand_computed():
    # τ1=[2,-1,1,0], τ2=[-1,-3,-1,5]; Σ=[1,-4,0,5] -> sign [+,-,-(zero sum),+]
    # m1=[T,T,F,F], m2=[F,T,T,T]; |τ_uni| = [2,3,1,5] -> τ_uni=[2,-3,-1,5]
    # λ1 = (2+1+1+0)/(2+3) = 0.8; λ2 = (1+3+1+5)/(3+1+5) = 10/9
    pre = {"b": torch.ones(4)}
    fts = finetuned_from(pre, [{"b": T([2.0, -1.0, 1.0, 0.0])}, {"b": T([-1.0, -3.0, -1.0, 5.0])}])
    result = merge(pre, fts, "emr")
    close(result["b"], T([3.0, -2.0, 0.0, 6.0]))  # θ0 + τ_uni
    close(result.task_state_dict(0)["b"], T([1 + 0.8 * 2, 1 - 0.8 * 3, 1.0, 1.0]))
    close(result.task_state_dict(1)["b"], T([1.0, 1 - 30 / 9, 1 - 10 / 9, 1 + 50 / 9]))


def test_emr_rescalers_are_model_wide():
    # two entries; λ_t sums over both, not per tensor:
    # a: τ1=[4], τ2=[-1] -> Σ=3 (+), τ_uni=4, m1=T, m2=F
    # b: τ1=[1,1], τ2=[2,2] -> τ_uni=[2,2], m1=m2=T
    # λ1 = (4+2)/(4+4) = 0.75; λ2 = (1+4)/(4) = 1.25
    pre = {"a": torch.zeros(1), "b": torch.zeros(2)}
    fts = finetuned_from(pre, [{"a": T([4.0]), "b": T([1.0, 1.0])}, {"a": T([-1.0]), "b": T([2.0, 2.0])}])
    result = merge(pre, fts, "emr")
    close(result.task_state_dict(0)["a"], T([3.0]))
    close(result.task_state_dict(0)["b"], T([1.5, 1.5]))
    close(result.task_state_dict(1)["a"], T([0.0]))
    close(result.task_state_dict(1)["b"], T([2.5, 2.5]))


def test_emr_single_task_retrieves_the_finetuned_model():
    gen = torch.Generator().manual_seed(4)
    pre = random_model(gen)
    fts = finetuned_from(pre, random_task_vectors(gen, pre, 1))
    task = merge(pre, fts, "emr").task_state_dict(0)
    for key in pre:
        close(task[key], fts[0][key])


def test_emr_task_that_keeps_nothing_gets_the_pretrained_model():
    # τ2 disagrees with the elected sign everywhere: its model is θ0 (rescaler 1, no division by 0)
    pre = {"b": torch.ones(2)}
    fts = finetuned_from(pre, [{"b": T([5.0, 5.0])}, {"b": T([-1.0, -1.0])}])
    task = merge(pre, fts, "emr").task_state_dict(1)
    assert torch.equal(task["b"], pre["b"])


# ------------------------------------------------------------------ TSV-M
def test_tsv_orthogonal_rank_one_tasks_give_the_sum():
    # τ1 = diag(2,0), τ2 = diag(0,4): k = 2//2 = 1 triplet each, U=V=I already orthogonal
    pre = {"w": torch.zeros(2, 2)}
    fts = finetuned_from(pre, [{"w": torch.diag(T([2.0, 0.0]))}, {"w": torch.diag(T([0.0, 4.0]))}])
    close(merge(pre, fts, "tsv_m")["w"], T([[2.0, 0.0], [0.0, 4.0]]))
    close(merge(pre, fts, "tsv_m", scaling=0.5)["w"], T([[1.0, 0.0], [0.0, 2.0]]))


def test_tsv_rotated_orthogonal_rank_one_tasks_give_the_sum():
    gen = torch.Generator().manual_seed(5)
    q1, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen))
    q2, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen))
    tvs = [{"w": s * torch.outer(q1[:, i], q2[:, i])} for i, s in enumerate([3.0, 2.0, 0.5])]
    pre = {"w": torch.zeros(5, 4)}
    total = sum(tv["w"] for tv in tvs)
    close(merge(pre, finetuned_from(pre, tvs), "tsv_m")["w"], total)  # k = 4//3 = 1


def test_tsv_more_tasks_than_rank_keeps_one_triplet_each():
    # 2x3, T=3 -> k = max(1, 2//3) = 1. u's = e1, e2, e1; v's = f1, f2, f3.
    # polar([e1 e2 e1]) = (AAᵀ)^-1/2 A = [[1/√2,0,1/√2],[0,1,0]]; polar(V) = I.
    # result = 2·e1f1ᵀ/√2 + 4·e2f2ᵀ + 6·e1f3ᵀ/√2 = [[√2,0,3√2],[0,4,0]]
    e = torch.eye(3)
    tvs = [{"w": 2 * torch.outer(e[0, :2], e[0])}, {"w": 4 * torch.outer(e[1, :2], e[1])},
           {"w": 6 * torch.outer(e[0, :2], e[2])}]
    pre = {"w": torch.zeros(2, 3)}
    r2 = math.sqrt(2)
    close(merge(pre, finetuned_from(pre, tvs), "tsv_m")["w"], T([[r2, 0.0, 3 * r2], [0.0, 4.0, 0.0]]))


def test_tsv_single_task_is_identity():
    gen = torch.Generator().manual_seed(6)
    pre = random_model(gen)
    fts = finetuned_from(pre, random_task_vectors(gen, pre, 1))
    merged = merge(pre, fts, "tsv_m")
    for key in pre:
        close(merged[key], fts[0][key])


def test_svd_methods_non_matrix_entries_take_the_mean():
    gen = torch.Generator().manual_seed(7)
    pre = random_model(gen)
    tvs = random_task_vectors(gen, pre, 3)
    fts = finetuned_from(pre, tvs)
    for method in ("tsv_m", "iso_c", "iso_cts"):
        merged = merge(pre, fts, method, scaling=1.0)
        for key in ("visual.conv1.weight", "visual.class_embedding", "visual.attn.bias", "text_projection"):
            mean = sum(ft[key] - pre[key] for ft in fts) / 3
            close(merged[key], pre[key] + mean)
        # the 2-D positional embedding is decomposed, not averaged
        mean = sum(ft["visual.positional_embedding"] - pre["visual.positional_embedding"] for ft in fts) / 3
        assert not torch.allclose(merged["visual.positional_embedding"], pre["visual.positional_embedding"] + mean)


def test_positional_embedding_is_a_matrix():
    # same numbers as the TSV hand case under a 2-D embedding key: diag(2,4), not the mean diag(1,2)
    pre = {"visual.positional_embedding": torch.zeros(2, 2)}
    tvs = [{"visual.positional_embedding": torch.diag(T([2.0, 0.0]))},
           {"visual.positional_embedding": torch.diag(T([0.0, 4.0]))}]
    close(merge(pre, finetuned_from(pre, tvs), "tsv_m")["visual.positional_embedding"], torch.diag(T([2.0, 4.0])))


# ------------------------------------------------------------------ Iso-C
def test_iso_c_hand_computed():
    # Σ τ = diag(2,4): σ = (4,2), mean 3 -> 3·I; biases: mean ([1,2]+[3,0])/2 = [2,1]
    pre = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    fts = finetuned_from(pre, [{"w": torch.diag(T([2.0, 0.0])), "b": T([1.0, 2.0])},
                               {"w": torch.diag(T([0.0, 4.0])), "b": T([3.0, 0.0])}])
    merged = merge(pre, fts, "iso_c", scaling=1.0)
    close(merged["w"], T([[3.0, 0.0], [0.0, 3.0]]))
    close(merged["b"], T([2.0, 1.0]))
    close(merge(pre, fts, "iso_c")["w"], T([[4.5, 0.0], [0.0, 4.5]]))  # default scaling 1.5


def test_iso_c_fixed_points():
    gen = torch.Generator().manual_seed(8)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen))
    row = torch.randn(1, 5, generator=gen)  # rank 1 with a single singular value
    pre = {"q": torch.zeros(4, 4), "row": torch.zeros(1, 5)}
    merged = merge(pre, finetuned_from(pre, [{"q": 2 * q, "row": row}]), "iso_c", scaling=1.0)
    close(merged["q"], 2 * q)  # equal singular values are already isotropic
    close(merged["row"], row)


def test_iso_c_incremental_equals_batch():
    gen = torch.Generator().manual_seed(9)
    pre = random_model(gen, with_buffer=True)
    fts = finetuned_from(pre, random_task_vectors(gen, pre, 4))
    merger = incremental_merger(pre, "iso_c", scaling=0.7)
    for n, ft in enumerate(fts, start=1):
        merger.update_finetuned(ft)
        batch = merge(pre, fts[:n], "iso_c", scaling=0.7)
        current = merger.current()
        assert list(current) == list(batch)
        for key in pre:
            assert torch.equal(current[key], batch[key]), key


def test_iso_c_incremental_state_round_trip():
    gen = torch.Generator().manual_seed(10)
    pre = random_model(gen)
    fts = finetuned_from(pre, random_task_vectors(gen, pre, 3))
    first = incremental_merger(pre, "iso_c")
    for ft in fts[:2]:
        first.update_finetuned(ft)
    resumed = incremental_merger(pre, "iso_c")
    resumed.load_state_dict(first.state_dict())
    resumed.update_finetuned(fts[2])
    batch = merge(pre, fts, "iso_c")
    for key in pre:
        assert torch.equal(resumed.current()[key], batch[key])


# ------------------------------------------------------------------ Iso-CTS
def test_cts_split():
    assert cts_split(768, 8, 0.8) == (616, 19)  # int(614.4)=614, round(154/8)=19 -> 768−152
    assert cts_split(3, 2, 0.4) == (1, 1)
    assert cts_split(2, 2, 0.8) == (2, 0)  # round(0.5) = 0: all common
    assert cts_split(12, 8, 0.05) == (4, 1)  # round(1.5)=2 would need 16 > 12 dims: lowered to 12//8
    for rank in range(1, 40):
        for tasks in (1, 2, 3, 8, 20):
            for fraction in (0.0, 0.1, 0.5, 0.8, 1.0):
                common, per_task = cts_split(rank, tasks, fraction)
                assert common >= 0 and per_task >= 0 and common + per_task * tasks == rank


def test_iso_cts_hand_computed():
    # τ1 = diag(4,2,1), τ2 = diag(4,0,3); Σ = diag(8,2,4); fraction 0.4 -> 1 common + 1 per task
    # common: e1 (σ 8); residuals diag(0,2,1) -> e2 (σ 2), diag(0,0,3) -> e3 (σ 3)
    # σ -> mean(8,2,3) = 13/3, U = V = I -> 13/3·I   (Iso-C would give mean(8,4,2) = 14/3)
    pre = {"w": torch.zeros(3, 3)}
    fts = finetuned_from(pre, [{"w": torch.diag(T([4.0, 2.0, 1.0]))}, {"w": torch.diag(T([4.0, 0.0, 3.0]))}])
    close(merge(pre, fts, "iso_cts", scaling=1.0, common_space_fraction=0.4)["w"], 13 / 3 * torch.eye(3))
    close(merge(pre, fts, "iso_c", scaling=1.0)["w"], 14 / 3 * torch.eye(3))


def test_iso_cts_reduces_to_iso_c():
    gen = torch.Generator().manual_seed(11)
    pre = random_model(gen)
    tvs = random_task_vectors(gen, pre, 3)
    fts = finetuned_from(pre, tvs)
    iso_c = merge(pre, fts, "iso_c")
    all_common = merge(pre, fts, "iso_cts", common_space_fraction=1.0)
    one_task_c = merge(pre, fts[:1], "iso_c")
    one_task_cts = merge(pre, fts[:1], "iso_cts", common_space_fraction=0.5)
    for key in pre:
        close(all_common[key], iso_c[key], atol=1e-4)
        close(one_task_cts[key], one_task_c[key], atol=1e-4)


# ------------------------------------------------------------------ helpers
def test_polar_factor_and_orthogonalized_merge():
    gen = torch.Generator().manual_seed(12)
    a = torch.randn(6, 3, generator=gen)
    p = polar_factor(a)
    close(p.T @ p, torch.eye(3))
    close(polar_factor(p), p)  # already orthonormal
    wide = polar_factor(a.T)
    close(wide @ wide.T, torch.eye(3))
    q, _ = torch.linalg.qr(a)
    close(orthogonalized_merge(q, T([1.0, 2.0, 3.0]), q.T), q @ torch.diag(T([1.0, 2.0, 3.0])) @ q.T)


def test_packed_masks_round_trip():
    gen = torch.Generator().manual_seed(13)
    masks = [torch.rand(3, 4, generator=gen) > 0.5 for _ in range(11)]  # more than 8: two bytes
    packed = pack_masks(masks)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 4)
    for t, mask in enumerate(masks):
        assert torch.equal(unpack_mask(packed, t), mask)


# ------------------------------------------------------------------ all six
ALL = ["tall_masks", "consensus", "emr", "tsv_m", "iso_c", "iso_cts"]


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_round_trip(method, dtype):
    gen = torch.Generator().manual_seed(14)
    pre32 = random_model(gen, with_buffer=True)
    fts32 = finetuned_from(pre32, random_task_vectors(gen, pre32, 3))
    cast = lambda sd: {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}  # noqa: E731
    pre, fts = cast(pre32), [cast(ft) for ft in fts32]
    result = merge(pre, fts, method)
    reference = merge({k: v.float() if v.is_floating_point() else v for k, v in pre.items()},
                      [{k: v.float() if v.is_floating_point() else v for k, v in ft.items()} for ft in fts], method)
    outputs = [(result, reference)]
    if isinstance(result, PerTaskMergeResult):
        outputs.append((result.task_state_dict(1), reference.task_state_dict(1)))
    for got, want in outputs:
        for key in pre:
            assert got[key].dtype == pre[key].dtype, key
            if pre[key].is_floating_point():
                torch.testing.assert_close(got[key], want[key].to(dtype))  # computed in fp32, rounded once
            else:
                assert torch.equal(got[key], pre[key])


@pytest.mark.parametrize("method", ALL)
def test_inputs_not_mutated_and_deterministic(method):
    gen = torch.Generator().manual_seed(15)
    pre = random_model(gen)
    fts = finetuned_from(pre, random_task_vectors(gen, pre, 3))
    snapshot = [{k: v.clone() for k, v in sd.items()} for sd in [pre, *fts]]
    first = merge(pre, fts, method)
    second = merge(pre, fts, method)
    if isinstance(first, PerTaskMergeResult):
        first, second = first.task_state_dict(0), second.task_state_dict(0)
    for key in pre:
        assert torch.equal(first[key], second[key])
        assert torch.isfinite(first[key]).all()
    for before, after in zip(snapshot, [pre, *fts]):
        for key in before:
            assert torch.equal(before[key], after[key])


@pytest.mark.parametrize("method", ["tall_masks", "consensus", "emr", "tsv_m", "iso_cts"])
def test_not_incremental(method):
    with pytest.raises(HyperparameterError, match="no incremental form"):
        IncrementalMerger(get_method(method), {"w": torch.zeros(2, 2)})


@pytest.mark.parametrize("method, hparams, message", [
    ("tall_masks", {"tall_lambda": -0.1}, "tall_masks: tall_lambda must be >= 0"),
    ("tall_masks", {"tall_lambda": []}, "tall_masks: tall_lambda must be a number or a non-empty list"),
    ("tall_masks", {"tall_lambda": [0.2, "x"]}, "tall_masks: tall_lambda must be a number or a list of numbers"),
    ("tall_masks", {"scaling": "1"}, "tall_masks: scaling must be a number"),
    ("consensus", {"min_agreement": -1}, "consensus: min_agreement must be an integer >= 0"),
    ("consensus", {"min_agreement": 1.5}, "consensus: min_agreement must be an integer, got 1.5"),
    ("consensus", {"min_agreement": True}, "consensus: min_agreement must be an integer, got True"),
    ("consensus", {"tall_lambda": -1}, "consensus: tall_lambda must be >= 0"),
    ("tsv_m", {"scaling": None}, "tsv_m: scaling must be a number"),
    ("iso_c", {"scaling": True}, "iso_c: scaling must be a number"),
    ("iso_cts", {"common_space_fraction": 1.5}, r"iso_cts: common_space_fraction must be in \[0, 1\]"),
    ("iso_cts", {"common_space_fraction": -0.1}, r"iso_cts: common_space_fraction must be in \[0, 1\]"),
    ("emr", {"scaling": 1.0}, "emr: unknown hyperparameter 'scaling'"),
])
def test_hyperparameter_validation(method, hparams, message):
    with pytest.raises(HyperparameterError, match=message):
        get_method(method, **hparams)


def test_defaults():
    assert get_method("tall_masks").hparams() == {"tall_lambda": 0.6, "scaling": 1.0}
    assert get_method("consensus").hparams() == {"tall_lambda": 0.6, "min_agreement": 2, "scaling": 0.3}
    assert get_method("emr").hparams() == {}
    assert get_method("tsv_m").hparams() == {"scaling": 1.0}
    assert get_method("iso_c").hparams() == {"scaling": 1.5}
    assert get_method("iso_cts").hparams() == {"scaling": 1.5, "common_space_fraction": 0.8}
