"""``cl-merge merge`` / ``cl-merge methods`` on small generated checkpoints."""

from __future__ import annotations

import argparse
import contextlib
import json
import math

import pytest
import torch

import cl_merge
from cl_merge import TaskVector
from cl_merge.cli import merge_cmd, methods_cmd
from cl_merge.core.io import load_state_dict, open_checkpoint, save_state_dict
from cl_merge.errors import CheckpointError, ClMergeError, ConfigError, HyperparameterError, MergeInputError, UnknownNameError


def run_cli(module, argv):
    """What the dispatcher does: parse, run, ClMergeError -> exception kept for asserts."""
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.main(parser.parse_args(argv))


def make_models(num=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = {
        "embed": torch.randn(4, 3, generator=g),
        "blocks.0.w": torch.randn(3, 3, generator=g),
        "blocks.1.w": torch.randn(3, 3, generator=g).to(torch.bfloat16),
        "norm.b": torch.randn(3, generator=g),
        "norm.steps": torch.tensor(5),
    }
    fts = []
    for _ in range(num):
        fts.append({k: (v + 0.1 * torch.randn(v.shape, generator=g).to(v.dtype) if v.is_floating_point() else v)
                    for k, v in pre.items()})
    return pre, fts


@pytest.fixture
def files(tmp_path):
    pre, fts = make_models()
    pre_path = save_state_dict(pre, tmp_path / "pre.safetensors")
    ft_paths = [save_state_dict(ft, tmp_path / f"ft{i}.safetensors") for i, ft in enumerate(fts)]
    return pre, fts, pre_path, ft_paths


def write_sharded(sd, path, max_bytes):
    """Sharded safetensors + index json, through the command's own writer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        index = merge_cmd.write_state_dict(sd, path, {}, max_bytes, stack)
    return index


def same(a, b):
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def argv(pre_path, ft_paths, out, *extra):
    return ["--pretrained", str(pre_path), "--finetuned", *map(str, ft_paths), "--out", str(out), "--no-progress",
            *extra]


# ----------------------------------------------------------------- end to end
@pytest.mark.parametrize("method,sets,hparams", [
    ("task_arithmetic", ["scaling=0.4"], {"scaling": 0.4}),
    ("average", [], {}),
    ("lines", ["beta=0.8", "alpha=0.2"], {"beta": 0.8, "alpha": 0.2}),
])
def test_cli_merge_equals_in_memory(tmp_path, files, method, sets, hparams, capsys):
    pre, fts, pre_path, ft_paths = files
    out = tmp_path / "out" / "merged.safetensors"
    assert run_cli(merge_cmd, argv(pre_path, ft_paths, out, "--method", method, *(["--set", *sets] if sets else []))) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert same(load_state_dict(out), cl_merge.merge(pre, fts, method, **hparams))
    meta = open_checkpoint(out).metadata
    assert meta["cl_merge_method"] == method and json.loads(meta["cl_merge_inputs"]) == [p.name for p in ft_paths]


def test_cli_merge_sharded_inputs_and_output(tmp_path, files):
    pre, fts, pre_path, ft_paths = files
    # inputs: the pretrained model as a sharded checkpoint (index json), fine-tuned ones as folders
    sharded_pre = write_sharded(pre, tmp_path / "pre_sharded" / "model.safetensors", 100)
    folders = []
    for i, ft in enumerate(fts):
        folders.append(write_sharded(ft, tmp_path / f"ft{i}_dir" / "model.safetensors", 60).parent)
    assert len(list(sharded_pre.parent.glob("*.safetensors"))) > 1
    out = tmp_path / "merged.safetensors"
    run_cli(merge_cmd, argv(sharded_pre, folders, out, "--method", "lines", "--max-shard-size", "100B"))
    index = tmp_path / "merged.safetensors.index.json"
    assert index.exists() and not out.exists()
    assert len(json.loads(index.read_text())["weight_map"]) == len(pre)
    assert same(load_state_dict(index), cl_merge.merge(pre, fts, "lines"))


def test_cli_merge_include_exclude(tmp_path, files):
    pre, fts, pre_path, ft_paths = files
    out = tmp_path / "m.safetensors"
    run_cli(merge_cmd, argv(pre_path, ft_paths, out, "--include", "blocks.*", "embed", "--exclude", "re:.*\\.1\\..*"))
    expected = cl_merge.merge(pre, fts, include=["blocks.*", "embed"], exclude=["re:.*\\.1\\..*"])
    got = load_state_dict(out)
    assert same(got, expected)
    assert torch.equal(got["blocks.1.w"], pre["blocks.1.w"]) and torch.equal(got["norm.b"], pre["norm.b"])


def test_cli_merge_task_vector_inputs(tmp_path, files):
    pre, fts, pre_path, ft_paths = files
    float_pre = {k: v.float() if v.is_floating_point() else v for k, v in pre.items()}
    tv_paths = []
    for i, ft in enumerate(fts):
        tv = TaskVector.from_state_dicts(pre, ft)
        tv_paths.append(tv.save(tmp_path / f"tv{i}.safetensors"))
    out = tmp_path / "from_tv.safetensors"
    run_cli(merge_cmd, argv(pre_path, tv_paths, out, "--task-vectors", "--set", "scaling=0.5"))
    got = load_state_dict(out)
    summed = sum(TaskVector.load(p) for p in tv_paths)
    expected = summed.apply_to(float_pre, scaling=0.5)
    for key in pre:
        assert got[key].dtype == pre[key].dtype
        assert torch.allclose(got[key].float(), expected[key].to(pre[key].dtype).float(), atol=1e-2 if
                              pre[key].dtype == torch.bfloat16 else 1e-6), key


def test_cli_task_vector_missing_key_named(tmp_path, files):
    pre, fts, pre_path, ft_paths = files
    tv = TaskVector.from_state_dicts(pre, fts[0], exclude="norm.b")
    path = tv.save(tmp_path / "partial_tv.safetensors")
    with pytest.raises(MergeInputError, match="'norm.b'"):
        run_cli(merge_cmd, argv(pre_path, [path], tmp_path / "o.safetensors", "--task-vectors"))
    # excluding the key from the merge makes the same task vector usable
    run_cli(merge_cmd, argv(pre_path, [path], tmp_path / "o.safetensors", "--task-vectors", "--exclude", "norm.b"))
    assert torch.equal(load_state_dict(tmp_path / "o.safetensors")["norm.b"], pre["norm.b"])


def test_cli_per_task_method_writes_one_file_per_task(tmp_path, files):
    if "tall_masks" not in cl_merge.available_methods():
        pytest.skip("tall_masks not registered")
    pre, fts, pre_path, ft_paths = files
    out = tmp_path / "tall.safetensors"
    run_cli(merge_cmd, argv(pre_path, ft_paths, out, "--method", "tall_masks"))
    result = cl_merge.merge(pre, fts, "tall_masks")
    assert same(load_state_dict(out), dict(result.shared))
    for i in range(len(fts)):
        assert same(load_state_dict(tmp_path / f"tall_task{i}.safetensors"), result.task_state_dict(i))


# ----------------------------------------------------------------- atomic output
def test_nan_in_last_key_leaves_no_output(tmp_path, files):
    pre, fts, pre_path, ft_paths = files
    bad = dict(fts[1])
    bad["norm.b"] = bad["norm.b"].clone()
    bad["norm.b"][0] = math.nan
    save_state_dict(bad, ft_paths[1])
    out_dir = tmp_path / "outdir"
    out_dir.mkdir()
    for method in ("task_arithmetic", "lines"):
        with pytest.raises(MergeInputError, match="NaN in tensor 'norm.b' of fine-tuned model 1.*ft1.safetensors"):
            run_cli(merge_cmd, argv(pre_path, ft_paths, out_dir / "m.safetensors", "--method", method,
                                    "--max-shard-size", "100B"))
    assert list(out_dir.iterdir()) == []  # neither the output nor a temp file
    run_cli(merge_cmd, argv(pre_path, ft_paths, out_dir / "m.safetensors", "--no-check-finite"))
    assert math.isnan(float(load_state_dict(out_dir / "m.safetensors")["norm.b"][0]))


def test_existing_output_kept_on_failure(tmp_path, files):
    pre, fts, pre_path, ft_paths = files
    out = tmp_path / "keep.safetensors"
    save_state_dict({"old": torch.ones(1)}, out)
    with pytest.raises(ClMergeError):
        run_cli(merge_cmd, argv(pre_path, ft_paths, out, "--method", "nope"))
    assert set(load_state_dict(out)) == {"old"}


# ----------------------------------------------------------------- bad input
def test_bad_set_syntax(tmp_path, files):
    _, _, pre_path, ft_paths = files
    with pytest.raises(ConfigError, match="'scaling0.3'.*name=value"):
        run_cli(merge_cmd, argv(pre_path, ft_paths, tmp_path / "o.safetensors", "--set", "scaling0.3"))
    with pytest.raises(ConfigError, match="'scaling' twice"):
        run_cli(merge_cmd, argv(pre_path, ft_paths, tmp_path / "o.safetensors", "--set", "scaling=1", "scaling=2"))


def test_unknown_method_and_bad_hparam(tmp_path, files):
    _, _, pre_path, ft_paths = files
    with pytest.raises(UnknownNameError, match="'tie'.*valid: .*task_arithmetic"):
        run_cli(merge_cmd, argv(pre_path, ft_paths, tmp_path / "o.safetensors", "--method", "tie"))
    with pytest.raises(HyperparameterError, match="beta"):
        run_cli(merge_cmd, argv(pre_path, ft_paths, tmp_path / "o.safetensors", "--method", "lines", "--set", "beta=-2"))
    with pytest.raises(HyperparameterError, match="unknown hyperparameter 'scale'"):
        run_cli(merge_cmd, argv(pre_path, ft_paths, tmp_path / "o.safetensors", "--set", "scale=2"))


def test_missing_input_file_named(tmp_path, files):
    _, _, pre_path, ft_paths = files
    with pytest.raises(CheckpointError, match="ghost.safetensors"):
        run_cli(merge_cmd, argv(pre_path, [ft_paths[0], tmp_path / "ghost.safetensors"], tmp_path / "o.safetensors"))


def test_output_is_directory_or_bad_suffix(tmp_path, files):
    _, _, pre_path, ft_paths = files
    with pytest.raises(CheckpointError, match="is a directory"):
        run_cli(merge_cmd, argv(pre_path, ft_paths, tmp_path))
    with pytest.raises(CheckpointError, match="must end with .safetensors"):
        run_cli(merge_cmd, argv(pre_path, ft_paths, tmp_path / "out.txt"))


def test_bad_shard_size(tmp_path, files):
    _, _, pre_path, ft_paths = files
    with pytest.raises(ConfigError, match="'lots'"):
        run_cli(merge_cmd, argv(pre_path, ft_paths, tmp_path / "o.safetensors", "--max-shard-size", "lots"))
    assert merge_cmd.parse_size("2GB") == 2 * 10**9 and merge_cmd.parse_size("512MiB") == 512 * 2**20


def test_mismatched_checkpoints_named(tmp_path, files):
    pre, fts, pre_path, ft_paths = files
    other = dict(fts[0], **{"blocks.0.w": torch.zeros(2, 2)})
    bad_path = save_state_dict(other, tmp_path / "other.safetensors")
    with pytest.raises(MergeInputError, match="shape mismatch for 'blocks.0.w'"):
        run_cli(merge_cmd, argv(pre_path, [ft_paths[0], bad_path], tmp_path / "o.safetensors"))
    extra = save_state_dict(dict(fts[0], head=torch.zeros(1)), tmp_path / "extra.safetensors")
    with pytest.raises(MergeInputError, match="extra.safetensors.*'head'"):
        run_cli(merge_cmd, argv(pre_path, [extra], tmp_path / "o.safetensors"))


def test_truncated_input_named(tmp_path, files):
    _, _, pre_path, ft_paths = files
    data = ft_paths[2].read_bytes()
    ft_paths[2].write_bytes(data[:-7])
    with pytest.raises(CheckpointError, match="ft2.safetensors"):
        run_cli(merge_cmd, argv(pre_path, ft_paths, tmp_path / "o.safetensors"))


def test_dispatcher_exit_code_and_one_line(tmp_path, files, capsys):
    try:
        from cl_merge.cli import main as cli_main
        from cl_merge.cli import build_parser

        build_parser()
    except ImportError as exc:
        pytest.skip(f"other subcommands not importable yet: {exc}")
    _, _, pre_path, ft_paths = files
    code = cli_main(["merge", *argv(pre_path, ft_paths, tmp_path / "o.safetensors", "--method", "tie")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "unknown merging method 'tie'" in err


# ----------------------------------------------------------------- methods
def test_methods_lists_every_strategy(capsys):
    assert run_cli(methods_cmd, []) == 0
    text = capsys.readouterr().out
    for name in cl_merge.available_methods():
        assert name in text
    assert "scaling=0.3" in text and "https://arxiv.org/abs/2410.17146" in text
    run_cli(methods_cmd, ["--json"])
    rows = json.loads(capsys.readouterr().out)
    lines = next(r for r in rows if r["name"] == "lines")
    assert lines["incremental"] is True and lines["hparams"]["beta"] == 0.5
