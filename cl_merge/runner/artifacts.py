"""How the runner stores a fine-tune, and the one way every reader gets it back.

A fine-tune is stored once: its encoder (``encoder.safetensors``, in the
model's own dtype). The task vector τ = θ_ft − θ0 is *derived* from it on
read, entry by entry, exactly as ``cl_merge.lit.finetune`` computes it
(float32 difference, float64 when θ0 is float64), so keeping both would only
double the disk footprint. ``metadata.json`` (written last) marks a finished
fine-tune; ``head.safetensors`` holds its head.

Every reader goes through :func:`task_vector`, :func:`encoder_state` and
:func:`is_complete`, so the layout is decided here and nowhere else.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Mapping

import torch

from cl_merge.core.io import CheckpointReader, load_state_dict

Tensor = torch.Tensor
ENCODER_FILE = "encoder.safetensors"
TASK_VECTOR_FILE = "task_vector.safetensors"
HEAD_FILE = "head.safetensors"
METADATA_FILE = "metadata.json"


def is_complete(out_dir: Path) -> bool:
    """A finished fine-tune: its metadata (written last) and its encoder are there."""
    return (out_dir / METADATA_FILE).exists() and (out_dir / ENCODER_FILE).exists()


def encoder_state(out_dir: Path) -> dict[str, Tensor]:
    return load_state_dict(out_dir / ENCODER_FILE)


def compact(out_dir: Path) -> None:
    """Drop what can be derived (the task vector file the fine-tune wrote)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(out_dir / TASK_VECTOR_FILE)


class DerivedTaskVector(Mapping[str, Tensor]):
    """τ = θ_ft − θ0 read lazily from a fine-tune's encoder file: one tensor
    at a time, so a batch merge over T tasks holds T open files, not T
    vectors. Keys: θ0's floating-point entries (what a task vector holds)."""

    def __init__(self, out_dir: Path, theta0: Mapping[str, Tensor]):
        self.path = Path(out_dir) / ENCODER_FILE
        self.theta0 = theta0
        self._keys = [k for k, v in theta0.items() if v.is_floating_point()]
        self._key_set = set(self._keys)
        self._reader: CheckpointReader | None = None
        self._last: tuple[str, Tensor] | None = None  # IncrementalMerger reads each entry several times

    def _open(self) -> CheckpointReader:
        if self._reader is None:
            self._reader = CheckpointReader(self.path)
        return self._reader

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._key_set:
            raise KeyError(key)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        base = self.theta0[key]
        dtype = torch.promote_types(base.dtype, torch.float32)
        value = self._open().get(key).to(dtype) - base.detach().cpu().to(dtype)
        self._last = (key, value)
        return value

    def get(self, key: str, default=None) -> Tensor:  # the lazy-source protocol: get(key) -> tensor
        if key not in self._key_set:
            if default is not None:
                return default
            raise KeyError(key)
        return self[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.theta0[key].shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._key_set

    def keys(self):
        return list(self._keys)

    def materialize(self) -> dict[str, Tensor]:
        return {k: self[k] for k in self._keys}


def task_vector(out_dir: Path, theta0: Mapping[str, Tensor]) -> DerivedTaskVector:
    """The fine-tune's task vector relative to θ0 (lazy)."""
    return DerivedTaskVector(out_dir, theta0)


def folder_size(path: Path) -> int:
    """Bytes under ``path`` (for footprint reports)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
