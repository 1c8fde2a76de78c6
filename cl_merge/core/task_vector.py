"""Task vectors: fine-tuned minus pretrained weights (Ilharco et al., 2023,
"Editing Models with Task Arithmetic", https://arxiv.org/abs/2212.04089).

A ``TaskVector`` holds float32 deltas for the merged entries only (float
parameters selected by a ``KeyFilter``); ``apply_to`` adds a scaled vector to
a base model and returns weights in the base's own dtype, copying every
other entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import torch

from cl_merge.core.io import PathLike, load_state_dict, read_metadata, save_state_dict
from cl_merge.core.state_dict import (
    DictSource,
    check_finite,
    copied_entry,
    make_filter,
    plan_merge,
)
from cl_merge.errors import MergeInputError

Tensor = torch.Tensor
COMPUTE_DTYPE = torch.float32


class TaskVector(Mapping[str, Tensor]):
    def __init__(self, deltas: Mapping[str, Tensor], *, check: bool = True):
        self._deltas: dict[str, Tensor] = {}
        for key, value in deltas.items():
            if not value.is_floating_point():
                raise MergeInputError(f"task vector entry {key!r} has non-float dtype {value.dtype}")
            if check:
                check_finite(key, value, "task vector")
            self._deltas[key] = value if value.dtype in (torch.float32, torch.float64) else value.float()

    # -------------------------------------------------------------- construction
    @classmethod
    def from_state_dicts(
        cls,
        pretrained: Mapping[str, Tensor],
        finetuned: Mapping[str, Tensor],
        *,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
    ) -> "TaskVector":
        """τ = θ_ft − θ0 over the float entries the filter selects. Integer and
        bool buffers must match (they are not part of a task vector)."""
        pre, ft = DictSource(pretrained, "pretrained"), DictSource(finetuned, "fine-tuned")
        plan = plan_merge(pre, [ft], make_filter(include, exclude))
        for key in plan.copy_keys:
            copied_entry(key, pre, [ft])
        deltas = {}
        for key in plan.merge_keys:
            a, b = pretrained[key], finetuned[key]
            check_finite(key, a, "the pretrained model")
            check_finite(key, b, "the fine-tuned model")
            deltas[key] = b.to(COMPUTE_DTYPE) - a.to(COMPUTE_DTYPE)
        return cls(deltas, check=False)

    @classmethod
    def load(cls, path: PathLike) -> "TaskVector":
        return cls(load_state_dict(path))

    def save(self, path: PathLike, metadata: Mapping[str, str] | None = None) -> Path:
        meta = {"cl_merge_kind": "task_vector", **(metadata or {})}
        return save_state_dict(self._deltas, path, meta)

    # -------------------------------------------------------------- mapping protocol
    def __getitem__(self, key: str) -> Tensor:
        return self._deltas[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._deltas)

    def __len__(self) -> int:
        return len(self._deltas)

    def __repr__(self) -> str:
        return f"TaskVector({len(self)} tensors, {self.numel():,} entries, norm={self.norm():.4g})"

    # -------------------------------------------------------------- arithmetic
    def _check_same_keys(self, other: "TaskVector") -> None:
        if self._deltas.keys() != other._deltas.keys():
            diff = sorted(set(self._deltas) ^ set(other._deltas))
            raise MergeInputError(f"task vectors have different keys, e.g. {diff[0]!r}")
        for key, value in self._deltas.items():
            if value.shape != other._deltas[key].shape:
                raise MergeInputError(
                    f"shape mismatch for {key!r}: {list(value.shape)} vs {list(other._deltas[key].shape)}"
                )

    def __add__(self, other):
        if isinstance(other, (int, float)) and other == 0:  # lets sum() work
            return self
        if not isinstance(other, TaskVector):
            return NotImplemented
        self._check_same_keys(other)
        return TaskVector({k: v + other._deltas[k] for k, v in self._deltas.items()}, check=False)

    __radd__ = __add__

    def __sub__(self, other):
        if not isinstance(other, TaskVector):
            return NotImplemented
        self._check_same_keys(other)
        return TaskVector({k: v - other._deltas[k] for k, v in self._deltas.items()}, check=False)

    def __neg__(self):
        return TaskVector({k: -v for k, v in self._deltas.items()}, check=False)

    def __mul__(self, scalar):
        if not isinstance(scalar, (int, float)):
            return NotImplemented
        return TaskVector({k: v * scalar for k, v in self._deltas.items()}, check=False)

    __rmul__ = __mul__

    def __truediv__(self, scalar):
        if not isinstance(scalar, (int, float)):
            return NotImplemented
        return self * (1.0 / scalar)

    # -------------------------------------------------------------- use
    def apply_to(self, base: Mapping[str, Tensor], scaling: float = 1.0) -> dict[str, Tensor]:
        """θ = base + scaling · τ, each entry returned in the base's dtype."""
        missing = [k for k in self._deltas if k not in base]
        if missing:
            raise MergeInputError(f"base model lacks task-vector key {missing[0]!r}")
        out = {}
        for key, value in base.items():
            delta = self._deltas.get(key)
            if delta is None:
                out[key] = value
                continue
            if delta.shape != value.shape:
                raise MergeInputError(
                    f"shape mismatch for {key!r}: base {list(value.shape)}, task vector {list(delta.shape)}"
                )
            out[key] = (value.to(delta.dtype) + scaling * delta).to(value.dtype)
        return out

    def numel(self) -> int:
        return sum(v.numel() for v in self._deltas.values())

    def norm(self, p: float = 2.0) -> float:
        """The p-norm of the whole vector (all entries flattened together)."""
        if p == float("inf"):
            return max((float(v.abs().max()) for v in self._deltas.values() if v.numel()), default=0.0)
        total = sum(float(v.double().abs().pow(p).sum()) for v in self._deltas.values())
        return total ** (1.0 / p)

    def dot(self, other: "TaskVector") -> float:
        self._check_same_keys(other)
        return sum(float((v.double() * other._deltas[k].double()).sum()) for k, v in self._deltas.items())

    def flatten(self) -> Tensor:
        return torch.cat([v.reshape(-1) for v in self._deltas.values()]) if self._deltas else torch.empty(0)


def cosine_similarity_matrix(vectors: Sequence[TaskVector]) -> Tensor:
    """[T, T] cosine similarities of whole task vectors (float64)."""
    n = len(vectors)
    out = torch.eye(n, dtype=torch.float64)
    norms = [v.norm() for v in vectors]
    for i in range(n):
        for j in range(i + 1, n):
            denom = norms[i] * norms[j]
            out[i, j] = out[j, i] = vectors[i].dot(vectors[j]) / denom if denom > 0 else 0.0
    return out


def sign_conflict_matrix(vectors: Sequence[TaskVector]) -> Tensor:
    """[T, T] fraction of entries, among those non-zero in both vectors,
    whose signs differ (the interference TIES resolves)."""
    n = len(vectors)
    conflicts = torch.zeros(n, n, dtype=torch.float64)
    both = torch.zeros(n, n, dtype=torch.float64)
    for key in vectors[0]:
        signs = torch.stack([torch.sign(v[key]).reshape(-1) for v in vectors]).double()  # [T, d]
        nonzero = (signs != 0).double()
        both += nonzero @ nonzero.T
        # over entries non-zero in both, s_i·s_j sums agreements minus disagreements
        prod = signs @ signs.T
        conflicts += (nonzero @ nonzero.T - prod) / 2
    return torch.where(both > 0, conflicts / both.clamp(min=1), torch.zeros_like(both))


def sign_conflict_fraction(vectors: Sequence[TaskVector]) -> float:
    """Fraction of entries where at least two of the task vectors have opposite
    non-zero signs."""
    total, conflicted = 0, 0
    for key in vectors[0]:
        stacked = torch.stack([v[key].reshape(-1) for v in vectors])
        has_pos = (stacked > 0).any(0)
        has_neg = (stacked < 0).any(0)
        conflicted += int((has_pos & has_neg).sum())
        total += stacked.shape[1]
    return conflicted / total if total else 0.0


def task_vectors_from_files(paths: Iterable[PathLike]) -> list[TaskVector]:
    return [TaskVector.load(p) for p in paths]


def is_task_vector_file(path: PathLike) -> bool:
    return read_metadata(path).get("cl_merge_kind") == "task_vector"
