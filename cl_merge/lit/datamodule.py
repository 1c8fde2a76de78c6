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
from cl_merge.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# a transformed split is cached as tensors only up to this size (tiny offline data)
CACHE_LIMIT_BYTES = 256 * 2**20
_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: keeps (seed, epoch) pairs apart


def _mixed_seed(*parts: int) -> int:
    value = 0
    for part in parts:
        value = (value * _MIX + int(part) + 1) % (2**63 - 1)
    return value


def _distributed_rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(index, epoch)`` keys; the batch at global step ``s`` is a
    function of ``(seed, s)`` alone.

    Epoch ``e`` = steps ``e*B .. (e+1)*B - 1`` (``B`` = batches per epoch) is one
    seeded permutation. Each ``__iter__`` starts at ``step_fn()`` (the trainer's
    ``global_step`` when the pass begins) and runs to the end of that epoch, so
    the pass after a resume yields only the batches the checkpoint had not seen.

    Distributed (DDP): ``batch_size`` is the global batch. Rank ``r`` of
    ``world_size`` yields its contiguous slice of the global batch of each step
    (the ranks' slices, concatenated in rank order, are the single-process
    batch), so the data seen per step, and a resume, do not depend on the
    number of processes. ``rank``/``world_size`` default to torch.distributed's
    when a process group is initialised, else a single process.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, drop_last: bool, shuffle: bool = True,
                 step_fn: Callable[[], int] | None = None, rank: int | None = None, world_size: int | None = None):
        if n < 1:
            raise DataError("cannot sample batches from an empty split")
        self.n, self.batch_size, self.seed = n, batch_size, int(seed)
        self.drop_last, self.shuffle = drop_last, shuffle
        self.step_fn = step_fn or (lambda: 0)
        if rank is None or world_size is None:
            found_rank, found_world = _distributed_rank_and_world()
            rank = found_rank if rank is None else rank
            world_size = found_world if world_size is None else world_size
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"batch sampler: rank {rank} is not in 0..{world_size - 1}")
        if batch_size % world_size:
            raise ConfigError(f"batch_size {batch_size} (the global batch) does not split evenly over "
                              f"{world_size} processes; use a multiple of {world_size}")
        smallest = n % batch_size if not drop_last and n % batch_size else batch_size
        if smallest < world_size:  # a process without a sample would stall the others' gradient sync
            raise DataError(f"a split of {n} images in batches of {batch_size} has a batch of {smallest}, "
                            f"too few for {world_size} processes")
        self.rank, self.world_size = int(rank), int(world_size)

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        generator = torch.Generator().manual_seed(_mixed_seed(self.seed, epoch))
        return torch.randperm(self.n, generator=generator)

    def batch_at(self, step: int) -> list[tuple[int, int]]:
        """The global batch of ``step`` (all ranks)."""
        epoch, position = divmod(int(step), len(self))
        order = self.order(epoch)[position * self.batch_size:(position + 1) * self.batch_size]
        return [(int(i), epoch) for i in order]

    def shard(self, batch: list) -> list:
        """This rank's contiguous slice of a global batch (a short last batch
        is cut as evenly as it goes, the first ranks taking one more)."""
        if self.world_size == 1:
            return batch
        base, extra = divmod(len(batch), self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return batch[start:start + base + (1 if self.rank < extra else 0)]

    def __iter__(self):
        step = int(self.step_fn())
        epoch, position = divmod(step, len(self))
        order = self.order(epoch).tolist()
        for b in range(position, len(self)):
            yield self.shard([(i, epoch) for i in order[b * self.batch_size:(b + 1) * self.batch_size]])

    # Lightning checkpoints the state of a loader that has these (see StepDataLoader). The position is
    # the trainer's global step, restored with the checkpoint, so the state only records it and checks
    # that the resumed run samples the same way.
    def state_dict(self) -> dict:
        return {"step": int(self.step_fn()), "n": self.n, "batch_size": self.batch_size, "seed": self.seed,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        ours = self.state_dict()
        changed = [k for k in ("n", "batch_size", "seed", "shuffle") if k in state and state[k] != ours[k]]
        if changed:
            raise DataError("resuming a fine-tune whose training batches were drawn differently ("
                            + ", ".join(f"{k}: checkpoint {state[k]}, now {ours[k]}" for k in changed)
                            + "): the batches after the resume would not continue the interrupted run")


class StepDataLoader(DataLoader):
    """A DataLoader over a :class:`StepBatchSampler` that Lightning treats as
    resumable: its ``state_dict``/``load_state_dict`` are the sampler's, so a
    mid-epoch resume no longer warns that the loader is not resumable (it is:
    the next pass starts at the restored global step)."""

    def state_dict(self) -> dict:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.load_state_dict(state)


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
        trainer = getattr(self, "trainer", None)
        # under DDP each process takes its slice of the global batch (the Trainer is built with
        # use_distributed_sampler=False so that Lightning keeps this sampler)
        ranks = {"rank": trainer.global_rank, "world_size": trainer.world_size} if trainer is not None else {}
        return StepBatchSampler(len(dataset), self.batch_size, seed=self.seed,
                                drop_last=len(dataset) >= self.batch_size,  # equal-size steps, unless tiny
                                step_fn=self._global_step, **ranks)

    def train_dataloader(self) -> DataLoader:
        return StepDataLoader(self.split("train"), batch_sampler=self.train_sampler(),
                              **self._options(persistent=True))

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
