"""Data at scale (issue 8): Hugging Face splits read straight from their Arrow
files with bounded resident memory, and the step-indexed training sampler
sharded per process under DDP and resumable for Lightning."""

import io
import os
import pickle
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import cl_merge  # noqa: F401  (torchvision compatibility shim first)
import datasets
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from cl_merge.data import hf as hf_module
from cl_merge.data.hf import HFImageDataset, label_array
from cl_merge.errors import ConfigError, DataError
from cl_merge.lit import TrainConfig, finetune
from cl_merge.lit.datamodule import StepBatchSampler, StepDataLoader
from cl_merge.models import ModelConfig

TINY_VIT = ModelConfig(family="vit", name="clmerge-tiny-vit")


# --------------------------------------------------------------------- HF images from the Arrow files
def _images(n: int, size: int = 24):
    """Images in the modes a hub dataset holds (RGB JPEG, grayscale, RGBA and palette PNG), all different."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        mode, fmt = [("RGB", "JPEG"), ("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG")][i % 4]
        image = image.convert(mode)
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        out.append({"bytes": buffer.getvalue(), "path": None})
    return out


def _features():
    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})


def _saved_split(tmp_path: Path, n: int = 30, size: int = 24) -> datasets.Dataset:
    """A split saved in 3 Arrow files of several record batches each, loaded back from disk."""
    ds = datasets.Dataset.from_dict({"image": _images(n, size), "label": [i % 3 for i in range(n)]}, features=_features())
    ds.save_to_disk(str(tmp_path / "saved"), num_shards=3, max_shard_size=None)
    loaded = datasets.load_from_disk(str(tmp_path / "saved"))
    assert len(loaded.cache_files) == 3
    return loaded


def _decoded_by_datasets(table, index: int) -> np.ndarray:
    return np.asarray(table[int(index)]["image"].convert("RGB"))


def _hf(table) -> HFImageDataset:
    return HFImageDataset(table, "image", label_array(table, "label", "test"))


def test_arrow_reader_gives_the_images_datasets_decodes(tmp_path):
    table = _saved_split(tmp_path)
    ds = _hf(table)
    assert ds.reader is not None, "a save_to_disk split should be read from its Arrow files"
    for i in np.random.default_rng(1).permutation(len(table)):
        image, label = ds[int(i)]
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), _decoded_by_datasets(table, i))
        assert label == i % 3
    with pytest.raises(IndexError):
        ds.reader.get(len(table))


def test_arrow_reader_for_a_dataset_load_dataset_cached(tmp_path):
    # load_dataset (hub ids, parquet folders) converts to Arrow files in the datasets cache: the same reader applies
    source = datasets.Dataset.from_dict({"image": _images(12), "label": [i % 3 for i in range(12)]},
                                        features=_features())
    (tmp_path / "pq").mkdir()
    source.to_parquet(str(tmp_path / "pq" / "train-00000.parquet"))
    table = datasets.load_dataset("parquet", data_files={"train": str(tmp_path / "pq" / "train-00000.parquet")},
                                  cache_dir=str(tmp_path / "cache"))["train"]
    ds = _hf(table)
    assert ds.reader is not None and all(f.startswith(str(tmp_path / "cache")) for f in ds.reader.files)
    for i in range(len(table)):
        np.testing.assert_array_equal(np.asarray(ds.image(i)), _decoded_by_datasets(table, i))


def test_tables_that_are_not_their_files_use_datasets_row_access(tmp_path):
    table = _saved_split(tmp_path, n=12)
    in_memory = datasets.Dataset.from_dict({"image": _images(6), "label": [0, 1, 2, 0, 1, 2]}, features=_features())
    reordered = table.select([5, 0, 11, 3])  # an index mapping: file row i is not dataset row i
    for t in (in_memory, reordered):
        ds = _hf(t)
        assert ds.reader is None
        for i in range(len(t)):
            np.testing.assert_array_equal(np.asarray(ds.image(i)), _decoded_by_datasets(t, i))


def test_releasing_the_maps_keeps_the_rows_and_drops_resident_pages(tmp_path, monkeypatch):
    table = _saved_split(tmp_path, n=40, size=128)  # noise JPEG/PNGs of 10-60 kB, ~1 MB of images
    ds = _hf(table)
    total = sum(len(ds.reader.get(i)) for i in range(len(table)))
    assert total > 800_000
    released = []
    real_release = hf_module.ArrowImageBytes.release
    monkeypatch.setattr(hf_module.ArrowImageBytes, "release", lambda self: (released.append(1), real_release(self)))
    monkeypatch.setattr(hf_module, "RELEASE_EVERY_BYTES", total // 40)
    order = np.random.default_rng(2).permutation(len(table))
    expected = [_decoded_by_datasets(table, i) for i in order]
    got = [np.asarray(ds.image(int(i))) for i in order]
    assert len(released) >= 15  # released about every image
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    # after a release the reader's maps hold (almost) no resident pages, although every row was read
    if sys.platform.startswith("linux"):
        monkeypatch.setattr(hf_module, "RELEASE_EVERY_BYTES", 1 << 40)
        for i in order:
            ds.reader.get(int(i))
        resident = _mapped_rss_kib(ds.reader)
        ds.reader.release()
        assert resident > total / 1024 and _mapped_rss_kib(ds.reader) < resident / 10, (resident, _mapped_rss_kib(ds.reader))


def _mapped_rss_kib(reader) -> int:
    """Resident KiB of the memory maps that ``reader`` opened (found by address in /proc/self/smaps)."""
    import pyarrow as pa

    starts = {pa.py_buffer(m).address for m in reader._state[0]}
    total, counting = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                counting = int(head.split("-")[0], 16) in starts
            elif counting and head == "Rss:":
                total += int(line.split()[1])
    return total


def test_reader_pickles_without_its_maps(tmp_path):
    table = _saved_split(tmp_path, n=9)
    ds = _hf(table)
    ds.image(0)  # opens the maps in this process
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned DataLoader worker receives
    assert clone.reader is not None and clone.reader._state is None
    for i in (8, 0, 4):
        np.testing.assert_array_equal(np.asarray(clone.image(i)), np.asarray(ds.image(i)))


# --------------------------------------------------------------------- the training sampler under DDP
def test_ranks_split_the_single_process_batch_in_order():
    single = StepBatchSampler(50, 8, seed=3, drop_last=True)
    ranks = [StepBatchSampler(50, 8, seed=3, drop_last=True, rank=r, world_size=2) for r in range(2)]
    a, b = list(ranks[0]), list(ranks[1])
    assert len(a) == len(b) == len(single) == 6
    for step, (x, y) in enumerate(zip(a, b)):
        assert len(x) == len(y) == 4
        assert x + y == single.batch_at(step)  # rank 0's slice, then rank 1's: the global batch, in order
    # a pass resumed at step k (e.g. 9: epoch 1, batch 3) gives each rank the same slices as the straight run
    for k in (3, 9):
        resumed = [StepBatchSampler(50, 8, seed=3, drop_last=True, rank=r, world_size=2, step_fn=lambda k=k: k)
                   for r in range(2)]
        first = [next(iter(s)) for s in resumed]
        assert first[0] + first[1] == single.batch_at(k)
        assert first[0] == ranks[0].shard(single.batch_at(k))


def test_a_short_batch_is_cut_evenly_and_bad_sharding_is_refused():
    # a tiny split (one batch of 5, no drop_last) over 2 processes: 3 + 2
    parts = [next(iter(StepBatchSampler(5, 8, seed=0, drop_last=False, rank=r, world_size=2))) for r in range(2)]
    assert [len(p) for p in parts] == [3, 2]
    assert parts[0] + parts[1] == StepBatchSampler(5, 8, seed=0, drop_last=False).batch_at(0)
    with pytest.raises(ConfigError, match="batch_size 6 .* does not split evenly over 4 processes"):
        StepBatchSampler(50, 6, seed=0, drop_last=True, rank=0, world_size=4)
    with pytest.raises(ConfigError, match="rank 2 is not in 0..1"):
        StepBatchSampler(50, 8, seed=0, drop_last=True, rank=2, world_size=2)
    with pytest.raises(DataError, match="has a batch of 1, too few for 2 processes"):
        StepBatchSampler(9, 8, seed=0, drop_last=False, rank=0, world_size=2)


def test_sampler_state_checks_that_a_resume_samples_the_same_way():
    sampler = StepBatchSampler(20, 4, seed=1, drop_last=True, step_fn=lambda: 7)
    state = sampler.state_dict()
    assert state["step"] == 7
    StepBatchSampler(20, 4, seed=1, drop_last=True).load_state_dict(state)  # same sampling: accepted
    with pytest.raises(DataError, match="n: checkpoint 20, now 21"):
        StepBatchSampler(21, 4, seed=1, drop_last=True).load_state_dict(state)
    loader = StepDataLoader(list(range(20)), batch_sampler=sampler)
    from lightning_fabric.utilities.types import _Stateful

    assert isinstance(loader, _Stateful) and loader.state_dict() == state


# the tiny task and the crash callback of the exact-resume tests
from test_resume_exact import CrashAt as _CrashAt, Task as _Task  # noqa: E402


class _Record(pl.Callback):
    def __init__(self):
        self.flags = []

    def on_fit_start(self, trainer, module):
        self.flags.append(trainer._accelerator_connector.use_distributed_sampler)


def test_mid_epoch_resume_has_a_resumable_loader(tmp_path):
    cfg = TrainConfig(max_steps=9, batch_size=3, lr=1e-3, warmup_steps=1, progress_bar=False, accelerator="cpu",
                      eval_splits=[], checkpoint_every_n_steps=5)
    with pytest.raises(RuntimeError, match="injected crash"):
        finetune(TINY_VIT, _Task(), cfg, out_dir=tmp_path, seed=0, callbacks=[_CrashAt(6)])
    record = _Record()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = finetune(TINY_VIT, _Task(), cfg, out_dir=tmp_path, seed=0, callbacks=[record])
    assert result.metadata["global_step"] == 9
    assert not [w for w in caught if "not resumable" in str(w.message)]
    assert record.flags == [False]  # Lightning keeps our sampler under DDP


_DDP_CHILD = textwrap.dedent("""
    import json, sys
    import cl_merge
    import numpy as np
    import pytorch_lightning as pl
    from cl_merge.data import ArrayImageDataset
    from cl_merge.lit import TrainConfig, finetune
    from cl_merge.models import ModelConfig

    class Task:  # image i is the constant grey level i: a batch names its images
        name, classnames, templates = "grey", ["a", "b"], ["{{}}"]
        images = np.repeat(np.arange(40, dtype=np.uint8)[:, None, None, None] * 6, 12, 1).repeat(12, 2).repeat(3, 3)
        train = test = ArrayImageDataset(images, np.arange(40) % 2)

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            pixels = batch[0][:, 0, 0, 0]
            with open({out!r} + f"/rank{{trainer.global_rank}}.jsonl", "a") as f:
                f.write(json.dumps([trainer.global_step, pixels.tolist()]) + "\\n")

    cfg = TrainConfig(max_steps=7, batch_size=8, lr=1e-3, warmup_steps=1, progress_bar=False, accelerator="cpu",
                      devices={devices}, strategy={strategy!r}, eval_splits=[], checkpoint_every_n_steps=None)
    finetune(ModelConfig(family="vit", name="clmerge-tiny-vit"), Task(), cfg, out_dir={out!r} + "/run", seed=5,
             callbacks=[Record()])
""")


def _steps(path: Path) -> dict[int, list[float]]:
    import json

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {step: pixels for step, pixels in rows}


@pytest.mark.slow
def test_ddp_ranks_train_on_slices_of_the_single_process_batches(tmp_path):
    for name, devices, strategy in (("single", 1, "auto"), ("ddp", 2, "ddp")):
        out = tmp_path / name
        out.mkdir()
        script = tmp_path / f"{name}.py"
        script.write_text(_DDP_CHILD.format(out=str(out), devices=devices, strategy=strategy))
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
        proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    single = _steps(tmp_path / "single" / "rank0.jsonl")
    rank0, rank1 = (_steps(tmp_path / "ddp" / f"rank{r}.jsonl") for r in range(2))
    assert sorted(single) == sorted(rank0) == sorted(rank1) == list(range(7))
    for step in range(7):
        assert len(rank0[step]) == len(rank1[step]) == 4
        assert rank0[step] + rank1[step] == single[step]


def test_evaluation_trims_the_heap_without_changing_predictions(monkeypatch):
    import importlib

    from cl_merge.models import create_model

    evaluate_module = importlib.import_module("cl_merge.lit.evaluate")  # the module, not cl_merge.lit.evaluate()

    model = create_model("vit", "clmerge-tiny-vit")
    head = model.make_head(["a", "b", "c"])
    evaluate_module.release_freed_heap()  # the real one: glibc's malloc_trim, or nothing
    data = _Task(n_train=1, n_val=20).test
    plain = evaluate_module.predict_logits(model, None, head, data, batch_size=4)
    trims = []
    monkeypatch.setattr(evaluate_module, "TRIM_EVERY_BYTES", 1)  # after every batch
    monkeypatch.setattr(evaluate_module, "release_freed_heap", lambda: trims.append(1))
    trimmed = evaluate_module.predict_logits(model, None, head, data, batch_size=4)
    assert len(trims) == 5
    assert torch.equal(plain[0], trimmed[0]) and torch.equal(plain[1], trimmed[1])
