"""Model Breadcrumbs: drop the outliers and the small perturbations, then sum."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cl_merge.merging._topk import keep_count, kth_largest_in_tensor
from cl_merge.merging.base import MergeMethod, check_fraction, require
from cl_merge.merging.registry import register

Tensor = torch.Tensor


def breadcrumb_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Mask of one tensor: ranked by |τ| from the largest, drop the first
    ⌊gamma·n⌋ (outliers) and keep the next max(1, ⌊density·n⌋), drop the rest.

    Selection is by exact magnitude thresholds (no full sort): an entry is kept
    when upper > |τ| >= lower, so entries tied with the largest dropped
    outlier are dropped too and entries tied at the lower threshold are all
    kept."""
    n = delta.numel()
    if n == 0:
        return torch.zeros(delta.shape, dtype=torch.bool, device=delta.device)
    n_top = int(gamma * n + 1e-6)
    n_keep = keep_count(density, n)
    magnitude = delta.abs()
    lower = kth_largest_in_tensor(delta, min(n, n_top + n_keep))
    keep = magnitude >= lower
    if n_top > 0:
        upper = kth_largest_in_tensor(delta, n_top)
        keep &= magnitude < upper
    return keep


@register
@dataclass
class Breadcrumbs(MergeMethod):
    """Model Breadcrumbs: θ = θ0 + scaling · Σ_t m_t ⊙ τ_t.

    Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model
    Merging with Sparse Masks", ECCV 2024 (https://arxiv.org/abs/2312.06795).
    Per layer (here: per state-dict tensor, as in mergekit), the mask m_t
    removes the largest ``gamma`` fraction of |τ_t| (outliers) and the
    smallest entries so that ``density`` of the entries remain (see
    ``breadcrumb_mask`` for counts and ties); masked task vectors are summed
    as in task arithmetic. Requires density + gamma <= 1.

    The parameterisation (``density`` kept, ``gamma`` top outliers removed)
    is mergekit's; the paper names the two cut-offs as percentages of the
    top and the bottom of each layer and tunes them once, on validation data,
    for all tasks. The authors' code ranks along the last dimension of each
    tensor (per row) rather than over the whole tensor; we follow the paper's
    per-layer description. Defaults: gamma 0.01 (mergekit's default, a 1%
    outlier cut), density 0.9, scaling 0.3 (task arithmetic's ViT-B/32 value).

    Incremental: yes, the running sum of masked task vectors (each mask
    depends on its own task vector only).
    """

    name = "breadcrumbs"
    reference = "https://arxiv.org/abs/2312.06795"
    incremental = True

    density: float = 0.9
    gamma: float = 0.01
    scaling: float = 0.3

    def validate(self) -> None:
        check_fraction("density", self.density, method=self.name)
        require(0 <= self.gamma < 1,
                f"{self.name}: gamma must be in [0, 1), got {self.gamma!r}")
        require(self.density + self.gamma <= 1 + 1e-12,
                f"{self.name}: density + gamma must be <= 1, got {self.density} + {self.gamma}")

    def merge_tensor(self, key, base, deltas, context):
        return self.fold_tensor(key, base, deltas)

    def init_state(self, key, base):
        return {"sum": torch.zeros_like(base)}

    def update_state(self, key, base, state, delta, num_seen, task_context):
        masked = torch.where(breadcrumb_mask(delta, self.density, self.gamma), delta, 0.0)
        return {"sum": state["sum"] + masked}

    def state_weights(self, key, base, state, num_seen):
        return base + self.scaling * state["sum"]
