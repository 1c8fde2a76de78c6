"""Lightning layer: the module's recipe, finetune() artifacts, skip / resume,
determinism, start states, evaluate(), loggers, the CLI. Real data: sklearn's
bundled digits (always) and Fashion-MNIST through cl_merge.data (slow tests)."""

import math
from pathlib import Path
from types import SimpleNamespace

import cl_merge  # noqa: F401  (torchvision compatibility shim first)
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from sklearn.datasets import load_digits

from cl_merge.config import from_dict
from cl_merge.core.io import load_state_dict, read_json
from cl_merge.errors import ConfigError
from cl_merge.lit import LoggerConfig, TrainConfig, evaluate, finetune
from cl_merge.lit.module import FineTuneModule, WarmupCosine
from cl_merge.models import ModelConfig, create_model

TINY_CLIP = ModelConfig(family="clip", name="clmerge-tiny-clip", kwargs={"head_cache_dir": None})
TINY_VIT = ModelConfig(family="vit", name="clmerge-tiny-vit")
FMNIST = Path("/usr/share/datasets/fashion-mnist")


class DigitsImages(torch.utils.data.Dataset):
    """sklearn's 8x8 digits as PIL RGB images (0..16 scaled to 0..255)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images = (images * 255.0 / 16.0).clip(0, 255).astype(np.uint8)
        self.labels = labels.astype(np.int64)

    def head(self, n: int) -> "DigitsImages":
        out = DigitsImages.__new__(DigitsImages)
        out.images, out.labels = self.images[:n], self.labels[:n]
        return out

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return Image.fromarray(self.images[i]).convert("RGB"), int(self.labels[i])


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    train, val, test = order[:1200], order[1200:1400], order[1400:]
    make = lambda idx: DigitsImages(data.images[idx], data.target[idx])  # noqa: E731
    return SimpleNamespace(
        name="digits",
        classnames=[f"digit {i}" for i in range(10)],
        templates=["a photo of the number {}."],
        train=make(train), val=make(val), test=make(test),
    )


@pytest.fixture(scope="module")
def small_digits(digits):
    return SimpleNamespace(name="digits-small", classnames=digits.classnames, templates=digits.templates,
                           train=digits.train.head(96), val=digits.val.head(32), test=digits.test.head(32))


def quick(**overrides) -> TrainConfig:
    base = dict(max_steps=4, batch_size=16, lr=1e-3, warmup_steps=1, progress_bar=False, cache_tensors=True,
                accelerator="cpu", eval_splits=["test"], checkpoint_every_n_steps=2, deterministic=True)
    return TrainConfig(**{**base, **overrides})


def test_warmup_cosine_schedule():
    f = WarmupCosine(warmup_steps=4, max_steps=14)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and math.isclose(f(9), 0.5) and math.isclose(f(14), 0.0, abs_tol=1e-12)
    assert WarmupCosine(0, 10)(0) == 1.0


def test_train_config_validation_names_the_field():
    with pytest.raises(ConfigError, match=r"ft.yaml: train: lr must be > 0"):
        from_dict(TrainConfig, {"lr": 0}, where="ft.yaml: train")
    with pytest.raises(ConfigError, match=r"train.trainable: must be one of"):
        from_dict(TrainConfig, {"trainable": "bias"}, where="train")
    with pytest.raises(ConfigError, match="unknown field 'max_step'.*did you mean: max_steps"):
        from_dict(TrainConfig, {"max_step": 3}, where="train")
    cfg = from_dict(TrainConfig, {"strategy": "ddp", "devices": [0, 1], "precision": "bf16-mixed"}, where="train")
    assert cfg.strategy == "ddp" and cfg.devices == [0, 1]


def test_clip_module_trains_encoder_under_frozen_head(small_digits):
    model = create_model("clip", "clmerge-tiny-clip", head_cache_dir=None)
    head = model.make_head(small_digits.classnames, small_digits.templates)
    text_before = {id(p): p.detach().clone() for p in model.text_parameters()}
    head_before = head.weight.clone()
    enc_before = model.encoder_state_dict()
    module = FineTuneModule.from_task_model(model, head, quick(trainable="last_k_blocks", trainable_k=1), num_classes=10)
    x = torch.stack([model.preprocess(False)(small_digits.train[i][0]) for i in range(16)])
    y = torch.tensor([small_digits.train[i][1] for i in range(16)])
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8))
    after = model.encoder_state_dict()
    assert not torch.equal(after["transformer.resblocks.3.mlp.c_fc.weight"], enc_before["transformer.resblocks.3.mlp.c_fc.weight"])
    assert not torch.equal(after["ln_post.weight"], enc_before["ln_post.weight"])
    assert torch.equal(after["transformer.resblocks.0.mlp.c_fc.weight"], enc_before["transformer.resblocks.0.mlp.c_fc.weight"])
    assert torch.equal(after["conv1.weight"], enc_before["conv1.weight"])
    assert torch.equal(head.weight, head_before)
    assert all(torch.equal(p, text_before[id(p)]) for p in model.text_parameters())


def test_finetune_artifacts_skip_and_retrain(small_digits, tmp_path):
    out = tmp_path / "run"
    result = finetune(TINY_CLIP, small_digits, quick(), out_dir=out, seed=0)
    assert not result.skipped and result.metadata["global_step"] == 4
    for name in ("encoder.safetensors", "task_vector.safetensors", "head.safetensors", "metadata.json"):
        assert (out / name).exists()
    assert (out / "logs" / "metrics.csv").exists()
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").rglob("*.ckpt"))
    meta = read_json(out / "metadata.json")
    assert meta["task"]["classnames"] == small_digits.classnames and meta["seed"] == 0
    assert meta["train"]["lr"] == 1e-3 and "torch" in meta["versions"] and 0.0 <= meta["metrics"]["test_acc"] <= 1.0

    theta0 = create_model("clip", "clmerge-tiny-clip", head_cache_dir=None).encoder_state_dict()
    ft, tau = load_state_dict(out / "encoder.safetensors"), load_state_dict(out / "task_vector.safetensors")
    assert set(ft) == set(theta0) == set(tau)
    for k in ft:
        torch.testing.assert_close(tau[k], ft[k] - theta0[k])
    assert any(tau[k].abs().sum() > 0 for k in tau)
    head = result.head(create_model("clip", "clmerge-tiny-clip", head_cache_dir=None))
    assert head.weight.shape == (10, 64)

    mtime = (out / "encoder.safetensors").stat().st_mtime_ns
    again = finetune(TINY_CLIP, small_digits, quick(progress_bar=True), out_dir=out, seed=0)  # cosmetic change only
    assert again.skipped and again.metrics == result.metrics
    assert (out / "encoder.safetensors").stat().st_mtime_ns == mtime
    changed = finetune(TINY_CLIP, small_digits, quick(lr=5e-4), out_dir=out, seed=0)
    assert not changed.skipped


def test_same_seed_same_weights(small_digits, tmp_path):
    runs = [finetune(TINY_CLIP, small_digits, quick(), out_dir=tmp_path / f"r{i}", seed=s).encoder_state()
            for i, s in enumerate((5, 5, 6))]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_start_from_given_state_task_vector_stays_relative_to_theta0(small_digits, tmp_path):
    model = create_model("vit", "clmerge-tiny-vit")
    theta0 = model.encoder_state_dict()
    g = torch.Generator().manual_seed(0)
    start = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in theta0.items()}
    result = finetune(model, small_digits, quick(lr=1e-6, max_steps=2), out_dir=tmp_path / "r",
                      init_encoder_state=start, seed=0)
    ft, tau = result.encoder_state(), result.task_vector()
    for k in ft:
        torch.testing.assert_close(tau[k], ft[k] - theta0[k])
    drift = sum(float((ft[k] - start[k]).norm()) for k in ft)
    offset = sum(float((start[k] - theta0[k]).norm()) for k in ft)
    assert drift < 0.05 * offset  # training started from `start`, not θ0
    # the caller's model was not trained in place
    assert all(torch.equal(v, theta0[k]) for k, v in model.encoder_state_dict().items())
    assert result.metadata["init_encoder_sha256"] != result.metadata["pretrained_encoder_sha256"]


class StopAt(pl.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            raise RuntimeError("simulated crash")


def test_interrupted_finetune_resumes_from_last_ckpt(small_digits, tmp_path):
    out = tmp_path / "run"
    cfg = quick(max_steps=6, checkpoint_every_n_steps=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        finetune(TINY_VIT, small_digits, cfg, out_dir=out, seed=0, callbacks=[StopAt(3)])
    assert not (out / "metadata.json").exists()
    last = list((out / "checkpoints").rglob("last.ckpt"))
    assert len(last) == 1
    assert torch.load(last[0], map_location="cpu", weights_only=True)["global_step"] == 2
    result = finetune(TINY_VIT, small_digits, cfg, out_dir=out, seed=0)
    assert result.metadata["resumed_from_step"] == 2 and result.metadata["global_step"] == 6
    assert not list((out / "checkpoints").rglob("*.ckpt"))  # cleaned up once artifacts exist


def test_evaluate_uses_given_state_without_touching_model(small_digits):
    model = create_model("vit", "clmerge-tiny-vit")
    head = model.make_head(small_digits.classnames)
    own = model.encoder_state_dict()
    other = {k: torch.randn_like(v) for k, v in own.items()}
    acc_other = evaluate(model, other, head, small_digits.test, batch_size=8)
    assert all(torch.equal(v, own[k]) for k, v in model.encoder_state_dict().items())
    model.load_encoder_state_dict(other)
    assert evaluate(model, None, head, small_digits.test, batch_size=8) == acc_other
    with pytest.raises(cl_merge.CheckpointError, match="missing.*'fc_norm.weight'"):
        evaluate(model, {k: v for k, v in other.items() if k != "fc_norm.weight"}, head, small_digits.test)


def test_vit_finetune_on_real_digits_beats_chance(tmp_path):
    """A short fine-tune from scratch on real data (sklearn digits 0, 1, 7) learns."""
    data = load_digits()
    keep = np.flatnonzero(np.isin(data.target, [0, 1, 7]))
    keep = keep[np.random.default_rng(0).permutation(len(keep))]
    labels = np.searchsorted([0, 1, 7], data.target)
    split = lambda idx: DigitsImages(data.images[idx], labels[idx])  # noqa: E731
    task = SimpleNamespace(name="digits-017", classnames=["zero", "one", "seven"], templates=["{}"],
                           train=split(keep[:400]), val=None, test=split(keep[400:]))
    cfg = quick(max_steps=40, batch_size=32, lr=3e-3, warmup_steps=3, weight_decay=0.05,
                checkpoint_every_n_steps=None, deterministic=False)
    result = finetune(TINY_VIT, task, cfg, out_dir=tmp_path / "vit", seed=0)
    assert result.metrics["test_acc"] > 0.6, result.metrics  # chance is 1/3


def test_wandb_logger_runs_offline(small_digits, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    finetune(TINY_VIT, small_digits, quick(max_steps=2), out_dir=out, seed=0, logger_cfg=LoggerConfig(wandb=True))
    assert list((out / "wandb_runs").rglob("*.wandb"))
    assert read_json(out / "metadata.json")["logging"]["wandb_mode"] == "offline"


@pytest.mark.slow
@pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed")
def test_finetune_on_fashion_mnist_through_data_layer(tmp_path):
    from cl_merge.data import TaskSpec

    spec = TaskSpec("fashion_mnist", max_train=1000, max_val=100, max_test=300)
    cfg = quick(max_steps=120, batch_size=32, lr=2e-3, warmup_steps=5, checkpoint_every_n_steps=None,
                eval_splits=["val", "test"], deterministic=False)
    result = finetune(TINY_VIT, spec, cfg, out_dir=tmp_path / "fm", seed=0, data_root=tmp_path / "data")
    assert result.metadata["task"]["name"] == "fashion_mnist"
    assert result.metrics["test_acc"] > 0.35, result.metrics  # chance is 0.1 (80 steps reach ~0.38)


@pytest.mark.slow
@pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed")
def test_cli_finetune_tiny_config(tmp_path, capsys):
    from cl_merge.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "finetune_tiny_clip.yaml"
    args = ["finetune", "--config", str(config), "--out", str(tmp_path / "cli"), "train.max_steps=3",
            "task.max_train=64", "task.max_val=32", "task.max_test=32", "train.progress_bar=false",
            f"data_root={tmp_path / 'data'}"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "trained 3 steps" in printed and "test_acc" in printed
    assert (tmp_path / "cli" / "task_vector.safetensors").exists()
    assert main(args) == 0 and "skipped training" in capsys.readouterr().out
    assert main(["finetune", "--config", str(config), "--out", str(tmp_path / "x"), "train.lr=-1"]) == 2
