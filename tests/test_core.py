"""Core: task-vector arithmetic, key patterns, dtypes, checkpoint I/O and
every bad-input case of the merge engine (error type + the key/file named)."""

from __future__ import annotations

import json
import math
import os
import pickle

import pytest
import torch

import cl_merge
from cl_merge import TaskVector, merge
from cl_merge.core.io import load_state_dict, open_checkpoint, save_state_dict
from cl_merge.core.state_dict import make_filter
from cl_merge.core.task_vector import cosine_similarity_matrix, sign_conflict_fraction, sign_conflict_matrix
from cl_merge.errors import CheckpointError, HyperparameterError, MergeInputError, UnknownNameError


def T(values):
    return torch.tensor(values, dtype=torch.float32)


@pytest.fixture
def models():
    """A pretrained model with a LayerNorm-like vector, a matrix and an int buffer,
    and two fine-tuned models with hand-checkable deltas."""
    pre = {"w": T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), "b": T([0.0, 0.0]), "steps": torch.tensor(7)}
    ft_a = {"w": T([[2.0, 2.0, 3.0], [4.0, 5.0, 4.0]]), "b": T([1.0, 0.0]), "steps": torch.tensor(7)}
    ft_b = {"w": T([[0.0, 3.0, 3.0], [4.0, 5.0, 7.0]]), "b": T([1.0, -1.0]), "steps": torch.tensor(7)}
    return pre, ft_a, ft_b


# ----------------------------------------------------------------- TaskVector arithmetic
def test_task_vector_from_state_dicts_has_float_deltas_only(models):
    pre, ft_a, _ = models
    tv = TaskVector.from_state_dicts(pre, ft_a)
    assert set(tv) == {"w", "b"}  # the int buffer is not part of a task vector
    # w: ft_a − pre = [[1,0,0],[0,0,−2]]
    assert torch.equal(tv["w"], T([[1.0, 0.0, 0.0], [0.0, 0.0, -2.0]]))
    assert torch.equal(tv["b"], T([1.0, 0.0]))


def test_task_vector_add_sub_neg_scale(models):
    pre, ft_a, ft_b = models
    a = TaskVector.from_state_dicts(pre, ft_a)  # w [[1,0,0],[0,0,-2]], b [1,0]
    b = TaskVector.from_state_dicts(pre, ft_b)  # w [[-1,1,0],[0,0,1]], b [1,-1]
    assert torch.equal((a + b)["w"], T([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0]]))
    assert torch.equal((a - b)["b"], T([0.0, 1.0]))
    assert torch.equal((-a)["w"], T([[-1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]))
    assert torch.equal((2 * a)["b"], T([2.0, 0.0]))
    assert torch.equal((a / 2)["w"], T([[0.5, 0.0, 0.0], [0.0, 0.0, -1.0]]))
    assert torch.equal(sum([a, b])["b"], T([2.0, -1.0]))  # sum() starts from 0


def test_task_vector_apply_to_scales_and_copies_buffers(models):
    pre, ft_a, _ = models
    a = TaskVector.from_state_dicts(pre, ft_a)
    out = a.apply_to(pre, scaling=0.5)
    # w = pre + 0.5·[[1,0,0],[0,0,-2]] = [[1.5,2,3],[4,5,5]]
    assert torch.equal(out["w"], T([[1.5, 2.0, 3.0], [4.0, 5.0, 5.0]]))
    assert torch.equal(out["steps"], torch.tensor(7))
    assert torch.equal(pre["w"], T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))  # not mutated


def test_task_vector_apply_to_shape_mismatch_names_key(models):
    pre, ft_a, _ = models
    a = TaskVector.from_state_dicts(pre, ft_a)
    bad = dict(pre, w=torch.zeros(3, 2))
    with pytest.raises(MergeInputError, match="'w'"):
        a.apply_to(bad)


def test_task_vector_norms_and_dot(models):
    pre, ft_a, ft_b = models
    a = TaskVector.from_state_dicts(pre, ft_a)  # entries 1, -2, 1 (rest 0)
    b = TaskVector.from_state_dicts(pre, ft_b)  # entries -1, 1, 1, 1, -1
    assert a.norm() == pytest.approx(math.sqrt(1 + 4 + 1))
    assert a.norm(1) == pytest.approx(4.0)
    assert a.norm(float("inf")) == pytest.approx(2.0)
    # dot: w: 1·(-1) + (-2)·1 = -3; b: 1·1 + 0·(-1) = 1 → -2
    assert a.dot(b) == pytest.approx(-2.0)
    assert a.numel() == 8


def test_cosine_matrix_hand_made():
    x = TaskVector({"p": T([1.0, 0.0])})
    y = TaskVector({"p": T([1.0, 1.0])})
    z = TaskVector({"p": T([0.0, -2.0])})
    cos = cosine_similarity_matrix([x, y, z])
    # cos(x,y)=1/√2, cos(x,z)=0, cos(y,z)=-2/(√2·2)=-1/√2
    s = 1 / math.sqrt(2)
    expected = torch.tensor([[1.0, s, 0.0], [s, 1.0, -s], [0.0, -s, 1.0]], dtype=torch.float64)
    assert torch.allclose(cos, expected)


def test_sign_conflict_matrix_hand_made():
    x = TaskVector({"p": T([1.0, -1.0, 2.0, 0.0])})
    y = TaskVector({"p": T([1.0, 1.0, -3.0, 5.0])})
    # entries non-zero in both: 0,1,2; signs differ at 1 and 2 → 2/3
    m = sign_conflict_matrix([x, y])
    assert m[0, 1].item() == pytest.approx(2 / 3)
    assert m[0, 0].item() == 0.0
    # entries with opposite non-zero signs somewhere: 1 and 2 of 4
    assert sign_conflict_fraction([x, y]) == pytest.approx(0.5)


def test_task_vector_different_keys_named():
    x = TaskVector({"p": T([1.0]), "q": T([1.0])})
    y = TaskVector({"p": T([1.0]), "r": T([1.0])})
    with pytest.raises(MergeInputError, match="'q'|'r'"):
        x + y


def test_task_vector_nan_named():
    with pytest.raises(MergeInputError, match="NaN.*'p'"):
        TaskVector({"p": T([1.0, float("nan")])})


def test_task_vector_save_load_round_trip(tmp_path, models):
    pre, ft_a, _ = models
    a = TaskVector.from_state_dicts(pre, ft_a)
    path = a.save(tmp_path / "tv.safetensors")
    b = TaskVector.load(path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert cl_merge.core.task_vector.is_task_vector_file(path)


# ----------------------------------------------------------------- key patterns
def test_include_exclude_globs_and_regexes(models):
    pre, ft_a, ft_b = models
    only_w = merge(pre, [ft_a, ft_b], "task_arithmetic", scaling=1.0, include="w")
    assert torch.equal(only_w["b"], pre["b"])  # not merged: copied from pretrained
    # w = pre + Στ = [[1,2,3],[4,5,6]] + [[0,1,0],[0,0,-1]]
    assert torch.equal(only_w["w"], T([[1.0, 3.0, 3.0], [4.0, 5.0, 5.0]]))
    no_w = merge(pre, [ft_a, ft_b], "task_arithmetic", scaling=1.0, exclude=["re:^w$"])
    assert torch.equal(no_w["w"], pre["w"])
    assert torch.equal(no_w["b"], T([2.0, -1.0]))
    f = make_filter(include=["visual.*"], exclude=["re:.*\\.ln_\\d+\\..*"])
    assert f.selects("visual.conv1.weight")
    assert not f.selects("visual.blocks.0.ln_1.weight")
    assert not f.selects("text.proj")


def test_patterns_leaving_nothing_and_bad_regex(models):
    pre, ft_a, _ = models
    with pytest.raises(MergeInputError, match="no entries to merge"):
        merge(pre, [ft_a], include="nothing*")
    with pytest.raises(MergeInputError, match="invalid key pattern"):
        merge(pre, [ft_a], include="re:([")


# ----------------------------------------------------------------- integer buffers, dtypes
def test_integer_buffer_copied_and_mismatch_named(models):
    pre, ft_a, ft_b = models
    out = merge(pre, [ft_a, ft_b])
    assert out["steps"].dtype == torch.int64 and int(out["steps"]) == 7
    bad = dict(ft_b, steps=torch.tensor(8))
    with pytest.raises(MergeInputError, match="'steps'.*fine-tuned model 1"):
        merge(pre, [ft_a, bad])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_round_trip_computes_in_fp32(dtype):
    pre = {"w": torch.tensor([1.0, 256.0, -3.0], dtype=dtype)}
    fts = [{"w": torch.tensor([1.5, 257.0, -3.0], dtype=dtype)}, {"w": torch.tensor([0.5, 257.0, -2.0], dtype=dtype)}]
    out = merge(pre, fts, "task_arithmetic", scaling=0.5)
    assert out["w"].dtype == dtype
    # fp32: 1 + 0.5·(0.5−0.5) = 1; 256 + 0.5·(1+1) = 257; −3 + 0.5·1 = −2.5
    assert torch.equal(out["w"], torch.tensor([1.0, 257.0, -2.5], dtype=dtype))


def test_inputs_not_mutated(models):
    pre, ft_a, ft_b = models
    snapshot = [{k: v.clone() for k, v in sd.items()} for sd in (pre, ft_a, ft_b)]
    for method in cl_merge.available_methods():
        cls = cl_merge.merging.method_class(method)
        if cls.max_models is not None and cls.max_models < 2:
            continue
        try:
            merge(pre, [ft_a, ft_b], method)
        except (MergeInputError, HyperparameterError):
            continue  # e.g. a method that needs more models
    for sd, snap in zip((pre, ft_a, ft_b), snapshot):
        assert all(torch.equal(sd[k], snap[k]) for k in sd)


# ----------------------------------------------------------------- bad inputs to the engine
def test_missing_and_extra_keys_named(models):
    pre, ft_a, _ = models
    missing = {k: v for k, v in ft_a.items() if k != "b"}
    with pytest.raises(MergeInputError, match="fine-tuned model 0.*missing.*'b'"):
        merge(pre, [missing])
    extra = dict(ft_a, extra_head=T([1.0]))
    with pytest.raises(MergeInputError, match="'extra_head'"):
        merge(pre, [ft_a, extra])


def test_shape_mismatch_named(models):
    pre, ft_a, _ = models
    bad = dict(ft_a, w=torch.zeros(3, 2))
    with pytest.raises(MergeInputError, match="shape mismatch for 'w'.*\\[2, 3\\].*\\[3, 2\\]"):
        merge(pre, [ft_a, bad])


@pytest.mark.parametrize("method", ["task_arithmetic", "lines"])
@pytest.mark.parametrize("where", ["pretrained", "finetuned"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_inputs_named(models, method, where, bad):
    pre, ft_a, ft_b = models
    poisoned = {k: v.clone() for k, v in (pre if where == "pretrained" else ft_b).items()}
    poisoned["b"][1] = bad
    args = (poisoned, [ft_a, ft_b]) if where == "pretrained" else (pre, [ft_a, poisoned])
    kind = "NaN" if math.isnan(bad) else "Inf"
    who = "pretrained" if where == "pretrained" else "fine-tuned model 1"
    with pytest.raises(MergeInputError, match=f"{kind} in tensor 'b' of .*{who}"):
        merge(*args, method, **({"num_layers": 1} if method == "lines" else {}))


def test_nonfinite_check_can_be_disabled(models):
    pre, ft_a, _ = models
    poisoned = dict(ft_a, b=T([float("nan"), 0.0]))
    out = merge(pre, [poisoned], check_finite=False)
    assert math.isnan(float(out["b"][0]))


def test_unknown_method_lists_valid_ones(models):
    pre, ft_a, _ = models
    with pytest.raises(UnknownNameError) as info:
        merge(pre, [ft_a], "task_arithmetik")
    message = str(info.value)
    assert "task_arithmetik" in message and "task_arithmetic" in message and "lines" in message


def test_hyperparameter_errors_through_registry():
    with pytest.raises(HyperparameterError, match="lines: beta must be >= 0"):
        cl_merge.get_method("lines", beta=-1)
    with pytest.raises(HyperparameterError, match="unknown hyperparameter 'scale'.*scaling"):
        cl_merge.get_method("task_arithmetic", scale=0.3)
    with pytest.raises(HyperparameterError, match="task_arithmetic: scaling must be a number"):
        cl_merge.get_method("task_arithmetic", scaling="big")


def test_empty_finetuned_list(models):
    pre, _, _ = models
    with pytest.raises(MergeInputError, match="empty"):
        merge(pre, [])


def test_not_a_state_dict(models):
    pre, _, _ = models
    with pytest.raises(MergeInputError, match="fine-tuned model 0 must be a state dict"):
        merge(pre, [[1, 2, 3]])


# ----------------------------------------------------------------- checkpoint I/O
def test_safetensors_round_trip_keeps_dtypes(tmp_path):
    sd = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "h": torch.ones(3, dtype=torch.bfloat16),
          "i": torch.tensor([1, 2], dtype=torch.int64), "m": torch.tensor([True, False])}
    path = save_state_dict(sd, tmp_path / "m.safetensors", {"note": "x"})
    back = load_state_dict(path)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) and back[k].dtype == sd[k].dtype for k in sd)
    assert open_checkpoint(path).metadata["note"] == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left


def test_tied_weights_saved(tmp_path):
    w = torch.ones(2, 2)
    path = save_state_dict({"a": w, "b": w}, tmp_path / "tied.safetensors")
    assert torch.equal(load_state_dict(path)["b"], w)


def _write_sharded(sd, folder, groups):
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_state_dict({k: sd[k] for k in keys}, folder / name)
        weight_map.update({k: name for k in keys})
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def test_sharded_checkpoint_with_index(tmp_path, models):
    pre, _, _ = models
    index = _write_sharded(pre, tmp_path / "sharded", [["w"], ["b", "steps"]])
    for path in (index, index.parent):  # the index json or its folder
        back = load_state_dict(path)
        assert set(back) == set(pre) and all(torch.equal(back[k], pre[k]) for k in pre)


def test_sharded_index_naming_missing_shard(tmp_path, models):
    pre, _, _ = models
    index = _write_sharded(pre, tmp_path / "sharded", [["w"], ["b", "steps"]])
    (index.parent / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        open_checkpoint(index)


def test_lazy_reader_reads_one_tensor_with_metadata(tmp_path, models):
    pre, _, _ = models
    path = save_state_dict(pre, tmp_path / "m.safetensors")
    with open_checkpoint(path) as reader:
        assert sorted(reader.keys()) == ["b", "steps", "w"]
        assert reader.shape("w") == (2, 3) and reader.dtype("w") == torch.float32
        assert reader.dtype("steps") == torch.int64
        assert torch.equal(reader.get("w"), pre["w"])
        with pytest.raises(CheckpointError, match="'nope'"):
            reader.get("nope")


def test_merge_from_lazy_readers_equals_in_memory(tmp_path, models):
    pre, ft_a, ft_b = models
    paths = [save_state_dict(sd, tmp_path / f"{n}.safetensors") for n, sd in (("p", pre), ("a", ft_a), ("b", ft_b))]
    readers = [open_checkpoint(p) for p in paths]
    lazy = merge(readers[0], readers[1:], "lines", num_layers=1)
    eager = merge(pre, [ft_a, ft_b], "lines", num_layers=1)
    assert all(torch.equal(lazy[k], eager[k]) for k in eager)


def test_missing_file_named(tmp_path):
    with pytest.raises(CheckpointError, match="nothere.safetensors"):
        open_checkpoint(tmp_path / "nothere.safetensors")


def test_truncated_safetensors_named(tmp_path, models):
    pre, _, _ = models
    path = save_state_dict(pre, tmp_path / "cut.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        open_checkpoint(path)


def test_corrupt_header_named(tmp_path, models):
    pre, _, _ = models
    path = save_state_dict(pre, tmp_path / "bad.safetensors")
    data = bytearray(path.read_bytes())
    data[8:12] = b"\x00\xff{["  # break the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        open_checkpoint(path)
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="tiny.safetensors"):
        open_checkpoint(tmp_path / "tiny.safetensors")


class _RunsCode:
    """Unpickling this calls os.system: a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        torch.save({"w": torch.ones(2), "payload": _RunsCode(marker)}, handle)
    with pytest.raises(CheckpointError, match="evil.pt"):
        open_checkpoint(path)
    assert not marker.exists()
    # a raw pickle file (not a torch zip) is refused too
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(CheckpointError, match="raw.pt"):
        open_checkpoint(raw)
    assert not marker.exists()


def test_plain_tensor_dict_pt_loads(tmp_path, models):
    pre, _, _ = models
    path = tmp_path / "plain.pt"
    torch.save(pre, path)
    back = load_state_dict(path)
    assert all(torch.equal(back[k], pre[k]) for k in pre)
    torch.save({"state_dict": pre, "epoch": 3}, tmp_path / "lightning.ckpt")
    assert set(load_state_dict(tmp_path / "lightning.ckpt")) == set(pre)


def test_pt_holding_a_non_tensor_named(tmp_path):
    torch.save({"w": torch.ones(1), "lr": 0.1}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match="'lr'"):
        open_checkpoint(tmp_path / "mixed.pt")


# ----------------------------------------------------------------- engine fast paths
def test_chunked_elementwise_merge_equals_formula():
    """Entries larger than the engine's chunk are merged chunk by chunk for entry-wise methods."""
    from cl_merge.merging import base as engine

    g = torch.Generator().manual_seed(0)
    n = 2 * engine._CHUNK + 1234
    pre = {"big": torch.randn(n, 1, generator=g), "small": torch.randn(3, generator=g)}
    fts = [{k: v + torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(3)]
    out = merge(pre, fts, "task_arithmetic", scaling=0.3)
    for key in pre:
        expected = pre[key] + 0.3 * sum(ft[key] - pre[key] for ft in fts)
        assert out[key].shape == pre[key].shape
        assert torch.allclose(out[key], expected, atol=1e-5)
    avg = merge(pre, fts, "average")
    assert torch.allclose(avg["big"], sum(ft["big"] for ft in fts) / 3, atol=1e-5)


def test_lazy_finite_check_survives_sum_overflow():
    """Finite entries whose sum overflows float32 are not mistaken for NaN/Inf."""
    pre = {"w": torch.full((4,), 3e38)}
    out = merge(pre, [{"w": torch.full((4,), 3e38)}], "task_arithmetic", scaling=1.0)
    assert torch.equal(out["w"], pre["w"])
