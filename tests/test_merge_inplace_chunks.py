"""The engine's in-place chunked path for entry-wise sums (task arithmetic,
averaging): tensors larger than one chunk are merged slice by slice into the
output, the finiteness check folded into the chunks."""

import pytest
import torch

import cl_merge
from cl_merge.errors import MergeInputError
from cl_merge.merging import base as engine

BIG = (700, 1000)  # 700k entries: two chunks of the in-place path


def models(num=3, shape=BIG, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pre = {"w": torch.randn(shape, generator=gen).to(dtype), "b": torch.randn(5, generator=gen).to(dtype)}
    fts = [{k: (v.float() + 1e-2 * torch.randn(v.shape, generator=gen)).to(dtype) for k, v in pre.items()}
           for _ in range(num)]
    return pre, fts


def sequential_sum(pre, fts, key):
    total = fts[0][key] - pre[key]
    for ft in fts[1:]:
        total = total + (ft[key] - pre[key])
    return total


def test_big_tensor_is_chunked():
    assert BIG[0] * BIG[1] > engine.MergeMethod.into_chunk


@pytest.mark.parametrize("device", [None, "cpu"])
def test_task_arithmetic_chunked_equals_sequential_formula(device):
    pre, fts = models()
    out = cl_merge.merge(pre, fts, "task_arithmetic", scaling=0.3, device=device)
    for key in pre:
        assert torch.equal(out[key], sequential_sum(pre, fts, key) * 0.3 + pre[key]), key


def test_average_chunked_equals_sequential_formula():
    pre, fts = models(num=4)
    out = cl_merge.merge(pre, fts, "average")
    for key in pre:
        assert torch.equal(out[key], sequential_sum(pre, fts, key) / 4 + pre[key]), key


def test_chunked_batch_equals_incremental():
    pre, fts = models()
    batch = cl_merge.merge(pre, fts, "task_arithmetic", scaling=0.7)
    merger = cl_merge.merging.incremental_merger(pre, "task_arithmetic", scaling=0.7)
    for ft in fts:
        merger.update_finetuned(ft)
    for key in pre:
        assert torch.equal(batch[key], merger.current()[key]), key


def test_nan_in_a_later_chunk_names_the_input():
    pre, fts = models()
    fts[1]["w"].view(-1)[engine.MergeMethod.into_chunk + 17] = float("nan")
    with pytest.raises(MergeInputError, match=r"NaN in tensor 'w' of fine-tuned model 1"):
        cl_merge.merge(pre, fts, "task_arithmetic")


def test_inf_in_the_pretrained_model_is_refused():
    pre, fts = models()
    pre["w"].view(-1)[-1] = float("inf")
    with pytest.raises(MergeInputError, match=r"Inf in tensor 'w' of the pretrained model"):
        cl_merge.merge(pre, fts, "average")


def test_overflow_from_finite_inputs_is_refused():
    pre = {"w": torch.zeros(BIG)}
    fts = [{"w": torch.zeros(BIG)} for _ in range(2)]
    for ft in fts:
        ft["w"].view(-1)[engine.MergeMethod.into_chunk + 3] = 3e38  # each finite; their sum is not
    with pytest.raises(MergeInputError, match=r"merging 'w' produced NaN/Inf from finite inputs"):
        cl_merge.merge(pre, fts, "task_arithmetic", scaling=1.0)


def test_half_output_overflow_is_refused_after_the_cast():
    pre, fts = models(num=2, dtype=torch.float16)
    for ft in fts:
        ft["w"].view(-1)[engine.MergeMethod.into_chunk + 5] = 40000.0  # fp16 max is 65504
    with pytest.raises(MergeInputError, match=r"merged tensor 'w' overflows torch.float16"):
        cl_merge.merge(pre, fts, "task_arithmetic", scaling=1.0)


def test_check_finite_off_lets_nan_through():
    pre, fts = models(num=2)
    fts[0]["w"].view(-1)[engine.MergeMethod.into_chunk + 1] = float("nan")
    out = cl_merge.merge(pre, fts, "task_arithmetic", check_finite=False)
    assert torch.isnan(out["w"].view(-1)[engine.MergeMethod.into_chunk + 1])
    assert int(torch.isnan(out["w"]).sum()) == 1


def test_inputs_untouched_and_empty_tensor():
    pre, fts = models(num=2)
    pre["e"] = torch.zeros(0, 3)
    for ft in fts:
        ft["e"] = torch.zeros(0, 3)
    before = [{k: v.clone() for k, v in sd.items()} for sd in [pre, *fts]]
    out = cl_merge.merge(pre, fts, "task_arithmetic")
    assert out["e"].shape == (0, 3)
    for original, sd in zip(before, [pre, *fts]):
        assert all(torch.equal(original[k], sd[k]) for k in sd)


def test_scratch_buffer_is_reused_across_chunks_and_follows_the_dtype():
    from cl_merge.merging.task_arithmetic import ScratchBuffer, sum_of_differences

    scratch = ScratchBuffer()
    first = scratch.like(torch.empty(10, 4))
    smaller = scratch.like(torch.empty(3, 5))
    assert smaller.shape == (3, 5) and smaller.data_ptr() == first.data_ptr()
    larger = scratch.like(torch.empty(100))
    assert larger.numel() == 100
    double = scratch.like(torch.empty(4, dtype=torch.float64))
    assert double.dtype == torch.float64 and double.shape == (4,)
    # the scratch only holds each τ_t: the sum is the same bits with or without it
    pre, fts = models(num=4, shape=(300, 7))
    weights = [ft["w"] for ft in fts]
    assert torch.equal(sum_of_differences(weights, pre["w"], scratch=scratch),
                       sum_of_differences(weights, pre["w"]))


def test_magmax_chunked_equals_the_papers_rule_and_its_incremental_form():
    pre, fts = models(num=4, seed=7)
    # exact ties in magnitude with opposite signs: the later task (2) wins
    pre["w"][0, :3] = 0.0
    for ft, value in zip(fts, (0.125, 0.25, -0.25, 0.0)):
        ft["w"][0, :3] = value
    batch = cl_merge.merge(pre, fts, "magmax", scaling=0.5)
    merger = cl_merge.merging.incremental_merger(pre, "magmax", scaling=0.5)
    for ft in fts:
        merger.update_finetuned(ft)
    for key in pre:
        taus = torch.stack([ft[key] - pre[key] for ft in fts])
        # argmax of |τ| taking the last of equal magnitudes
        last = taus.shape[0] - 1 - taus.abs().flip(0).argmax(0)
        expected = pre[key] + 0.5 * taus.gather(0, last.unsqueeze(0)).squeeze(0)
        assert torch.equal(batch[key], expected), key
        assert torch.equal(batch[key], merger.current()[key]), key
    assert torch.equal(batch["w"][0, :3], torch.full((3,), -0.125))
