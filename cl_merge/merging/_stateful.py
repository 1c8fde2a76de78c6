"""Shared plumbing for strategies that keep a running merged task vector of
their own (OPCM, DOP, CoFiMA): which entries they merge, how a task vector is
read (a dict, a ``TaskVector`` or a lazy reader), the merged weights, and the
flat tensor dict that saves and restores the running state.

The running state is always θ0 (not owned) + one merged task vector
τ_m (one tensor per merged entry) + what the strategy adds (scalars, one
Fisher tensor per entry), whatever the number of absorbed tasks.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from cl_merge.core.state_dict import KeyFilter, check_finite, is_float_dtype
from cl_merge.errors import HyperparameterError, MergeInputError
from cl_merge.merging.lifecycle import MergeStrategy, TaskInput

Tensor = torch.Tensor

_MERGED = "merged/"
_SCALAR = "scalar/"
_COUNT = "scalar/num_absorbed"


def compute_dtype_of(tensor: Tensor) -> torch.dtype:
    """float32, or the input's own precision when it is higher (float64)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def read_entry(task_vector: Any, key: str, like: Tensor, index: int, present: bool | None = None) -> Tensor:
    """Entry ``key`` of a task vector as a fresh tensor in ``like``'s compute
    dtype. A float entry the task vector lacks is a zero delta (it was left
    out when the task vector was made, as the merge engine treats it)."""
    dtype = compute_dtype_of(like)
    if present is None:
        present = key in task_vector if isinstance(task_vector, Mapping) else key in set(task_vector.keys())
    if not present:
        return torch.zeros(like.shape, dtype=dtype)
    value = task_vector[key] if isinstance(task_vector, Mapping) else task_vector.get(key)
    if not isinstance(value, Tensor):
        raise MergeInputError(f"task vector {index}: {key!r} is a {type(value).__name__}, not a tensor")
    if tuple(value.shape) != tuple(like.shape):
        raise MergeInputError(f"shape mismatch for {key!r}: pretrained {list(like.shape)}, "
                              f"task vector {index} {list(value.shape)}")
    check_finite(key, value, f"task vector {index}")
    return value.detach().to(dtype, copy=True)


class RunningMergeStrategy(MergeStrategy):
    """A strategy whose state is one merged task vector ``self.merged`` (plus
    the tensors in ``self.extra`` and the floats in ``self.scalars``)."""

    incremental = True

    def __init__(self, method, key_filter: KeyFilter | None = None, device=None):
        super().__init__(method)
        self.key_filter = key_filter or KeyFilter()
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.keys: list[str] = []
        self.merged: dict[str, Tensor] = {}
        self.extra: dict[str, dict[str, Tensor]] = {}
        self.scalars: dict[str, float] = {}

    def _start(self) -> None:
        self.keys = [k for k, v in self.pretrained.items()
                     if isinstance(v, Tensor) and is_float_dtype(v.dtype) and self.key_filter.selects(k)]
        if not self.keys:
            raise MergeInputError("no entries to merge: the include/exclude patterns left no floating-point tensor")
        self.merged = {}
        self.extra = {}
        self.scalars = {}
        self._failed = False

    def absorb(self, task: TaskInput) -> None:
        if getattr(self, "_failed", False):
            raise MergeInputError(f"{self.name}: an earlier absorb() failed half-way; the running state is "
                                  "inconsistent: start() again or restore a saved state")
        if self.pretrained is not None:
            self.check_task_vector(task)
        super().absorb(task)

    def _absorb(self, task: TaskInput) -> None:
        try:
            self._step(task)
        except Exception:
            self._failed = True
            raise

    def _step(self, task: TaskInput) -> None:
        """Fold one task into the running state (subclasses)."""
        raise NotImplementedError

    def check_task_vector(self, task: TaskInput) -> None:
        """Shapes (and, for in-memory task vectors, NaN/Inf) of every entry
        before any state changes, so a bad input leaves the state intact."""
        tv = task.task_vector
        in_memory = isinstance(tv, Mapping)
        if not in_memory and not (hasattr(tv, "keys") and hasattr(tv, "get")):
            raise MergeInputError(f"task vector {task.index} must be a state dict (mapping of name to tensor), "
                                  f"got {type(tv).__name__}")
        self._present = set(tv.keys())
        for key in self.keys:
            if key not in self._present:
                continue
            if in_memory:
                value = tv[key]
                shape = tuple(value.shape) if isinstance(value, Tensor) else None
            else:
                shape = tuple(tv.shape(key)) if hasattr(tv, "shape") else None
                value = None
            if shape is not None and shape != tuple(self.pretrained[key].shape):
                raise MergeInputError(f"shape mismatch for {key!r}: pretrained {list(self.pretrained[key].shape)}, "
                                      f"task vector {task.index} {list(shape)}")
            if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value.sum())):
                check_finite(key, value, f"task vector {task.index}")

    def read(self, task: TaskInput, key: str) -> Tensor:
        present = getattr(self, "_present", None)
        return read_entry(task.task_vector, key, self.pretrained[key], task.index,
                          None if present is None else key in present)

    def update_finetuned(self, finetuned: Mapping[str, Tensor]) -> None:
        """Absorb one fine-tuned model (its task vector is computed here)."""
        tv = {}
        for key in self.keys:
            if key not in finetuned:
                raise MergeInputError(f"fine-tuned model {self.num_absorbed} lacks key {key!r}")
            dtype = compute_dtype_of(self.pretrained[key])
            tv[key] = finetuned[key].detach().to(dtype) - self.pretrained[key].detach().to(dtype)
        self.update(tv)

    def merged_weights(self, merged: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """θ0 + τ_m in the pretrained dtypes; entries not merged are θ0's own."""
        out = {}
        for key, base in self.pretrained.items():
            if key in merged:
                dtype = compute_dtype_of(base)
                out[key] = (base.detach().to(dtype) + merged[key].to(dtype)).to(base.dtype)
            else:
                out[key] = base
        return out

    def current(self, **overrides):
        if overrides:
            raise HyperparameterError(f"{self.name}: {sorted(overrides)[0]!r} shapes the absorbed state; "
                                      "build a new strategy to change it")
        if self.num_absorbed == 0:
            return dict(self.pretrained)
        return self.merged_weights(self.merged)

    # -------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Tensor]:
        flat = {_MERGED + k: v for k, v in self.merged.items()}
        for field, tensors in self.extra.items():
            flat.update({f"{field}/{k}": v for k, v in tensors.items()})
        flat.update({_SCALAR + name: torch.tensor(value, dtype=torch.float64) for name, value in self.scalars.items()})
        flat[_COUNT] = torch.tensor(self.num_absorbed)
        return flat

    def load_state_dict(self, state: Mapping[str, Tensor], num_absorbed: int) -> None:
        if self.pretrained is None:
            raise RuntimeError(f"{self.name}: start() before load_state_dict()")
        if _COUNT not in state:
            raise MergeInputError(f"{self.name}: saved state lacks its task counter")
        saved = int(state[_COUNT])
        if saved != num_absorbed:
            raise MergeInputError(f"{self.name}: saved state holds {saved} task(s), expected {num_absorbed}")
        merged: dict[str, Tensor] = {}
        extra: dict[str, dict[str, Tensor]] = {}
        scalars: dict[str, float] = {}
        for name, tensor in state.items():
            if name == _COUNT:
                continue
            if name.startswith(_SCALAR):
                scalars[name[len(_SCALAR):]] = float(tensor)
                continue
            field, _, key = name.partition("/")
            if key not in self.pretrained:
                raise MergeInputError(f"{self.name}: saved state has unknown key {key!r}")
            if tuple(tensor.shape) != tuple(self.pretrained[key].shape):
                raise MergeInputError(f"{self.name}: saved state for {key!r} has shape {list(tensor.shape)}, "
                                      f"the model has {list(self.pretrained[key].shape)}")
            target = merged if field + "/" == _MERGED else extra.setdefault(field, {})
            target[key] = tensor.clone()
        if saved > 0 and set(merged) != set(self.keys):
            missing = sorted(set(self.keys) - set(merged))
            raise MergeInputError(f"{self.name}: saved state lacks the merged entry {missing[0]!r}"
                                  if missing else f"{self.name}: saved state merges other entries than this model")
        self.merged, self.extra, self.scalars = merged, extra, scalars
        self.num_absorbed = saved
        self._failed = False


__all__ = ["RunningMergeStrategy", "read_entry", "compute_dtype_of"]
