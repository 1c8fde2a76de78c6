"""``TaskDataModule``: one task's splits under a model's transforms, streamed.

Images are decoded and transformed in DataLoader workers, batch by batch: no
split is held as tensors (peak memory does not grow with the dataset), except
a tiny one when ``cache`` asks for it (below :data:`CACHE_LIMIT_BYTES`).

The training order is a pure function of ``(seed, step)``:
:class:`StepBatchSampler` draws epoch ``e``'s permutation from a generator
seeded with ``(seed, e)`` and starts each pass at the trainer's
``global_step``, so a fine-tune resumed from a mid-training checkpoint sees
exactly the batches an uninterrupted one would. Random training transforms
(``augment``) draw from a generator seeded per ``(seed, pass, image)``, so the
crops are the same whatever the worker count and after a resume.
"""

from __future__ import annotations

import logging
import random
from typing import Callable

import cl_merge._torchvision_compat  # noqa: F401  (before Lightning imports torchvision)
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cl_merge.data import cache_tensors
from cl_merge.errors import DataError

log = logging.getLogger(__name__)

# a transformed split is cached as tensors only up to this size (tiny offline data)
CACHE_LIMIT_BYTES = 256 * 2**20
_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: keeps (seed, epoch) pairs apart


def _mixed_seed(*parts: int) -> int:
    value = 0
    for part in parts:
        value = (value * _MIX + int(part) + 1) % (2**63 - 1)
    return value


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(index, epoch)`` keys; the batch at global step ``s`` is a
    function of ``(seed, s)`` alone.

    Epoch ``e`` = steps ``e*B .. (e+1)*B - 1`` (``B`` = batches per epoch) is one
    seeded permutation. Each ``__iter__`` starts at ``step_fn()`` (the trainer's
    ``global_step`` when the pass begins) and runs to the end of that epoch, so
    the pass after a resume yields only the batches the checkpoint had not seen.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, drop_last: bool, shuffle: bool = True,
                 step_fn: Callable[[], int] | None = None):
        if n < 1:
            raise DataError("cannot sample batches from an empty split")
        self.n, self.batch_size, self.seed = n, batch_size, int(seed)
        self.drop_last, self.shuffle = drop_last, shuffle
        self.step_fn = step_fn or (lambda: 0)

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        generator = torch.Generator().manual_seed(_mixed_seed(self.seed, epoch))
        return torch.randperm(self.n, generator=generator)

    def batch_at(self, step: int) -> list[tuple[int, int]]:
        epoch, position = divmod(int(step), len(self))
        order = self.order(epoch)[position * self.batch_size:(position + 1) * self.batch_size]
        return [(int(i), epoch) for i in order]

    def __iter__(self):
        step = int(self.step_fn())
        epoch, position = divmod(step, len(self))
        order = self.order(epoch).tolist()
        for b in range(position, len(self)):
            yield [(i, epoch) for i in order[b * self.batch_size:(b + 1) * self.batch_size]]


class StreamedSplit(Dataset):
    """``(transform(image), label)`` per key; a key is an index or ``(index, epoch)``.

    With ``seed`` set, the transform runs under a generator seeded with
    ``(seed, epoch, index)`` (torch's and Python's global generators are
    restored afterwards), so random
    augmentation is reproducible across workers, processes and resumes.
    """

    def __init__(self, dataset, transform: Callable, *, seed: int | None = None):
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.labels = getattr(dataset, "labels", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        image, label = self.dataset[int(index)]
        if isinstance(image, torch.Tensor):  # a cached (already transformed) split
            return image, int(label)
        if self.seed is None:
            return self.transform(image), int(label)
        seed = _mixed_seed(self.seed, epoch, index)
        # torchvision draws from torch's generator, timm's transforms from Python's random
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                return self.transform(image), int(label)
            finally:
                random.setstate(python_state)


def loader_options(num_workers: int, *, pin_memory: bool, persistent_workers: bool,
                   prefetch_factor: int | None) -> dict:
    """DataLoader keyword arguments (worker-only ones only with workers)."""
    options = {"num_workers": num_workers, "pin_memory": pin_memory}
    if num_workers > 0:
        options["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            options["prefetch_factor"] = prefetch_factor
    return options


def _estimated_bytes(dataset, transform: Callable) -> int:
    first = transform(dataset[0][0])
    return int(first.numel() * first.element_size() * len(dataset)) if isinstance(first, torch.Tensor) else 1 << 62


class TaskDataModule(pl.LightningDataModule):
    """``task`` needs ``.train`` and optionally ``.val``/``.test`` datasets of
    ``(PIL image, label)`` (a ``cl_merge.data.TaskData``).

    ``cache``: run the (deterministic) transforms once and keep tensors, for
    tiny offline splits only: a split whose tensors would exceed
    :data:`CACHE_LIMIT_BYTES` is streamed instead. Never with a random train
    transform. ``pin_memory`` ``None``: on when CUDA is available.
    """

    def __init__(
        self,
        task,
        *,
        train_transform: Callable,
        eval_transform: Callable,
        batch_size: int,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        cache: bool = False,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        prefetch_factor: int | None = None,
        augment: bool = False,
    ):
        super().__init__()
        self.task = task
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.cache = cache and not augment
        self.augment = augment
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers
        self.prefetch_factor = prefetch_factor
        self._sets: dict[str, Dataset] = {}

    def split(self, name: str) -> Dataset | None:
        """The transformed split (``train``/``val``/``test``), or None if absent or empty."""
        if name not in self._sets:
            raw = getattr(self.task, name, None)
            if raw is None or len(raw) == 0:
                return None
            transform = self.train_transform if name == "train" else self.eval_transform
            if self.cache:
                size = _estimated_bytes(raw, transform)
                if size <= CACHE_LIMIT_BYTES:
                    raw = cache_tensors(raw, transform)
                else:
                    log.info("%s split: %.0f MiB of tensors is over the cache limit; streaming it instead",
                             name, size / 2**20)
            seed = self.seed if name == "train" and self.augment else None
            self._sets[name] = StreamedSplit(raw, transform, seed=seed)
        return self._sets[name]

    def setup(self, stage: str | None = None) -> None:
        if self.split("train") is None:
            raise DataError(f"task {getattr(self.task, 'name', '?')!r} has an empty training split")

    def _options(self, *, persistent: bool) -> dict:
        return loader_options(self.num_workers, pin_memory=self.pin_memory,
                              persistent_workers=persistent and self.persistent_workers,
                              prefetch_factor=self.prefetch_factor)

    def _global_step(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.global_step) if trainer is not None else 0

    def train_sampler(self) -> StepBatchSampler:
        dataset = self.split("train")
        return StepBatchSampler(len(dataset), self.batch_size, seed=self.seed,
                                drop_last=len(dataset) >= self.batch_size,  # equal-size steps, unless tiny
                                step_fn=self._global_step)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.split("train"), batch_sampler=self.train_sampler(), **self._options(persistent=True))

    def _eval_loader(self, name: str) -> DataLoader | list:
        dataset = self.split(name)
        if dataset is None:
            return []
        # evaluation passes are few: persistent workers would only hold memory between them
        return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False, **self._options(persistent=False))

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loader("test")
