"""What a data-based strategy may ask for, and nothing else: a functional
forward of the model under given weights, the device and dtype.

The module's own parameter values are never used: ``call(weights, batch)``
runs ``torch.func.functional_call(module, weights, ...)`` so a strategy can
evaluate θ0, a fine-tuned model or a candidate merge without copying weights
into the module. Calibration batches come with each task
(:class:`~cl_merge.merging.lifecycle.TaskInput`), not from here.

No Lightning, runner or dataset code is imported: the runner builds the
module (encoder) and the heads, users' scripts pass any ``nn.Module``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from cl_merge.errors import MergeInputError

Tensor = torch.Tensor


def call_module(module: nn.Module, batch: Any):
    """The batch calling convention: ``module(b)`` for a tensor,
    ``module(*b)`` for a tuple/list, ``module(**b)`` for a dict."""
    if isinstance(batch, Mapping):
        return module(**batch)
    if isinstance(batch, (tuple, list)):
        return module(*batch)
    return module(batch)


def move_batch(batch: Any, device, dtype: torch.dtype | None = None):
    """``batch`` (tensor / tuple / list / dict of tensors) on ``device``;
    floating tensors cast to ``dtype`` when given."""
    if isinstance(batch, Tensor):
        out = batch.to(device, non_blocking=True)
        return out.to(dtype) if dtype is not None and out.is_floating_point() else out
    if isinstance(batch, Mapping):
        return {k: move_batch(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_batch(v, device, dtype) for v in batch)
    return batch


def batch_size_of(batch: Any) -> int:
    """Rows in a batch: the first dimension of its first tensor."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for value in values:
        if isinstance(value, Tensor):
            return batch_size_of(value)
    raise MergeInputError(f"cannot tell the batch size of a {type(batch).__name__} batch: it holds no tensor")


@dataclass
class MergeContext:
    """``module``: an ``nn.Module`` whose state dict has the merged model's
    keys (its values are not used). ``heads``: per task, a map from the
    module's output to that task's logits (``None``: the output is the logits).
    ``transductive``: set when the calibration batches are unlabeled *test*
    inputs (test-time methods); the run records it."""

    module: nn.Module | None = None
    heads: Sequence[Callable[[Tensor], Tensor] | None] | None = None
    device: torch.device | str = "cpu"
    dtype: torch.dtype | None = None
    transductive: bool = False

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        if self.module is not None and not isinstance(self.module, nn.Module):
            raise MergeInputError(f"model must be a torch.nn.Module, got {type(self.module).__name__}")

    def check_keys(self, pretrained: Mapping[str, Tensor]) -> None:
        """The module must have the merged model's keys and shapes."""
        if self.module is None:
            return
        own = self.module.state_dict()
        missing = [k for k in pretrained if k not in own]
        extra = [k for k in own if k not in pretrained]
        if missing or extra:
            what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which the state dicts lack"
            raise MergeInputError(f"model's state dict does not match the state dicts being merged: it {what}")
        for key, value in pretrained.items():
            if tuple(own[key].shape) != tuple(value.shape):
                raise MergeInputError(f"model's {key!r} has shape {list(own[key].shape)}, "
                                      f"the state dicts have {list(value.shape)}")

    def call(self, weights: Mapping[str, Tensor], batch: Any, *, move: bool = True):
        """The module's output on ``batch`` under ``weights`` (a complete
        state dict; tensors may require grad, e.g. AdaMerging's coefficients)."""
        if self.module is None:
            raise MergeInputError("this strategy needs a model: pass model=<nn.Module>")
        if move:
            batch = move_batch(batch, self.device, self.dtype)
        return torch.func.functional_call(self.module, dict(weights), _as_args(batch), _as_kwargs(batch),
                                          strict=False)

    def logits(self, task: int, weights: Mapping[str, Tensor], batch: Any) -> Tensor:
        out = self.call(weights, batch)
        head = self.heads[task] if self.heads is not None and task < len(self.heads) else None
        return head(out) if head is not None else out


def _as_args(batch: Any) -> tuple:
    if isinstance(batch, Mapping):
        return ()
    if isinstance(batch, (tuple, list)):
        return tuple(batch)
    return (batch,)


def _as_kwargs(batch: Any) -> dict:
    return dict(batch) if isinstance(batch, Mapping) else {}


__all__ = ["MergeContext", "call_module", "move_batch", "batch_size_of"]
