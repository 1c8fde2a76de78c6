"""Attach transforms to datasets, or precompute them once.

``cache_tensors`` runs a deterministic transform over a whole dataset once and keeps
the results in one tensor, so epochs over tiny images (28 px) skip the PIL work.
A random augmentation must not be cached: it would freeze one draw.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


class TransformedDataset(torch.utils.data.Dataset):
    """``(transform(image), label)`` for each ``(image, label)`` of ``dataset``."""

    def __init__(self, dataset, transform: Callable):
        self.dataset = dataset
        self.transform = transform
        if hasattr(dataset, "labels"):
            self.labels = dataset.labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return self.transform(image), label


def with_transform(dataset, transform: Callable) -> TransformedDataset:
    return TransformedDataset(dataset, transform)


class TensorCacheDataset(torch.utils.data.TensorDataset):
    """A TensorDataset of ``(inputs, labels)`` that keeps ``labels`` as a numpy array too."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor):
        super().__init__(inputs, labels)
        self.inputs = inputs
        self.labels = labels.numpy()

    def __getitem__(self, index: int):
        return self.inputs[index], int(self.labels[index])


def cache_tensors(dataset, transform: Callable, *, dtype: torch.dtype | None = None) -> TensorCacheDataset:
    """Apply ``transform`` (deterministic) to every image once; keep one stacked tensor.

    ``dtype`` (e.g. ``torch.float16``) shrinks the cache; items come back in that dtype.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("cache_tensors: the dataset is empty")
    first_image, first_label = dataset[0]
    first = transform(first_image)
    if not isinstance(first, torch.Tensor):
        raise TypeError(f"cache_tensors: the transform must return a tensor, got {type(first).__name__}")
    out = torch.empty((n, *first.shape), dtype=dtype or first.dtype)
    labels = np.empty(n, dtype=np.int64)
    out[0], labels[0] = first, first_label
    for i in range(1, n):
        image, labels[i] = dataset[i]
        out[i] = transform(image)
    return TensorCacheDataset(out, torch.from_numpy(labels))
