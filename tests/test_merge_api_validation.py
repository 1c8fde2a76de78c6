"""Python-API and CLI input checks (issue 12: items 2, 3, 7), the correctness
details of issue 10 (empty tensors, Σ(θ_t − θ0), float64, LiNeS towers) and
``device=`` run through the same code path on the CPU."""

from __future__ import annotations

import argparse
import os
import re

import numpy as np
import pytest
import torch

import cl_merge
from conftest import data_free_methods
from cl_merge.cli import merge_cmd
from cl_merge.core.io import load_state_dict, save_state_dict
from cl_merge.errors import CheckpointError, HyperparameterError, MergeInputError
from cl_merge.merging import PerTaskMergeResult, get_method, incremental_merger, merge
from cl_merge.merging.lines import depth_table


def models(num=3, seed=0, dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    pre = {"blocks.0.w": torch.randn(6, 5, generator=g), "blocks.1.w": torch.randn(6, 5, generator=g),
           "blocks.1.b": torch.randn(5, generator=g), "steps": torch.tensor(3)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in pre.items()} for _ in range(num)]
    cast = lambda sd: {k: (v.to(dtype).requires_grad_(requires_grad) if v.is_floating_point() else v)  # noqa: E731
                       for k, v in sd.items()}
    return cast(pre), [cast(ft) for ft in fts]


def hparams_for(method):
    return {"slerp": {}, "model_stock": {}}.get(method, {})


def count_for(method):
    return 2 if method in ("slerp", "model_stock") else 3


# ------------------------------------------------------------------ autograd inputs
@pytest.mark.parametrize("method", data_free_methods())
def test_requires_grad_inputs_merge_to_plain_tensors(method):
    pre, fts = models(count_for(method), requires_grad=True)
    result = merge(pre, fts, method)
    parts = [result]
    if isinstance(result, PerTaskMergeResult):
        parts.append(result.task_state_dict(0))
    for part in parts:
        for key, value in part.items():
            assert not value.requires_grad, (method, key)
            assert value.grad_fn is None


def test_incremental_with_requires_grad_inputs():
    pre, fts = models(2, requires_grad=True)
    merger = incremental_merger(pre, "ties")
    assert not any(v.requires_grad for v in merger.current().values())
    for ft in fts:
        merger.update_finetuned(ft)
    assert not any(v.requires_grad for v in merger.current().values())


# ------------------------------------------------------------------ bad values
@pytest.mark.parametrize("bad, kind", [([1.0, 2.0], "list"), (None, "NoneType"),
                                       (np.zeros(3, dtype=np.float32), "ndarray")])
def test_non_tensor_values_name_the_key(bad, kind):
    pre, fts = models(2)
    fts[1] = dict(fts[1], **{"blocks.1.b": bad})
    with pytest.raises(MergeInputError, match=rf"fine-tuned model 1: entry 'blocks.1.b' is a {kind}, not a torch.Tensor"):
        merge(pre, fts, "task_arithmetic")


def test_meta_tensors_are_refused():
    pre, fts = models(2)
    pre = dict(pre, **{"blocks.0.w": torch.empty(6, 5, device="meta")})
    with pytest.raises(MergeInputError, match="pretrained: entry 'blocks.0.w' is on the meta device"):
        merge(pre, fts, "ties")
    with pytest.raises(MergeInputError, match="meta device"):
        incremental_merger(pre, "task_arithmetic")


def test_one_dict_instead_of_a_list():
    pre, fts = models(1)
    with pytest.raises(MergeInputError, match=r"got a single state dict \(wrap it in a list"):
        merge(pre, fts[0], "task_arithmetic")
    with pytest.raises(MergeInputError, match="missing"):
        merge(pre, None, "task_arithmetic")


@pytest.mark.parametrize("method, hparams, message", [
    ("ties", {"density": "0.2"}, "ties: density must be a number, got '0.2'"),
    ("ties", {"density": True}, "ties: density must be a number, got True"),
    ("task_arithmetic", {"scaling": True}, "task_arithmetic: scaling must be a number, got True"),
    ("task_arithmetic", {"scaling": float("nan")}, "task_arithmetic: scaling must be finite, got nan"),
    ("ties", {"scaling": float("inf")}, "ties: scaling must be finite, got inf"),
    ("dare_ties", {"seed": 1.5}, "dare_ties: seed must be an integer, got 1.5"),
    ("ties", {"topk_scope": 3}, "ties: topk_scope must be a string, got 3"),
    ("lines", {"alpha": float("nan")}, "lines: alpha must be finite"),
    ("lines", {"base_hparams": [1]}, "lines: base_hparams must be a mapping"),
    ("tall_masks", {"tall_lambda": [0.2, float("inf")]}, "tall_masks: tall_lambda must be"),
])
def test_hyperparameter_types_checked_once(method, hparams, message):
    with pytest.raises(HyperparameterError, match=re.escape(message)):
        get_method(method, **hparams)
    pre, fts = models(2)
    with pytest.raises(HyperparameterError, match=re.escape(message)):
        merge(pre, fts, method, **hparams)


def test_integers_are_numbers():
    assert get_method("task_arithmetic", scaling=1).scaling == 1
    assert get_method("ties", density=1).density == 1


# ------------------------------------------------------------------ overflow after the cast
def test_fp16_overflow_is_refused_naming_tensor_and_dtype():
    pre = {"w": torch.full((4,), 60000.0, dtype=torch.float16)}
    fts = [{"w": torch.full((4,), 65000.0, dtype=torch.float16)} for _ in range(2)]
    # θ0 + 1.0·(5000 + 5000) = 70000 > 65504: finite in float32, inf in float16
    for method, hparams in [("task_arithmetic", {}), ("ties", {"density": 1.0, "aggregate": "sum"}),
                            ("dare_task_arithmetic", {"drop_rate": 0.0})]:
        with pytest.raises(MergeInputError, match=r"'w' overflows torch.float16"):
            merge(pre, fts, method, scaling=1.0, **hparams)
    assert torch.isfinite(merge(pre, fts, "task_arithmetic", scaling=0.5)["w"]).all()


# ------------------------------------------------------------------ issue 10 details
@pytest.mark.parametrize("method, hparams", [
    ("ties", {"topk_scope": "per_tensor"}), ("ties", {}), ("dare_ties", {"topk_scope": "per_tensor"}),
    ("breadcrumbs", {}), ("dare_task_arithmetic", {}), ("magmax", {}),
])
def test_empty_tensors_merge(method, hparams):
    pre, fts = models(2)
    pre["empty"] = torch.zeros(0, 5)
    for ft in fts:
        ft["empty"] = torch.zeros(0, 5)
    merged = merge(pre, fts, method, **hparams)
    assert merged["empty"].shape == (0, 5)
    merger = incremental_merger(pre, method, **hparams)
    for ft in fts:
        merger.update_finetuned(ft)
    assert merger.current()["empty"].shape == (0, 5)


@pytest.mark.parametrize("method", ["task_arithmetic", "average", "lines"])
def test_unchanged_finetuned_models_give_theta0_exactly(method):
    g = torch.Generator().manual_seed(1)
    # values whose sum over 3 copies rounds: Σθ_t − 3θ0 would not be 0
    pre = {"blocks.0.w": torch.randn(50, 40, generator=g) * 1e3 + 0.1,
           "blocks.1.w": torch.rand(50, 40, generator=g) * 1e-3 + 7.0}
    fts = [{k: v.clone() for k, v in pre.items()} for _ in range(3)]
    merged = merge(pre, fts, method, **({"scaling": 1.0} if method == "task_arithmetic" else {}))
    for key in pre:
        assert torch.equal(merged[key], pre[key]), key


def test_float64_models_are_merged_in_float64():
    pre = {"w": torch.full((3,), 1.0, dtype=torch.float64)}
    tiny = 1e-12  # far below float32 resolution at 1.0
    fts = [{"w": pre["w"] + tiny * (i + 1)} for i in range(2)]
    for method in ("task_arithmetic", "ties", "tsv_m", "iso_c", "magmax"):
        merged = merge(pre, fts, method, **({} if method in ("tsv_m",) else {"scaling": 1.0}))
        assert merged["w"].dtype == torch.float64
        assert float(merged["w"][0] - 1.0) > 0.5 * tiny, method  # float32 would give exactly 1.0
    merger = incremental_merger(pre, "task_arithmetic", scaling=1.0)
    for ft in fts:
        merger.update_finetuned(ft)
    assert float(merger.current()["w"][0] - 1.0) == pytest.approx(3 * tiny, rel=1e-3)


def test_lines_counts_depth_per_tower():
    keys = [f"visual.transformer.resblocks.{i}.attn.in_proj_weight" for i in range(24)]
    keys += [f"transformer.resblocks.{i}.attn.in_proj_weight" for i in range(12)]
    keys += [f"vision_model.encoder.layers.{i}.mlp.fc1.weight" for i in range(4)]
    keys += [f"text_model.encoder.layers.{i}.mlp.fc1.weight" for i in range(2)]
    keys += ["visual.proj", "text_projection"]
    table = depth_table(keys, re.compile(r"(?:^|\.)(?:resblocks|blocks|layers|layer|h)\.(\d+)\."))
    assert table["visual.transformer.resblocks.23.attn.in_proj_weight"] == (23, 24)
    assert table["transformer.resblocks.11.attn.in_proj_weight"] == (11, 12)
    assert table["vision_model.encoder.layers.3.mlp.fc1.weight"] == (3, 4)
    assert table["text_model.encoder.layers.1.mlp.fc1.weight"] == (1, 2)
    assert table["visual.proj"][0] is None
    # through a merge: the last text block gets alpha + beta, like the last vision block
    pre = {k: torch.zeros(2) for k in ["visual.transformer.resblocks.0.w", "visual.transformer.resblocks.3.w",
                                         "transformer.resblocks.0.w", "transformer.resblocks.1.w"]}
    fts = [{k: torch.ones(2) for k in pre}]
    merged = merge(pre, fts, "lines", alpha=0.1, beta=1.0)
    assert torch.allclose(merged["visual.transformer.resblocks.3.w"], torch.full((2,), 1.1))
    assert torch.allclose(merged["transformer.resblocks.1.w"], torch.full((2,), 1.1))
    assert torch.allclose(merged["transformer.resblocks.0.w"], torch.full((2,), 0.1))


def test_lines_incremental_needs_no_instance_state():
    big = {f"transformer.resblocks.{i}.w": torch.zeros(3) for i in range(4)}
    small = {f"transformer.resblocks.{i}.w": torch.zeros(3) for i in range(2)}
    method = get_method("lines", alpha=0.0, beta=1.0)
    first, second = cl_merge.merging.IncrementalMerger(method, big), cl_merge.merging.IncrementalMerger(method, small)
    first.update({k: torch.ones(3) for k in big})
    second.update({k: torch.ones(3) for k in small})
    # block 1 is the last of 2 in the second merger (scale 1), the second of 4 in the first (scale 1/3)
    assert torch.allclose(second.current()["transformer.resblocks.1.w"], torch.ones(3))
    assert torch.allclose(first.current()["transformer.resblocks.1.w"], torch.full((3,), 1 / 3))
    # a fresh instance restored from the state gives the same weights
    fresh = cl_merge.merging.IncrementalMerger(get_method("lines", alpha=0.0, beta=1.0), big)
    fresh.load_state_dict(first.state_dict())
    for key in big:
        assert torch.equal(fresh.current()[key], first.current()[key])
    assert torch.equal(first.current()["transformer.resblocks.3.w"],
                       merge(big, [{k: torch.ones(3) for k in big}], "lines", alpha=0.0, beta=1.0)
                       ["transformer.resblocks.3.w"])


# ------------------------------------------------------------------ device
@pytest.mark.parametrize("method", data_free_methods())
def test_device_cpu_runs_every_strategy_identically(method):
    pre, fts = models(count_for(method))
    plain, on_device = merge(pre, fts, method), merge(pre, fts, method, device="cpu")
    if isinstance(plain, PerTaskMergeResult):
        plain, on_device = plain.task_state_dict(1), on_device.task_state_dict(1)
    for key in pre:
        assert on_device[key].device.type == "cpu"
        assert torch.equal(plain[key], on_device[key]), (method, key)


def test_incremental_device_cpu_and_bad_devices():
    pre, fts = models(2)
    a, b = incremental_merger(pre, "ties"), incremental_merger(pre, "ties", device="cpu")
    for ft in fts:
        a.update_finetuned(ft)
        b.update_finetuned(ft)
    for key in pre:
        assert torch.equal(a.current()[key], b.current()[key])
    with pytest.raises(MergeInputError, match="meta"):
        merge(pre, fts, "ties", device="meta")
    with pytest.raises(MergeInputError, match="invalid device"):
        merge(pre, fts, "ties", device="nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(MergeInputError, match="CUDA is not available"):
            merge(pre, fts, "ties", device="cuda")


# ------------------------------------------------------------------ CLI
def run_cli(argv):
    parser = argparse.ArgumentParser()
    merge_cmd.add_arguments(parser)
    return merge_cmd.main(parser.parse_args(argv))


def test_cli_refuses_to_overwrite_an_input(tmp_path):
    pre, fts = models(2)
    paths = [save_state_dict(sd, tmp_path / f"m{i}.safetensors") for i, sd in enumerate([pre, *fts])]
    before = [p.read_bytes() for p in paths]
    os.link(paths[2], tmp_path / "hardlink.safetensors")
    for out in (paths[1], tmp_path / "." / "m0.safetensors", tmp_path / "hardlink.safetensors"):
        with pytest.raises(CheckpointError, match="is the input .*refusing to overwrite"):
            run_cli(["--pretrained", str(paths[0]), "--finetuned", str(paths[1]), str(paths[2]),
                     "--out", str(out), "--no-progress"])
    assert [p.read_bytes() for p in paths] == before
    # per-task outputs are checked too
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        _emr_onto_input(tmp_path, paths)
    assert [p.read_bytes() for p in paths] == before


def _emr_onto_input(tmp_path, paths):
    # `--out x.safetensors` with emr writes x_task0/x_task1: make x_task1 one of the inputs
    victim = tmp_path / "x_task1.safetensors"
    os.link(paths[1], victim)
    merge_cmd.merge_files(paths[0], [paths[1], paths[2]], tmp_path / "x.safetensors", method="emr")


def test_cli_overflow_names_tensor_and_dtype(tmp_path):
    pre = {"w": torch.full((4,), 60000.0, dtype=torch.float16)}
    ft = {"w": torch.full((4,), 65000.0, dtype=torch.float16)}
    p0 = save_state_dict(pre, tmp_path / "pre.safetensors")
    p1 = save_state_dict(ft, tmp_path / "ft.safetensors")
    out = tmp_path / "out.safetensors"
    with pytest.raises(MergeInputError, match=r"'w' overflows torch.float16"):
        run_cli(["--pretrained", str(p0), "--finetuned", str(p1), str(p1), "--set", "scaling=1.0",
                 "--out", str(out), "--no-progress"])
    assert not out.exists()


def test_cli_device_option(tmp_path):
    pre, fts = models(2)
    paths = [save_state_dict(sd, tmp_path / f"m{i}.safetensors") for i, sd in enumerate([pre, *fts])]
    out = tmp_path / "out.safetensors"
    run_cli(["--pretrained", str(paths[0]), "--finetuned", str(paths[1]), str(paths[2]), "--method", "ties",
             "--device", "cpu", "--out", str(out), "--no-progress"])
    expected = merge(pre, fts, "ties")
    got = load_state_dict(out)
    for key in pre:
        assert torch.equal(got[key], expected[key])
    if not torch.cuda.is_available():
        with pytest.raises(MergeInputError, match="CUDA is not available"):
            run_cli(["--pretrained", str(paths[0]), "--finetuned", str(paths[1]), "--device", "cuda",
                     "--out", str(tmp_path / "gpu.safetensors"), "--no-progress"])
