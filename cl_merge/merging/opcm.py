"""OPCM: continual merging by orthogonal projection and adaptive norm scaling."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cl_merge.core.state_dict import make_filter
from cl_merge.merging._stateful import RunningMergeStrategy
from cl_merge.merging._svd import thin_svd
from cl_merge.merging.base import MergeMethod, check_fraction, require
from cl_merge.merging.lifecycle import TaskInput
from cl_merge.merging.registry import register

Tensor = torch.Tensor


# ----------------------------------------------------------------- the OPCM steps as functions
def leading_block_size(singular_values: Tensor, alpha: float) -> int:
    """r: the number of leading singular values before their cumulative share
    of the total first exceeds ``alpha`` (FusionBench's
    ``argmax(cumsum(s)/sum(s) > alpha)``; 0 when no share exceeds it, which
    includes a zero matrix)."""
    share = singular_values.cumsum(0) / singular_values.sum()
    above = torch.nonzero(share > alpha)
    return int(above[0, 0]) if above.numel() else 0


def project_task_matrix(merged: Tensor, task: Tensor, alpha: float) -> Tensor:
    """The part of ``task`` OPCM adds for one 2-D entry: with the full SVD
    merged = U S Vᵀ, P = Uᵀ·task·V with P's diagonal and its leading r×r
    block zeroed, returned as U P Vᵀ.

    Computed without the full bases: U P Vᵀ = task − (what was zeroed), and
    every zeroed entry of P lies in its leading k×k corner (k = min(m, n)),
    which only the thin SVD's k singular vectors reach:
    task − U_r C_rr V_rᵀ − Σ_{r<=i<k} C_ii u_i v_iᵀ with C = U_kᵀ·task·V_k.
    The same matrix (U, V orthogonal), at a fraction of the cost for
    non-square weights (no m×m or n×n basis)."""
    u, s, vh = thin_svd(merged)
    r = leading_block_size(s, alpha)
    corner = u.T @ task @ vh.T  # C, [k, k]
    removed = (u[:, r:] * corner.diagonal()[r:]) @ vh[r:]
    if r:
        removed += u[:, :r] @ corner[:r, :r] @ vh[:r]
    return task - removed


# ----------------------------------------------------------------- the strategy
@register
@dataclass
class OPCM(MergeMethod):
    """OPCM: orthogonal projection with adaptive scaling, one model at a time.

    Tang et al., "Merging Models on the Fly Without Retraining: A Sequential
    Approach to Scalable Continual Model Merging", NeurIPS 2025
    (https://arxiv.org/abs/2501.09522); reference code: FusionBench 0.2.33,
    ``fusion_bench/method/opcm/opcm_general.py`` (class ``OPCM``).

    State: the merged task vector τ_m, the running scale λ and the running
    mean n̄ of the task-vector norms. The first task's fine-tuned model is the
    first merge (τ_m = τ_1, λ = 1, n̄ = ‖τ_1‖). For each later task τ:

    - every 2-D entry W: with the full SVD τ_m[W] = U S Vᵀ, P = Uᵀ τ[W] V,
      P's diagonal and its leading r×r block set to 0 (r = the number of
      leading singular values before cumsum(S)/ΣS first exceeds ``alpha``),
      step[W] = λ·τ_m[W] + U P Vᵀ;
    - every other entry: step = λ·τ_m + τ;
    - n̄ ← mean of ‖τ_1‖, ..., ‖τ_t‖; τ_m ← step · n̄ / ‖step‖;
      λ ← ‖step‖ / n̄ (norms over all merged entries together).

    Merged weights: θ0 + τ_m. Memory: θ0 + one merged task vector + three
    scalars, whatever the number of tasks.

    Where FusionBench differs: it projects only the weights of ``nn.Linear``
    modules and adds every other parameter (including 2-D ones such as an
    ``nn.Embedding``'s); on state dicts we project every 2-D entry, and
    ``additive_keys`` (glob patterns, ``re:`` for regexes) names 2-D entries
    to add instead, which reproduces FusionBench on a model with such
    entries (e.g. ``"*position_embedding.weight"`` for HF CLIP). It stores
    θ_merged and recomputes τ_m = θ_merged − θ0 each step; we keep τ_m itself
    (no rounding through θ0's magnitude). Its ``shuffle_order``/``seed``
    options are the caller's concern (tasks are absorbed in the order given).
    SVDs run in the input's precision (float32, as FusionBench; float64
    inputs stay float64).

    Default ``alpha=0.5``: the paper's and FusionBench's configuration.
    """

    name = "opcm"
    reference = "https://arxiv.org/abs/2501.09522"
    incremental = True

    alpha: float = 0.5
    additive_keys: tuple[str, ...] = ()

    def validate(self) -> None:
        check_fraction("alpha", self.alpha, allow_zero=True, method=self.name)
        require(isinstance(self.additive_keys, (tuple, list)) and all(isinstance(p, str) for p in self.additive_keys),
                f"{self.name}: additive_keys must be a list of key patterns, got {self.additive_keys!r}")
        self.additive_keys = tuple(self.additive_keys)
        make_filter(include=list(self.additive_keys))  # validates re: patterns

    def create_strategy(self, key_filter=None, device=None) -> "OPCMStrategy":
        return OPCMStrategy(self, key_filter, device)

    def projects(self, key: str, tensor: Tensor) -> bool:
        if tensor.dim() != 2:
            return False
        return not (self.additive_keys and make_filter(include=list(self.additive_keys)).selects(key))


class OPCMStrategy(RunningMergeStrategy):
    """The running OPCM merge (``incremental_merger(θ0, "opcm")``)."""

    def _start(self) -> None:
        super()._start()
        self.scalars = {"previous_lambda": 1.0, "norm_sum": 0.0}

    def _step(self, task: TaskInput) -> None:
        method: OPCM = self.method
        if self.num_absorbed == 0:
            self.merged = {key: self.read(task, key) for key in self.keys}
            self.scalars = {"previous_lambda": 1.0, "norm_sum": _norm(self.merged.values())}
            return
        previous_lambda = self.scalars["previous_lambda"]
        task_sq = 0.0
        step_sq = 0.0
        for key in self.keys:
            tau = self.read(task, key)
            task_sq += _sq(tau)
            merged = self.merged[key]
            if method.projects(key, merged):
                added = project_task_matrix(merged.to(self.device), tau.to(self.device), method.alpha).cpu()
            else:
                added = tau
            # fresh tensors, never in place: a state_dict() handed out earlier stays valid
            step = merged * previous_lambda + added  # λ = 1 during the step
            step_sq += _sq(step)
            self.merged[key] = step
        norm_sum = self.scalars["norm_sum"] + math.sqrt(task_sq)
        mean_norm = norm_sum / (self.num_absorbed + 1)
        step_norm = math.sqrt(step_sq)
        if step_norm > 0:
            for key in self.keys:
                self.merged[key] = self.merged[key] * (mean_norm / step_norm)
        self.scalars = {"previous_lambda": step_norm / mean_norm if mean_norm > 0 else 1.0, "norm_sum": norm_sum}


def _sq(tensor: Tensor) -> float:
    return float(torch.linalg.vector_norm(tensor, dtype=torch.float64)) ** 2


def _norm(tensors) -> float:
    return math.sqrt(sum(_sq(t) for t in tensors))


__all__ = ["OPCM", "OPCMStrategy", "leading_block_size", "project_task_matrix"]
