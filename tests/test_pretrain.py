"""The offline-pretrained tiny CLIP: cached once, reproducible, and its
zero-shot heads beat chance on the data it was pretrained on."""

from __future__ import annotations

import pytest
import torch

import cl_merge  # noqa: F401
from cl_merge.pretrain import offline_clip
from cl_merge.pretrain.offline_clip import OfflinePretrainConfig, ensure_offline_clip

SMALL = OfflinePretrainConfig(datasets=("digits",), max_per_dataset=400, steps=4, batch_size=16, warmup_steps=1)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CL_MERGE_CACHE_DIR", str(tmp_path))


def test_cached_after_first_call(monkeypatch):
    first = ensure_offline_clip(SMALL, progress=False, log=lambda m: None)
    assert first.exists()
    calls = []
    monkeypatch.setattr(offline_clip, "pretrain_offline_clip", lambda *a, **k: calls.append(1))
    assert ensure_offline_clip(SMALL, progress=False, log=lambda m: None) == first
    assert calls == []
    # another config is another file
    assert offline_clip.offline_weights_path(OfflinePretrainConfig(steps=5)) != first


def test_same_seed_same_weights():
    a = offline_clip.pretrain_offline_clip(SMALL, progress=False)
    b = offline_clip.pretrain_offline_clip(SMALL, progress=False)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_zero_shot_beats_chance_after_pretraining():
    from cl_merge.data import TaskSpec, cache_tensors, load_task
    from cl_merge.models.clip import create_clip

    config = OfflinePretrainConfig(datasets=("digits",), max_per_dataset=1200, steps=250, batch_size=64)
    model = create_clip(config.model, str(ensure_offline_clip(config, progress=False, log=lambda m: None)),
                        head_cache_dir=None)
    task = load_task(TaskSpec("digits"), seed=0)
    data = cache_tensors(task.test, model.preprocess(False))
    head = model.make_head(task.classnames, task.templates)
    with torch.no_grad():
        accuracy = (model.forward(data.inputs, head).argmax(-1) == torch.as_tensor(data.labels)).float().mean()
    assert accuracy > 0.3  # chance is 0.1
