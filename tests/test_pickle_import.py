"""The restricted unpickler: pickled modules whose classes cannot be
imported, Lightning checkpoints, pickles that would run code (nothing runs),
pickles with objects other than tensors; ``cl-merge convert`` on them."""

from __future__ import annotations

import enum
import importlib
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import cl_merge  # noqa: F401
from cl_merge.cli import main as cli_main
from cl_merge.core.io import load_state_dict
from cl_merge.core.pickle_import import import_pickled_checkpoint, load_checkpoint_tensors
from cl_merge.errors import CheckpointError

MODULE_SOURCE = textwrap.dedent('''
    import enum
    import functools
    import torch
    from torch import nn

    class Mode(enum.Enum):
        BICUBIC = "bicubic"

    def to_rgb(image):
        return image

    class Transform:
        def __init__(self):
            self.mode = Mode.BICUBIC          # an enum member: pickled as a call Mode('bicubic')
            self.fn = to_rgb                  # a function reference (not called)
            self.norm = functools.partial(nn.LayerNorm, eps=1e-6)

    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.blocks = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.LayerNorm(4))
            self.register_buffer("running", torch.arange(3.0))
            self.register_buffer("mask", torch.ones(2, 2), persistent=False)
            self.head = None

    class ImageEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Backbone()
            self.train_preprocess = Transform()
            self.cache_dir = "/somewhere"
            self.tied = self.model.blocks[0].weight[:2]   # a view of a parameter's storage (not in state_dict)

    class Hparams(dict):
        pass
''')


@pytest.fixture
def vanished_module(tmp_path, monkeypatch):
    """Import a throwaway package ``vanishing_src.modeling`` and yield it; the
    caller pickles its objects; the package is deleted afterwards."""
    root = tmp_path / "pkg"
    (root / "vanishing_src").mkdir(parents=True)
    (root / "vanishing_src" / "__init__.py").write_text("")
    (root / "vanishing_src" / "modeling.py").write_text(MODULE_SOURCE)
    monkeypatch.syspath_prepend(str(root))
    module = importlib.import_module("vanishing_src.modeling")
    yield module, root


def _make_unimportable(root: Path) -> None:
    for name in [m for m in sys.modules if m.startswith("vanishing_src")]:
        del sys.modules[name]
    shutil.rmtree(root)
    importlib.invalidate_caches()
    with pytest.raises(ImportError):
        importlib.import_module("vanishing_src.modeling")


def test_pickled_module_of_an_unimportable_class(vanished_module, tmp_path):
    module, root = vanished_module
    torch.manual_seed(0)
    encoder = module.ImageEncoder()
    expected = {k: v.clone() for k, v in encoder.state_dict().items()}
    path = tmp_path / "encoder.pt"
    torch.save(encoder, path)
    legacy = tmp_path / "legacy.pt"
    torch.save(encoder, legacy, _use_new_zipfile_serialization=False)
    _make_unimportable(root)
    for file in (path, legacy):
        state = import_pickled_checkpoint(file)
        assert list(state) == list(expected)  # state_dict()'s names and order; no non-persistent buffer
        assert "model.mask" not in state and "model.running" in state
        assert all(torch.equal(state[k], expected[k]) for k in expected)
    # weights_only loading refuses the file; the loader used by the runner falls back to the safe import
    with pytest.raises(CheckpointError, match="cl-merge convert"):
        load_state_dict(path)
    assert set(load_checkpoint_tensors(path)) == set(expected)


def test_lightning_checkpoint(vanished_module, tmp_path):
    module, root = vanished_module
    weights = {"model.layer.weight": torch.randn(3, 2), "model.layer.bias": torch.randn(3)}
    hparams = module.Hparams(lr=0.1, name="run", path=Path("/data/x"))
    ckpt = {
        "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.5.0",
        "state_dict": weights, "hyper_parameters": hparams,
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3, 2)}}, "param_groups": [{"lr": 0.1}]}],
        "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.5), "dirpath": "/ckpts"}},
    }
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    _make_unimportable(root)
    state = import_pickled_checkpoint(path)
    assert list(state) == list(weights) and all(torch.equal(state[k], weights[k]) for k in weights)


class _RunsCode:
    def __init__(self, marker: Path, how: str):
        self.marker = marker
        self.how = how

    def __reduce__(self):
        if self.how == "os.system":
            return os.system, (f"touch {self.marker}",)
        if self.how == "popen":
            return subprocess.Popen, (["touch", str(self.marker)],)
        return eval, (f"open({str(self.marker)!r}, 'w')",)


@pytest.mark.parametrize("how, called", [("os.system", "system"), ("popen", "subprocess.Popen"), ("eval", "eval")])
@pytest.mark.parametrize("fmt", ["zip", "plain"])
def test_pickle_that_would_run_code_runs_nothing(tmp_path, how, called, fmt):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"w": torch.ones(2), "payload": _RunsCode(marker, how)}
    if fmt == "zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match=rf"evil\.pt: the pickle calls \S*{called}\(\.\.\.\), which would run code"):
        import_pickled_checkpoint(path)
    assert not marker.exists()
    assert cli_main(["convert", str(path), str(tmp_path / "out.safetensors")]) == 2
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


class PlainRecord:
    def __init__(self):
        self.note = "not a tensor"


def test_pickle_with_non_tensor_objects_is_refused(tmp_path):
    path = tmp_path / "mixed.pt"
    torch.save({"w": torch.ones(2), "meta": PlainRecord()}, path)
    with pytest.raises(CheckpointError, match=r"entry 'meta' is a \S*PlainRecord object, not a tensor"):
        import_pickled_checkpoint(path)
    torch.save({"w": torch.ones(2), "epoch": 3}, path)
    with pytest.raises(CheckpointError, match="entry 'epoch' is a int, not a tensor"):
        import_pickled_checkpoint(path)
    torch.save([torch.ones(2)], path)
    with pytest.raises(CheckpointError, match="holds a list, not a module or a state dict"):
        import_pickled_checkpoint(path)
    # nested dicts of tensors are named with dots, like a state dict of submodules
    torch.save({"encoder": {"w": torch.ones(2)}, "head": torch.zeros(1)}, path)
    assert set(import_pickled_checkpoint(path)) == {"encoder.w", "head"}


def test_convert_cli_writes_safetensors_and_converts_layouts(vanished_module, tmp_path, capsys):
    """A task-vectors-like pickled ImageEncoder around an open_clip model, to
    safetensors in open_clip and HF layout."""
    open_clip = pytest.importorskip("open_clip")
    module, root = vanished_module
    encoder = module.ImageEncoder()
    torch.manual_seed(0)
    encoder.model = open_clip.CLIP(
        16, vision_cfg={"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        text_cfg={"context_length": 8, "vocab_size": 50, "width": 32, "heads": 2, "layers": 1}, quick_gelu=True)
    del encoder.model.transformer  # as task-vectors' ImageEncoder does (keep_lang=False)
    expected = encoder.state_dict()
    path = tmp_path / "finetuned.pt"
    torch.save(encoder, path)
    _make_unimportable(root)

    plain = tmp_path / "plain.safetensors"
    assert cli_main(["convert", str(path), str(plain)]) == 0
    assert "task_vectors_image_encoder" in capsys.readouterr().out
    written = load_state_dict(plain)
    assert set(written) == set(expected) and all(torch.equal(written[k], expected[k]) for k in expected)

    oc = tmp_path / "oc.safetensors"
    assert cli_main(["convert", str(path), str(oc), "--to", "open_clip"]) == 0
    oc_state = load_state_dict(oc)
    assert torch.equal(oc_state["visual.conv1.weight"], expected["model.visual.conv1.weight"])
    hf = tmp_path / "hf.safetensors"
    assert cli_main(["convert", str(oc), str(hf), "--to", "hf_clip"]) == 0
    hf_state = load_state_dict(hf)
    assert torch.equal(hf_state["visual_projection.weight"], expected["model.visual.proj"].T)
    assert cli_main(["convert", str(hf), str(tmp_path / "back.safetensors"), "--to", "open_clip"]) == 0
    back = load_state_dict(tmp_path / "back.safetensors")
    assert set(back) == set(oc_state) and all(torch.equal(back[k], oc_state[k]) for k in oc_state)
    # the image tower of the converted file loads into an open_clip model of that shape
    visual = {k[len("visual."):]: v for k, v in back.items() if k.startswith("visual.")}
    encoder.model.visual.load_state_dict(visual)
    assert cli_main(["convert", str(path), str(tmp_path / "x.pt")]) == 2
