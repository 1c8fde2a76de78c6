"""Diagonal Fisher information of a model under given weights, on
calibration batches: the statistic of Fisher merging and of CoFiMA, in one
place.

A pure function over a :class:`~cl_merge.merging.context.MergeContext`
(the functional forward of the model), the weights and the batches: it never
touches the module's own parameters, files, Lightning or the runner.

What is differentiated:

- ``labels=None``: the *expected* Fisher, labels from the model's own
  prediction p(y|x);
- ``labels`` given (one tensor per batch): the *empirical* Fisher, the
  cross-entropy with the true labels (CoFiMA's ``getFisherDiagonal``).

How (``estimator``):

- ``"batch"``: one gradient per batch, squared (as FusionBench and the CoFiMA
  authors compute it). Expected Fisher: g the gradient of
  Σ_rows Σ_y √p_y · log p_y (p detached), so that g² carries the weight p_y
  of each class (FusionBench's ``FisherMergingAlgorithmForCLIP``). The
  square of a batch sum mixes examples (cross terms): cheap, not the
  paper's Fisher. ``reduction="sum"``: the objective sums over rows and
  F = Σ_b g_b² / N (N the examples used; FusionBench); ``"mean"``: the
  objective averages over rows and F = Σ_b g_b² / B (B the batches; CoFiMA).
- ``"exact"``: per example, F = mean_x Σ_y p(y|x) (∇ log p(y|x))² (expected;
  one backward per example and class) or mean_x (∇ log p(y_x|x))²
  (empirical; one backward per example): the definition in Matena & Raffel
  (2022). Divides by N, so only ``reduction="sum"``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from cl_merge.errors import MergeInputError
from cl_merge.merging.context import MergeContext, batch_size_of

Tensor = torch.Tensor

REDUCTIONS = ("sum", "mean")
ESTIMATORS = ("exact", "batch")


def diagonal_fisher(context: MergeContext, weights: Mapping[str, Tensor], batches: Iterable[Any],
                    num_examples: int | None, head: Callable[[Tensor], Tensor] | None = None, *,
                    labels: Sequence[Tensor] | None = None, keys: Sequence[str] | None = None,
                    reduction: str = "sum", estimator: str = "batch", what: str = "") -> dict[str, Tensor]:
    """Diagonal Fisher of the model under ``weights`` (a complete state
    dict) for the entries ``keys`` (default: every floating-point entry), on
    ``batches`` until ``num_examples`` rows are used (checked before each
    batch, so the last batch may overshoot: :func:`~cl_merge.merging._data.take_examples`;
    ``None``: every batch). ``head`` maps the model's output to logits
    [rows, classes]. Returns float32 (float64 for float64 weights) tensors
    on the CPU; entries that get no gradient, and buffers (entries that are
    not parameters of the module, as in both references), have a zero Fisher."""
    from cl_merge.merging._data import as_logits, slice_rows, take_examples

    if reduction not in REDUCTIONS:
        raise MergeInputError(f"Fisher reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if estimator not in ESTIMATORS:
        raise MergeInputError(f"Fisher estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    if estimator == "exact" and reduction != "sum":
        raise MergeInputError("the exact (per-example) Fisher averages over examples: reduction must be 'sum'")
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

    def logits_of(batch) -> Tensor:
        output = as_logits(context.call(params, batch))
        logits = as_logits(head(output)) if head is not None else output
        if logits.dim() != 2:
            raise MergeInputError(f"the Fisher needs logits of shape [rows, classes], got {list(logits.shape)}")
        return logits.float()

    def add(objective: Tensor, weight: float = 1.0, retain: bool = False) -> None:
        grads = torch.autograd.grad(objective, [params[k] for k in trained], allow_unused=True, retain_graph=retain)
        for key, grad in zip(trained, grads):
            if grad is not None:
                fisher[key].addcmul_(grad, grad, value=weight)  # one fused pass: F += w·g²

    if num_examples is not None:
        batches = take_examples(batches, num_examples, what=what)
    rows = used = 0
    with torch.enable_grad():
        for index, batch in enumerate(batches):
            target = None
            if labels is not None:
                if index >= len(labels):
                    raise MergeInputError(f"labels cover {len(labels)} batch(es), the Fisher reached batch {index + 1}")
                target = labels[index].to(device)
            size = batch_size_of(batch)
            if estimator == "batch":
                logits = logits_of(batch)
                if target is None:
                    log_p = torch.log_softmax(logits, dim=-1)
                    objective = (log_p.detach().exp().sqrt() * log_p).sum()
                    add(objective / logits.shape[0] if reduction == "mean" else objective)
                else:
                    add(F.cross_entropy(logits, target, reduction=reduction))
            else:
                for r in range(size):
                    log_p = torch.log_softmax(logits_of(slice_rows(batch, r, r + 1, size)), dim=-1)[0]
                    if target is not None:
                        add(log_p[target[r]])
                        continue
                    probs = log_p.detach().exp()
                    for c in range(log_p.shape[0]):
                        add(log_p[c], float(probs[c]), retain=c + 1 < log_p.shape[0])
            rows += size
            used += 1
    if used == 0:
        raise MergeInputError("no calibration batch to compute the Fisher on")
    scale = 1.0 / (rows if reduction == "sum" else used)
    out = {}
    for key, value in fisher.items():
        dtype = torch.promote_types(weights[key].dtype, torch.float32)
        out[key] = value.mul_(scale).to("cpu", dtype)
    return out


__all__ = ["diagonal_fisher", "ESTIMATORS", "REDUCTIONS"]
