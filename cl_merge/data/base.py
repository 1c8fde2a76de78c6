"""Lightweight labeled image datasets.

Every dataset here yields ``(PIL.Image in RGB, int label)`` and exposes its labels
as an int64 numpy array (``.labels``) so that splits, k-shot sampling and class
subsets never decode an image. In-memory sources hold uint8 arrays and build the
PIL image on access; file sources hold paths and decode with PIL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image


class LabeledDataset(torch.utils.data.Dataset):
    """Base: subclasses set ``labels`` (int64 array) and implement ``image(i)``."""

    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def image(self, index: int) -> Image.Image:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.image(index), int(self.labels[index])


class ArrayImageDataset(LabeledDataset):
    """uint8 images ``(N, H, W)`` (grayscale) or ``(N, H, W, 3)`` (RGB) in memory."""

    def __init__(self, images: np.ndarray, labels: Sequence[int] | np.ndarray):
        images = np.asarray(images)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8, got {images.dtype}")
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
            raise ValueError(f"images must be (N, H, W) or (N, H, W, 3), got {images.shape}")
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images = images
        self.labels = labels

    def image(self, index: int) -> Image.Image:
        array = self.images[index]
        return Image.fromarray(array, mode="L" if array.ndim == 2 else "RGB").convert("RGB")


class FileImageDataset(LabeledDataset):
    """Image files decoded with PIL (torchvision.io cannot decode on CPU-only torch here)."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int] | np.ndarray):
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(paths) != labels.shape[0]:
            raise ValueError(f"{len(paths)} paths but {labels.shape[0]} labels")
        self.paths = [str(p) for p in paths]
        self.labels = labels

    def image(self, index: int) -> Image.Image:
        with Image.open(self.paths[index]) as img:
            return img.convert("RGB")


class CallableImageDataset(LabeledDataset):
    """Images produced by ``get_image(i)`` (e.g. a torchvision dataset's own reader)."""

    def __init__(self, get_image: Callable[[int], Image.Image], labels: Sequence[int] | np.ndarray):
        self._get_image = get_image
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)

    def image(self, index: int) -> Image.Image:
        return self._get_image(index).convert("RGB")


class TaskSplit(LabeledDataset):
    """A view: selected indices of a source, labels remapped, an image variant applied."""

    def __init__(
        self,
        source: LabeledDataset,
        indices: Sequence[int] | np.ndarray,
        *,
        label_map: np.ndarray | None = None,
        variant: Callable[[Image.Image], Image.Image] | None = None,
    ):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        self.label_map = label_map
        self.variant = variant
        raw = source.labels[self.indices]
        self.labels = label_map[raw] if label_map is not None else raw

    def image(self, index: int) -> Image.Image:
        img = self.source.image(int(self.indices[index]))
        return self.variant(img) if self.variant is not None else img

    def subset(self, positions: Sequence[int] | np.ndarray) -> "TaskSplit":
        """The view restricted to ``positions`` (indices into this view)."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        return TaskSplit(self.source, self.indices[positions], label_map=self.label_map, variant=self.variant)
