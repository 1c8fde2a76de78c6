"""TALL masks (per-task retrieval from the multi-task vector) and Consensus merging."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from cl_merge.merging._masks import pack_masks, unpack_mask
from cl_merge.merging.base import MergeMethod, PerTaskMergeResult, TensorStream, require
from cl_merge.merging.registry import register
from cl_merge.merging.task_arithmetic import sum_of

Tensor = torch.Tensor

REFERENCE = "https://arxiv.org/abs/2405.07813"


def tall_mask(delta: Tensor, multi_task: Tensor, tall_lambda: float) -> Tensor:
    """m_t = |τ_t| > λ·|τ_MTL − τ_t|: the entries where the multi-task model is
    closer to θ_t than θ0 is (up to λ). Strict ``>`` as in the authors' code."""
    return delta.abs() > (multi_task - delta).abs().mul_(tall_lambda)


def _check_lambda(method: str, value) -> None:
    values = value if isinstance(value, (list, tuple)) else [value]
    require(len(values) > 0, f"{method}: tall_lambda must be a number or a non-empty list of numbers")
    for v in values:
        require(v >= 0,
                f"{method}: tall_lambda must be >= 0 (a number or one per task), got {value!r}")


def task_lambdas(method: str, tall_lambda, num_tasks: int) -> list[float]:
    """One λ per task: a single value broadcast, or a list of exactly T."""
    if isinstance(tall_lambda, (list, tuple)):
        require(len(tall_lambda) == num_tasks,
                f"{method}: tall_lambda lists {len(tall_lambda)} values for {num_tasks} fine-tuned models")
        return [float(v) for v in tall_lambda]
    return [float(tall_lambda)] * num_tasks


@dataclass
class _TallContext:
    lambdas: list[float]
    pretrained: object  # tensor source of θ0, read again by task_state_dict
    masks: dict[str, Tensor] = field(default_factory=dict)  # packed, one bit per task


def _task_models(merged: dict[str, Tensor], context: _TallContext) -> Callable[[int], dict]:
    def task_state_dict(index: int) -> dict[str, Tensor]:
        # θ0 + m_t ⊙ τ_MTL is the multi-task weight where the mask is on and θ0
        # elsewhere: select in the output dtype (exact, no re-rounding)
        out = dict(merged)
        for key, packed in context.masks.items():
            base = context.pretrained.get(key).to(merged[key].dtype)
            out[key] = torch.where(unpack_mask(packed, index), merged[key], base)
        return out

    return task_state_dict


@register
@dataclass
class TallMasks(MergeMethod):
    """TALL masks: per-task models θ_t = θ0 + m_t ⊙ τ_MTL from one multi-task vector.

    Wang, Dimitriadis, Ortiz-Jiménez, Fleuret, Frossard, "Localizing Task
    Information for Improved Model Merging and Compression", ICML 2024.
    τ_MTL = scaling · Σ_t τ_t (task arithmetic), masks
    m_t = |τ_t| > λ_t · |τ_MTL − τ_t| per entry, and the model for task t is
    θ0 + m_t ⊙ τ_MTL. The result is a ``PerTaskMergeResult``: its shared
    entries are the multi-task model θ0 + τ_MTL, ``task_state_dict(t)`` the
    retrieved model of task t (built on demand from bit-packed masks and θ0,
    which is read again from the pretrained source).

    Defaults: the authors' code builds τ_MTL as the plain sum (``scaling=1``)
    and evaluates the masked models at coefficient 1.0. λ is chosen per task
    on validation data from {0.2, 0.3, 0.4, 0.5, 0.6}; ``tall_lambda`` takes
    one value or a list of one per task; 0.6 is FusionBench's default.

    Differences: the authors' code compares with strict ``>``; we follow it, so with λ = 0 a mask is on exactly where
    τ_t ≠ 0. FusionBench's ``TallMaskTaskArithmeticAlgorithm`` computes
    |θ0 − τ_t| > λ·|τ_MTL − τ_t| (it subtracts the task vector from the
    pretrained *weights*), which is not the paper's mask; we do not follow it.
    Not incremental: every mask depends on the final Σ_t τ_t.
    """

    name = "tall_masks"
    reference = REFERENCE
    per_task = True

    tall_lambda: float | list[float] = 0.6
    scaling: float = 1.0

    def validate(self) -> None:
        _check_lambda(self.name, self.tall_lambda)

    def prepare(self, stream: TensorStream) -> _TallContext:
        return _TallContext(task_lambdas(self.name, self.tall_lambda, stream.num_models), stream.pretrained)

    def merge_tensor(self, key, base, deltas, context: _TallContext):
        multi_task = sum_of(deltas).mul_(self.scaling)
        # kept on the CPU: one bit per task per entry of the whole model
        context.masks[key] = pack_masks([tall_mask(d, multi_task, lam)
                                         for d, lam in zip(deltas, context.lambdas)]).cpu()
        return multi_task.add_(base)

    def finalize(self, merged, context: _TallContext, stream):
        num_tasks = len(context.lambdas)
        return PerTaskMergeResult(merged, _task_models(merged, context), num_tasks)


@register
@dataclass
class Consensus(MergeMethod):
    """Consensus merging: θ = θ0 + scaling · m_cons ⊙ Σ_t τ_t, m_cons = (#TALL masks on) ≥ k.

    Wang et al., ICML 2024 (same paper as TALL masks). The TALL masks are
    built against the plain sum τ_MTL = Σ_t τ_t (as the authors' code does,
    whatever ``scaling``); entries selected by fewer than ``min_agreement``
    tasks are dropped from the task-arithmetic sum: k=1 removes the
    "catastrophic" entries (in no mask), k=2 also the "selfish" ones (in one). k=0 is task arithmetic; k > T gives θ0.

    Defaults: ``min_agreement=2`` (the paper's and code's ``prun_thre_k``).
    ``scaling`` is task arithmetic's α, chosen by the authors on validation
    data from {0.1, ..., 1.0}; 0.3 (the TA value for ViT-B/32 on eight tasks)
    is our default, not a value the paper reports for consensus. λ as in
    ``tall_masks`` (the authors reuse the per-task λ picked there; default
    0.6, FusionBench's). FusionBench has no consensus merging.
    Not incremental: the masks depend on the final Σ_t τ_t.
    """

    name = "consensus"
    reference = REFERENCE

    tall_lambda: float | list[float] = 0.6
    min_agreement: int = 2
    scaling: float = 0.3

    def validate(self) -> None:
        _check_lambda(self.name, self.tall_lambda)
        require(self.min_agreement >= 0,
                f"{self.name}: min_agreement must be an integer >= 0, got {self.min_agreement!r}")

    def prepare(self, stream: TensorStream) -> list[float]:
        return task_lambdas(self.name, self.tall_lambda, stream.num_models)

    def merge_tensor(self, key, base, deltas, lambdas):
        total = sum_of(deltas)
        votes = torch.zeros(base.shape, dtype=torch.int32, device=base.device)
        for delta, lam in zip(deltas, lambdas):
            votes += tall_mask(delta, total, lam)
        total.masked_fill_(votes < self.min_agreement, 0.0)
        return total.mul_(self.scaling).add_(base)
