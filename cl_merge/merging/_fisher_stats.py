"""Diagonal Fisher information of a model under given weights, on
calibration batches: the statistic of Fisher merging and of CoFiMA.

A pure function over a :class:`~cl_merge.merging.context.MergeContext`
(the functional forward of the model), the weights and the batches: it never
touches the module's own parameters, files, Lightning or the runner.

Two estimators, both "batch" estimators (one gradient per batch, squared,
as FusionBench and the CoFiMA authors compute them; the exact per-example
Fisher would need one backward pass per example):

- ``labels=None``: the *expected* Fisher, labels drawn from the model's own
  prediction p(y|x): per batch the gradient g of Σ_rows Σ_y √p_y · log p_y
  (p detached), so that g² carries the weight p_y of each class (FusionBench's
  ``FisherMergingAlgorithmForCLIP.get_fisher_weights``);
- ``labels`` given (one tensor per batch): the *empirical* Fisher, g the
  gradient of the cross-entropy with the true labels (CoFiMA's
  ``getFisherDiagonal``).

``reduction="sum"``: the batch objective sums over rows and F = Σ_b g_b² / N
(N the examples used; FusionBench). ``reduction="mean"``: the batch objective
averages over rows and F = Σ_b g_b² / B (B the batches used; CoFiMA).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from cl_merge.errors import MergeInputError
from cl_merge.merging.context import MergeContext, batch_size_of

Tensor = torch.Tensor

REDUCTIONS = ("sum", "mean")


def diagonal_fisher(context: MergeContext, weights: Mapping[str, Tensor], batches: Iterable[Any],
                    num_examples: int | None, head: Callable[[Tensor], Tensor] | None = None, *,
                    labels: Sequence[Tensor] | None = None, keys: Sequence[str] | None = None,
                    reduction: str = "sum") -> dict[str, Tensor]:
    """Diagonal Fisher of the model under ``weights`` (a complete state
    dict) for the entries ``keys`` (default: every floating-point entry), on
    ``batches`` until ``num_examples`` rows are used (checked before each
    batch, so the last batch may overshoot; ``None``: every batch).
    ``head`` maps the model's output to logits [rows, classes]. Returns
    float32 (float64 for float64 weights) tensors on the CPU; entries that
    get no gradient, and buffers (entries that are not parameters of the
    module, as in both references), have a zero Fisher."""
    if reduction not in REDUCTIONS:
        raise MergeInputError(f"Fisher reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if num_examples is not None and num_examples < 1:
        raise MergeInputError(f"the number of Fisher examples must be >= 1, got {num_examples}")
    device = context.device
    keys = [k for k, v in weights.items() if v.is_floating_point()] if keys is None else list(keys)
    if context.module is None:
        raise MergeInputError("the Fisher needs a model: pass model=<nn.Module>")
    parameter_names = {name for name, _ in context.module.named_parameters(remove_duplicate=False)}
    trained = [k for k in keys if k in parameter_names]
    params = {}
    for key, value in weights.items():
        value = value.detach().to(device)
        if context.dtype is not None and value.is_floating_point():
            value = value.to(context.dtype)
        params[key] = value.requires_grad_(True) if key in trained else value
    fisher = {k: torch.zeros_like(params[k]) for k in keys}
    rows = used = 0
    for index, batch in enumerate(batches):
        if num_examples is not None and rows >= num_examples:
            break
        output = context.call(params, batch)
        logits = head(output) if head is not None else output
        if logits.dim() != 2:
            raise MergeInputError(f"the Fisher needs logits of shape [rows, classes], got {list(logits.shape)}")
        if labels is None:
            log_p = torch.log_softmax(logits.float(), dim=-1)
            objective = (log_p.detach().exp().sqrt() * log_p).sum()
            if reduction == "mean":
                objective = objective / logits.shape[0]
        else:
            if index >= len(labels):
                raise MergeInputError(f"labels cover {len(labels)} batch(es), the Fisher reached batch {index + 1}")
            target = labels[index].to(device)
            objective = F.cross_entropy(logits.float(), target, reduction=reduction)
        grads = torch.autograd.grad(objective, [params[k] for k in trained], allow_unused=True)
        for key, grad in zip(trained, grads):
            if grad is not None:
                fisher[key].add_(grad.detach().square())
        rows += batch_size_of(batch)
        used += 1
    if used == 0:
        raise MergeInputError("no calibration batch to compute the Fisher on")
    scale = 1.0 / (rows if reduction == "sum" else used)
    out = {}
    for key, value in fisher.items():
        dtype = torch.promote_types(weights[key].dtype, torch.float32)
        out[key] = value.mul_(scale).to("cpu", dtype)
    return out


__all__ = ["diagonal_fisher", "REDUCTIONS"]
