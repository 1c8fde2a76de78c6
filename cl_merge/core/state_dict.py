"""State-dict checks and the choice of which entries a merge touches.

A merge *plan* splits the keys of the inputs into
- ``merge_keys``: floating-point entries selected by include/exclude patterns;
- ``copy_keys``: everything else, taken from the pretrained model. Integer
  and bool buffers (e.g. BatchNorm's ``num_batches_tracked``, position ids)
  must be identical across all inputs, otherwise merging them is meaningless.

Patterns are shell-style globs (``visual.transformer.*``), or regular
expressions when prefixed with ``re:`` (``re:.*\\.ln_\\d+\\..*``).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

import torch

from cl_merge.errors import MergeInputError

Tensor = torch.Tensor


class TensorSource(Protocol):
    """Anything with ``keys()`` and ``get(key)``: a dict adapter or a lazy checkpoint."""

    def keys(self): ...
    def get(self, key: str) -> Tensor: ...


class DictSource:
    """Adapter giving a plain state dict the ``TensorSource`` interface."""

    def __init__(self, state_dict: Mapping[str, Tensor], name: str = "state dict"):
        self.state_dict = state_dict
        self.path = name

    def keys(self):
        return list(self.state_dict.keys())

    def get(self, key: str) -> Tensor:
        return self.state_dict[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.state_dict[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.state_dict[key].dtype


def source_name(source) -> str:
    return str(getattr(source, "path", "state dict"))


def _compile(pattern: str):
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        return lambda key: rx.fullmatch(key) is not None
    return lambda key: fnmatch.fnmatchcase(key, pattern)


@dataclass(frozen=True)
class KeyFilter:
    """Which float entries to merge. ``include=None`` means all."""

    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        for pattern in (self.include or ()) + tuple(self.exclude):
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise MergeInputError(f"invalid key pattern {pattern!r}: {exc}") from None

    def selects(self, key: str) -> bool:
        if self.include is not None and not any(_compile(p)(key) for p in self.include):
            return False
        return not any(_compile(p)(key) for p in self.exclude)


def make_filter(include: Sequence[str] | str | None = None, exclude: Sequence[str] | str | None = None) -> KeyFilter:
    if isinstance(include, str):
        include = [include]
    if isinstance(exclude, str):
        exclude = [exclude]
    return KeyFilter(tuple(include) if include is not None else None, tuple(exclude or ()))


def is_float_dtype(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


@dataclass
class MergePlan:
    merge_keys: list[str] = field(default_factory=list)
    copy_keys: list[str] = field(default_factory=list)


def _meta(source, key):
    if hasattr(source, "shape"):
        return tuple(source.shape(key)), source.dtype(key)
    tensor = source.get(key)
    return tuple(tensor.shape), tensor.dtype


def plan_merge(pretrained, finetuned: Sequence, key_filter: KeyFilter | None = None) -> MergePlan:
    """Check that all inputs have the same keys, shapes and kinds of dtype;
    split keys into merged and copied. Reads shapes only, never values."""
    key_filter = key_filter or KeyFilter()
    if len(finetuned) == 0:
        raise MergeInputError("the list of fine-tuned models is empty: give at least one")
    ref_keys = list(pretrained.keys())
    ref_set = set(ref_keys)
    for i, model in enumerate(finetuned):
        keys = set(model.keys())
        if keys != ref_set:
            missing = sorted(ref_set - keys)
            extra = sorted(keys - ref_set)
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} key(s) of the pretrained model, first {missing[0]!r}")
            if extra:
                parts.append(f"has {len(extra)} key(s) the pretrained model lacks, first {extra[0]!r}")
            raise MergeInputError(f"fine-tuned model {i} ({source_name(model)}) " + "; ".join(parts))
    plan = MergePlan()
    for key in ref_keys:
        shape, dtype = _meta(pretrained, key)
        for i, model in enumerate(finetuned):
            other_shape, other_dtype = _meta(model, key)
            if other_shape != shape:
                raise MergeInputError(
                    f"shape mismatch for {key!r}: pretrained {list(shape)}, fine-tuned model {i} {list(other_shape)}"
                )
            if is_float_dtype(other_dtype) != is_float_dtype(dtype):
                raise MergeInputError(
                    f"dtype mismatch for {key!r}: pretrained {dtype}, fine-tuned model {i} {other_dtype}"
                )
        if is_float_dtype(dtype) and key_filter.selects(key):
            plan.merge_keys.append(key)
        else:
            plan.copy_keys.append(key)
    if not plan.merge_keys:
        raise MergeInputError("no entries to merge: the include/exclude patterns left no floating-point tensor")
    return plan


def check_finite(key: str, tensor: Tensor, where: str) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        kind = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
        raise MergeInputError(f"{kind} in tensor {key!r} of {where}")


def copied_entry(key: str, pretrained, finetuned: Sequence) -> Tensor:
    """A non-merged entry: taken from the pretrained model; integer/bool buffers
    must be equal in every input."""
    value = pretrained.get(key)
    if not value.is_floating_point():
        for i, model in enumerate(finetuned):
            if not torch.equal(model.get(key), value):
                raise MergeInputError(
                    f"non-float buffer {key!r} differs between the pretrained model and fine-tuned model {i};"
                    " integer/bool buffers are copied, not merged, so they must be identical"
                )
    return value
