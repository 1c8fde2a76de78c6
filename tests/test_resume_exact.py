"""Issue 12.1: a fine-tune resumed from a mid-training checkpoint ends with
bit-identical weights to an uninterrupted one (the data order is a function
of seed and step), with and without random augmentation."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import cl_merge  # noqa: F401  (torchvision compatibility shim first)
import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from cl_merge.core.io import load_state_dict
from cl_merge.data import ArrayImageDataset
from cl_merge.lit import TrainConfig, finetune
from cl_merge.lit.datamodule import StepBatchSampler
from cl_merge.models import ModelConfig

TINY_VIT = ModelConfig(family="vit", name="clmerge-tiny-vit")


class Task:
    """24 train images in 3 classes (7 full batches of 3 per epoch with drop_last)."""

    def __init__(self, n_train=22, n_val=6):
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, size=(n_train + n_val, 12, 12, 3), dtype=np.uint8)
        labels = np.arange(n_train + n_val) % 3
        self.name, self.classnames, self.templates = "noise", ["a", "b", "c"], ["{}"]
        self.train = ArrayImageDataset(images[:n_train], labels[:n_train])
        self.val = ArrayImageDataset(images[n_train:], labels[n_train:])
        self.test = self.val


class CrashAt(pl.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            raise RuntimeError("injected crash")


def _cfg(**kw):
    base = dict(max_steps=12, batch_size=3, lr=1e-3, warmup_steps=2, progress_bar=False, accelerator="cpu",
                eval_splits=["val"], checkpoint_every_n_steps=5, deterministic=True)
    return TrainConfig(**{**base, **kw})


def test_batch_order_is_a_function_of_seed_and_step():
    a = StepBatchSampler(10, 3, seed=4, drop_last=True)
    steps = [b for _ in range(3) for b in a]  # three epochs from step 0 (step_fn is constant 0 here)
    assert len(a) == 3 and all(len(b) == 3 for b in steps)
    epoch0 = [i for b in steps[:3] for i, _ in b]
    assert len(set(epoch0)) == 9  # one permutation, without repeats
    # starting at step 4 gives the batches an uninterrupted stream has at steps 4, 5
    b = StepBatchSampler(10, 3, seed=4, drop_last=True, step_fn=lambda: 4)
    assert list(b) == [a.batch_at(4), a.batch_at(5)]
    assert a.batch_at(4)[0][1] == 1  # step 4 is in epoch 1
    assert a.batch_at(0) != a.batch_at(3)  # each epoch draws a new permutation
    assert StepBatchSampler(10, 3, seed=5, drop_last=True).batch_at(0) != a.batch_at(0)


@pytest.mark.parametrize("augment", [False, True])
def test_resume_after_injected_crash_is_bit_identical(tmp_path, augment):
    task = Task()
    cfg = _cfg(augment=augment)
    straight = finetune(TINY_VIT, task, cfg, out_dir=tmp_path / "straight", seed=3)
    out = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="injected crash"):
        finetune(TINY_VIT, task, cfg, out_dir=out, seed=3, callbacks=[CrashAt(8)])
    (last,) = list((out / "checkpoints").rglob("last.ckpt"))
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 5  # mid-epoch (7 per epoch)
    resumed = finetune(TINY_VIT, task, cfg, out_dir=out, seed=3)
    assert resumed.metadata["global_step"] == 12 and not resumed.skipped
    a, b = straight.encoder_state(), resumed.encoder_state()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    # and training did change the weights (the comparison is not vacuous)
    task_vector = load_state_dict(straight.task_vector_path)
    assert any(v.abs().max() > 0 for v in task_vector.values())


_CHILD = textwrap.dedent("""
    import os, signal, sys
    import cl_merge
    import pytorch_lightning as pl
    sys.path.insert(0, {tests!r})
    from test_resume_exact import Task, _cfg, TINY_VIT
    from cl_merge.lit import finetune

    class Kill(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step >= 8:
                os.kill(os.getpid(), signal.SIGKILL)

    finetune(TINY_VIT, Task(), _cfg(), out_dir={out!r}, seed=3, callbacks=[Kill()])
""")


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path):
    task = Task()
    straight = finetune(TINY_VIT, task, _cfg(), out_dir=tmp_path / "straight", seed=3)
    out = tmp_path / "killed"
    code = _CHILD.format(tests=str(Path(__file__).parent), out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ}, capture_output=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert list((out / "checkpoints").rglob("last.ckpt"))
    resumed = finetune(TINY_VIT, task, _cfg(), out_dir=out, seed=3)
    a, b = straight.encoder_state(), resumed.encoder_state()
    assert all(torch.equal(a[k], b[k]) for k in a)
