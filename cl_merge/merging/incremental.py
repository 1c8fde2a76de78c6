"""Incremental merging: a running state updated with one task vector at a
time, for the continual runner. Memory is the pretrained model plus the
strategy's fixed-size per-entry state, whatever the number of tasks.

The state can be saved and restored (``state_dict`` / ``load_state_dict``),
so a continual run resumes after the last merged task.
"""

from __future__ import annotations

from typing import Mapping

import torch

from cl_merge.core.state_dict import DictSource, KeyFilter, check_finite, is_float_dtype
from cl_merge.errors import HyperparameterError, MergeInputError
from cl_merge.merging.base import MergeMethod, TensorStream, builds_own_strategy, _as_source, compute_dtype_for, resolve_device

Tensor = torch.Tensor
_SEP = "::"


class IncrementalMerger:
    def __init__(self, method: MergeMethod, pretrained: Mapping[str, Tensor],
                 key_filter: KeyFilter | None = None, device=None):
        if builds_own_strategy(method):
            raise HyperparameterError(f"{method.name} runs through its own strategy: use incremental_merger(...) "
                                      "or build_strategy(...)")
        if not method.supports_incremental():
            if method.incremental:  # the class has one, these settings do not: let it say why
                method.init_state("", torch.zeros(()))
            raise HyperparameterError(f"{method.name} has no incremental form; merge the task vectors in one batch")
        self.method = method
        _as_source(pretrained, "pretrained")  # plain tensors with values, or a clear error
        self.pretrained = pretrained
        # where updates run; states and results stay on the CPU (bounded device memory)
        self.device = resolve_device(device)
        key_filter = key_filter or KeyFilter()
        self.keys = [k for k, v in pretrained.items() if is_float_dtype(v.dtype) and key_filter.selects(k)]
        if not self.keys:
            raise MergeInputError("no entries to merge: the include/exclude patterns left no floating-point tensor")
        with torch.no_grad():
            self.states = {k: method.init_state(k, self._dtype_base(k)) for k in self.keys}
        self.num_seen = 0

    def _dtype_base(self, key: str) -> Tensor:
        value = self.pretrained[key]
        return value.detach().to(compute_dtype_for(self.method.compute_dtype, value.dtype))

    def update(self, task_vector: Mapping[str, Tensor]) -> None:
        with torch.no_grad():
            self._update(task_vector)

    def _update(self, task_vector: Mapping[str, Tensor]) -> None:
        """Fold in one task vector (τ = θ_ft − θ0, e.g. a ``TaskVector``)."""
        if not isinstance(task_vector, Mapping):
            raise MergeInputError(f"a task vector must be a mapping of name to tensor, got {type(task_vector).__name__}")
        missing = [k for k in self.keys if k not in task_vector]
        if missing:
            raise MergeInputError(f"task vector lacks key {missing[0]!r}")
        for key in self.keys:
            if not isinstance(task_vector[key], torch.Tensor) or task_vector[key].device.type == "meta":
                _as_source({key: task_vector[key]}, f"task vector {self.num_seen}")
            if tuple(task_vector[key].shape) != tuple(self.pretrained[key].shape):
                raise MergeInputError(
                    f"shape mismatch for {key!r}: pretrained {list(self.pretrained[key].shape)}, "
                    f"task vector {list(task_vector[key].shape)}"
                )
            check_finite(key, task_vector[key], f"task vector {self.num_seen}")
        stream = TensorStream(DictSource(self.pretrained, "pretrained"), [DictSource(task_vector, "task vector")],
                              self.keys, self.method.compute_dtype, check=False, deltas_given=True,
                              device=self.device)
        context = self.method.prepare_task(stream)
        for key, base, (delta,) in stream:
            state = self.states[key]
            if self.device is not None:
                state = {name: t.to(self.device) for name, t in state.items()}
            state = self.method.update_state(key, base, state, delta, self.num_seen, context)
            self.states[key] = {name: t.detach().cpu() for name, t in state.items()}
        self.num_seen += 1

    def update_finetuned(self, finetuned: Mapping[str, Tensor]) -> None:
        """Fold in one fine-tuned model (its task vector is computed here)."""
        with torch.no_grad():
            self.update({k: finetuned[k].detach().to(self._dtype_base(k).dtype) - self._dtype_base(k)
                         for k in self.keys})

    def current(self) -> dict[str, Tensor]:
        """Merged weights of the tasks seen so far, in the pretrained dtypes
        (the pretrained model itself before any update)."""
        if self.num_seen == 0:
            return {key: value.detach() for key, value in self.pretrained.items()}
        out = {}
        with torch.no_grad():
            for key, value in self.pretrained.items():
                if key in self.states:
                    base, state = self._dtype_base(key), self.states[key]
                    if self.device is not None:
                        base = base.to(self.device)
                        state = {name: t.to(self.device) for name, t in state.items()}
                    weights = self.method.state_weights(key, base, state, self.num_seen)
                    out[key] = weights.detach().to(device="cpu", dtype=value.dtype)
                else:
                    out[key] = value.detach()
        return out

    # -------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Tensor]:
        flat = {f"{key}{_SEP}{name}": t for key, st in self.states.items() for name, t in st.items()}
        flat[f"{_SEP}num_seen"] = torch.tensor(self.num_seen)
        return flat

    def load_state_dict(self, flat: Mapping[str, Tensor]) -> None:
        if f"{_SEP}num_seen" not in flat:
            raise MergeInputError("incremental merge state lacks its task counter")
        states: dict[str, dict[str, Tensor]] = {k: {} for k in self.keys}
        for full, tensor in flat.items():
            if full == f"{_SEP}num_seen":
                continue
            key, _, name = full.rpartition(_SEP)
            if key not in states:
                raise MergeInputError(f"incremental merge state has unknown key {key!r}")
            states[key][name] = tensor
        expected = {name for name in self.states[self.keys[0]]}
        for key, st in states.items():
            if set(st) != set(self.states[key]):
                raise MergeInputError(f"incremental merge state for {key!r} has fields {sorted(st)}, "
                                      f"expected {sorted(expected)}")
        self.states = states
        self.num_seen = int(flat[f"{_SEP}num_seen"])
