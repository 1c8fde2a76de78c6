"""EMR-Merging: one unified task vector plus per-task masks and rescalers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cl_merge.merging._masks import pack_masks, unpack_mask
from cl_merge.merging.base import MergeMethod, PerTaskMergeResult, TensorStream
from cl_merge.merging.registry import register
from cl_merge.merging.task_arithmetic import sum_of

Tensor = torch.Tensor


@dataclass
class _EmrContext:
    num_tasks: int
    pretrained: object  # tensor source of θ0, read again by task_state_dict
    unified: dict[str, Tensor] = field(default_factory=dict)  # τ_uni, float32
    masks: dict[str, Tensor] = field(default_factory=dict)  # packed, one bit per task
    # model-wide Σ|τ_t| and Σ|m_t ⊙ τ_uni| (float64: sums of ~10^8 terms)
    abs_task: Tensor | None = None
    abs_masked: Tensor | None = None
    rescalers: Tensor | None = None


def elect(deltas: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """τ_uni and the masks m_t for one entry.

    Elected sign: +1 where Σ_t τ_t > 0, else −1 (a zero sum gets −1, as in the
    authors' code). m_t = τ_t agrees with the elected sign; |τ_uni| = the
    largest |τ_t| among the agreeing tasks (0 where none agrees).
    """
    total = sum_of(deltas)
    sign = torch.where(total > 0, 1.0, -1.0).to(total.dtype)
    masks = [delta * sign > 0 for delta in deltas]
    magnitude = torch.zeros_like(sign)
    for delta, mask in zip(deltas, masks):
        torch.maximum(magnitude, delta.abs() * mask, out=magnitude)
    return magnitude.mul_(sign), masks


@register
@dataclass
class EMR(MergeMethod):
    """EMR-Merging: θ_t = θ0 + λ_t · m_t ⊙ τ_uni, one model per task.

    Huang, Ye, Chen, He, Yue, Ouyang, "EMR-Merging: Tuning-Free High-Performance
    Model Merging", NeurIPS 2024. Elect: per entry the sign of Σ_t τ_t (zero →
    −1, the authors' code) and τ_uni = sign · max{|τ_t| : τ_t agrees with the
    sign}. Mask: m_t = (τ_t ⊙ τ_uni > 0). Rescale: λ_t = Σ|τ_t| / Σ|m_t ⊙ τ_uni|
    with sums over the whole model (the paper's formula and the authors'
    30-ViT script; their 8-task ViT script sums per-tensor *means* instead,
    weighting every tensor equally: we follow the paper). λ_t = 1 when task t
    keeps nothing (its model is θ0 anyway).

    There is no single merged model: the result is a ``PerTaskMergeResult``
    whose shared entries θ0 + τ_uni are for inspection only;
    ``task_state_dict(t)`` gives the model to use for task t (built on demand
    from τ_uni, bit-packed masks and θ0, read again from the pretrained
    source). Tuning-free: no hyperparameters. FusionBench's ``EMRMerging``
    copies the authors' 8-task script (same election, per-tensor-mean
    rescalers). Not incremental: the elected sign, τ_uni and
    every mask depend on all tasks.
    """

    name = "emr"
    reference = "https://arxiv.org/abs/2405.17597"
    per_task = True

    def prepare(self, stream: TensorStream) -> _EmrContext:
        n = stream.num_models
        return _EmrContext(n, stream.pretrained, abs_task=torch.zeros(n, dtype=torch.float64),
                           abs_masked=torch.zeros(n, dtype=torch.float64))

    def merge_tensor(self, key, base, deltas, context: _EmrContext):
        unified, masks = elect(deltas)
        magnitude = unified.abs()
        for t, (delta, mask) in enumerate(zip(deltas, masks)):
            context.abs_task[t] += float(delta.abs().sum(dtype=torch.float64))
            context.abs_masked[t] += float((magnitude * mask).sum(dtype=torch.float64))
        # per-task parts live on the CPU (a model's worth whatever the device)
        context.unified[key] = unified.cpu()
        context.masks[key] = pack_masks(masks).cpu()
        return base + unified

    def finalize(self, merged, context: _EmrContext, stream):
        kept = context.abs_masked > 0
        context.rescalers = torch.where(kept, context.abs_task / context.abs_masked.where(kept, 1.0), 1.0)

        def task_state_dict(index: int) -> dict[str, Tensor]:
            rescaler = float(context.rescalers[index])
            out = dict(merged)
            for key, unified in context.unified.items():
                base = context.pretrained.get(key).to(unified.dtype)
                masked = unified * unpack_mask(context.masks[key], index)
                out[key] = masked.mul_(rescaler).add_(base).to(merged[key].dtype)
            return out

        return PerTaskMergeResult(merged, task_state_dict, context.num_tasks)
