"""``TaskDataModule``: one task's splits under a model's transforms.

Shuffling draws from a ``torch.Generator`` seeded with ``seed`` (never the
global RNG), so the same seed gives the same batches. Subsets, k-shot and
validation carve-outs come from the data layer (``cl_merge.data.load_task``).
"""

from __future__ import annotations

from typing import Callable

import cl_merge._torchvision_compat  # noqa: F401  (before Lightning imports torchvision)
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from cl_merge.data import cache_tensors, with_transform
from cl_merge.errors import DataError


class TaskDataModule(pl.LightningDataModule):
    """``task`` needs ``.train`` and optionally ``.val``/``.test`` datasets of
    ``(PIL image, label)`` (a ``cl_merge.data.TaskData``).

    ``cache``: run the (deterministic) transforms once and keep tensors
    (fast epochs over small images); never with a random train transform.
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
        pin_memory: bool = False,
    ):
        super().__init__()
        self.task = task
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.cache = cache
        self.pin_memory = pin_memory
        self._sets: dict[str, Dataset] = {}

    def split(self, name: str) -> Dataset | None:
        """The transformed split (``train``/``val``/``test``), or None if absent or empty."""
        if name not in self._sets:
            raw = getattr(self.task, name, None)
            if raw is None or len(raw) == 0:
                return None
            transform = self.train_transform if name == "train" else self.eval_transform
            self._sets[name] = cache_tensors(raw, transform) if self.cache else with_transform(raw, transform)
        return self._sets[name]

    def setup(self, stage: str | None = None) -> None:
        if self.split("train") is None:
            raise DataError(f"task {getattr(self.task, 'name', '?')!r} has an empty training split")

    def _loader(self, dataset: Dataset, *, train: bool) -> DataLoader:
        batch_size = self.batch_size if train else self.eval_batch_size
        generator = torch.Generator().manual_seed(self.seed) if train else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            generator=generator,
            drop_last=train and len(dataset) >= batch_size,  # equal-size steps, unless the set is tiny
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.split("train"), train=True)

    def val_dataloader(self) -> DataLoader | list:
        dataset = self.split("val")
        return self._loader(dataset, train=False) if dataset is not None else []

    def test_dataloader(self) -> DataLoader | list:
        dataset = self.split("test")
        return self._loader(dataset, train=False) if dataset is not None else []
