"""Model Stock: layer-wise interpolation between the fine-tuned average and θ0."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cl_merge.errors import HyperparameterError
from cl_merge.merging.base import MergeMethod, require
from cl_merge.merging.registry import register

Tensor = torch.Tensor

ANGLE_AVERAGES = ("angle", "cosine")


def _cosine(a: Tensor, b: Tensor) -> float:
    """cos between two task vectors; 0 when either has zero norm (an
    untouched tensor shares no direction with anything)."""
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 or nb == 0:
        return 0.0
    return max(-1.0, min(1.0, float(torch.dot(a.reshape(-1), b.reshape(-1))) / (na * nb)))


def unit(delta: Tensor) -> Tensor:
    norm = float(delta.norm())
    return delta / norm if norm > 0 else torch.zeros_like(delta)


def interpolation_ratio(cos_theta: float, n: int) -> float:
    """t = N cos θ / (1 + (N − 1) cos θ), with cos θ clamped to [0, 1]: the
    paper's geometry assumes acute angles; an obtuse average angle (the
    fine-tuned models disagree) falls back to the anchor θ0 (t = 0) instead
    of extrapolating away from the average."""
    c = min(1.0, max(0.0, cos_theta))
    return n * c / (1 + (n - 1) * c)


@register
@dataclass
class ModelStock(MergeMethod):
    """Model Stock: per tensor θ = t·θ_avg + (1 − t)·θ0, t = N cos θ / (1 + (N − 1) cos θ).

    Jang et al., "Model Stock: All we need is just a few fine-tuned models",
    ECCV 2024 (https://arxiv.org/abs/2403.19522). θ is the angle between
    fine-tuned task vectors of one layer (here: one state-dict tensor); the
    paper derives t assuming every pair of the N fine-tuned models makes the
    same angle, and its experiments use N = 2. For N > 2 the angle has to be
    estimated from the pairs: ``angle_average="angle"`` (default) averages the
    pairwise angles, the quantity the formula is written in (FusionBench);
    ``"cosine"`` averages the pairwise cosines (mergekit). They differ where
    tensors conflict. cos θ is clamped to [0, 1] (see
    ``interpolation_ratio``); a zero-norm task vector counts as orthogonal
    to the others. No hyperparameters besides the averaging rule.

    Incremental: only with ``angle_average="cosine"``: Σ_{i<j} cos_ij =
    (‖Σ_i u_i‖² − N')/2 with u_i the unit task vectors (N' of them non-zero),
    so the state is Σ τ_i, Σ u_i and N' per tensor. The mean of pairwise
    *angles* needs every pair and has no fixed-size state. With a single task
    seen, the running merge is that fine-tuned model.
    """

    name = "model_stock"
    reference = "https://arxiv.org/abs/2403.19522"
    incremental = True
    min_models = 2

    angle_average: str = "angle"

    def validate(self) -> None:
        require(self.angle_average in ANGLE_AVERAGES,
                f"{self.name}: angle_average must be one of {', '.join(ANGLE_AVERAGES)}, got {self.angle_average!r}")

    def merge_tensor(self, key, base, deltas, context):
        n = len(deltas)
        if self.angle_average == "cosine":  # same arithmetic as the incremental form
            return self.fold_tensor(key, base, deltas)
        angles = [math.acos(_cosine(deltas[i], deltas[j])) for i in range(n) for j in range(i + 1, n)]
        t = interpolation_ratio(math.cos(sum(angles) / len(angles)), n)
        mean = deltas[0].clone()
        for delta in deltas[1:]:
            mean.add_(delta)
        return base + (t / n) * mean

    def supports_incremental(self) -> bool:
        return self.angle_average == "cosine"

    def init_state(self, key, base):
        if self.angle_average != "cosine":
            raise HyperparameterError(
                "model_stock: the incremental form needs angle_average='cosine' "
                "(the mean of pairwise angles needs every pair of task vectors)"
            )
        return {"sum": torch.zeros_like(base), "unit_sum": torch.zeros_like(base),
                "nonzero": torch.zeros((), dtype=base.dtype)}

    def update_state(self, key, base, state, delta, num_seen, task_context):
        u = unit(delta)
        return {"sum": state["sum"] + delta, "unit_sum": state["unit_sum"] + u,
                "nonzero": state["nonzero"] + (1 if float(delta.norm()) > 0 else 0)}

    def state_weights(self, key, base, state, num_seen):
        n = num_seen
        if n == 1:
            return base + state["sum"]
        pair_sum = (float(state["unit_sum"].norm()) ** 2 - float(state["nonzero"])) / 2
        t = interpolation_ratio(pair_sum / (n * (n - 1) / 2), n)
        return base + (t / n) * state["sum"]
