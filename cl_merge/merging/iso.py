"""Isotropic merging: Iso-C (common subspace) and Iso-CTS (common + task-specific)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cl_merge.merging._svd import (
    is_svd_matrix,
    isotropic,
    map_tasks,
    mean_of,
    orthogonalized_merge,
    top_triplets_and_left_complement,
    truncated_svd,
)
from cl_merge.merging.base import MergeMethod, check_fraction
from cl_merge.merging.registry import register
from cl_merge.merging.task_arithmetic import sum_of

Tensor = torch.Tensor

REFERENCE = "https://arxiv.org/abs/2502.04959"
# the value FusionBench's documentation uses for ViT-B/32 and ViT-L/14 on eight tasks
DEFAULT_SCALING = 1.5


@register
@dataclass
class IsoC(MergeMethod):
    """Iso-C: θ = θ0 + scaling · iso(Σ_t τ_t), iso = all singular values set to their mean.

    Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer, "No Task
    Left Behind: Isotropic Model Merging with Common and Task-Specific
    Subspaces", ICML 2025. For a 2-D entry: SVD Σ_t τ_t = U diag(σ) Vᵀ, result
    mean(σ) · U Vᵀ (mean over all min(m, n) values, zeros included). Other
    entries and ``text_projection``: the mean of τ_t (the authors' code;
    2-D embeddings are decomposed). A rank-deficient sum has arbitrary
    singular vectors for its zero singular values, which Iso-C then fills:
    that is the method, not an implementation artefact.

    ``scaling``: the authors select α on validation data from {0.1, ..., 3.0};
    FusionBench's config default is 1.0 and its documented runs for
    ViT-B/32 and ViT-L/14 on eight tasks use 1.5, our default.

    Incremental: yes. State: the running Σ τ_t per entry (the same size
    whatever T); the decomposition runs when the merged weights are asked
    for, and the non-matrix entries take the mean as running sum / tasks
    seen. Batch and incremental forms agree to the bit.

    Algorithm (``cl_merge.merging._svd.isotropic``): instead of a full SVD,
    one eigendecomposition of the Gram matrix of the sum's small side gives
    both mean(σ) and the polar factor A·(AᵀA)^(-1/2): float32 when the Gram
    matrix's condition number is at most 100, float64 otherwise; a nearly
    square sum too ill-conditioned for float32, or a numerically singular
    one, takes the exact float32 SVD (FusionBench's arithmetic). Error
    against float64: 1.7e-6 relative on a random 3072×768 sum (a float32
    SVD: 1.9e-6); 2.1–2.4e-6 on a random 768×768 sum (the SVD route).
    """

    name = "iso_c"
    reference = REFERENCE
    incremental = True

    scaling: float = DEFAULT_SCALING

    def _merged(self, key: str, base: Tensor, total: Tensor, num_tasks: int) -> Tensor:
        merged = isotropic(total) if is_svd_matrix(key, base) else total / num_tasks
        return merged.mul_(self.scaling).add_(base)

    def merge_tensor(self, key, base, deltas, context):
        return self._merged(key, base, sum_of(deltas), len(deltas))

    def init_state(self, key, base):
        return {"sum": torch.zeros_like(base)}

    def update_state(self, key, base, state, delta, num_seen, task_context):
        return {"sum": state["sum"] + delta}

    def state_weights(self, key, base, state, num_seen):
        return self._merged(key, base, state["sum"], num_seen)


def cts_split(rank: int, num_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(common dimensions, dimensions per task) for a matrix of rank ``rank``.

    As the authors: k = int(rank · fraction), then the per-task share
    round((rank − k)/T) (Python's round) and k = rank − T·share, so that the
    whole spectrum is used. Where rounding up would make k negative (small
    matrices, many tasks; the authors' code then slices nonsense), the share
    is lowered to ⌊rank/T⌋.
    """
    common = int(rank * common_space_fraction)
    per_task = round((rank - common) / num_tasks)
    if per_task * num_tasks > rank:
        per_task = rank // num_tasks
    return rank - per_task * num_tasks, per_task


def iso_cts_matrix(deltas: list[Tensor], common_space_fraction: float) -> Tensor:
    """Iso-CTS for one matrix (see ``IsoCTS``)."""
    common, per_task = cts_split(min(deltas[0].shape), len(deltas), common_space_fraction)
    # for m <= n the eigendecomposition of the sum's AAᵀ also gives a basis Q⊥
    # of the complement of U_c: (I − U_c U_cᵀ) τ_t = Q⊥ (Q⊥ᵀ τ_t), whose SVD
    # comes from the small (m − k)×(m − k) Gram matrix of Q⊥ᵀ τ_t
    u_c, s_c, vh_c, complement = top_triplets_and_left_complement(sum_of(deltas), common) \
        if per_task > 0 else (*truncated_svd(sum_of(deltas), common), None)
    us, ss, vhs = [u_c], [s_c], [vh_c]

    def task_triplets(delta):
        if complement is not None:
            u, s, vh = truncated_svd(complement.T @ delta, per_task)
            return complement @ u, s, vh
        # τ_t without its component in the common subspace: (I − U_c U_cᵀ) τ_t
        return truncated_svd(delta - u_c @ (u_c.T @ delta), per_task)

    if per_task > 0:
        for u, s, vh in map_tasks(task_triplets, deltas):
            us.append(u)
            ss.append(s)
            vhs.append(vh)
    s_cat = torch.cat(ss)
    flat = s_cat.mean().expand_as(s_cat)  # isotropic spectrum
    return orthogonalized_merge(torch.cat(us, dim=1), flat, torch.cat(vhs, dim=0))


@register
@dataclass
class IsoCTS(MergeMethod):
    """Iso-CTS: θ = θ0 + scaling · iso(common subspace of Σ τ_t ⊕ each task's residual directions).

    Marczak et al., ICML 2025 (same paper as Iso-C). For a 2-D entry of rank
    r = min(m, n): the top k singular triplets of Σ_t τ_t (k from
    ``common_space_fraction``, adjusted so that r − k divides by T, see
    ``cts_split``), plus, per task, the top (r − k)/T triplets of
    τ_t − U_k U_kᵀ τ_t (its part outside the common subspace); the
    concatenated U and V are replaced by their polar factors and every
    singular value by the mean of the concatenated ones. Other entries and
    ``text_projection``: mean of τ_t (the authors' code). With
    ``common_space_fraction=1`` (or a single task) it reduces to Iso-C.

    Defaults: ``common_space_fraction=0.8`` (the paper's and code's);
    ``scaling`` as Iso-C (1.5; α chosen on validation from {0.1, ..., 3.0}
    by the authors). Not incremental: the common subspace depends on the
    final sum and the residual directions on every task.

    Algorithm: the common triplets (with the basis of their complement) come
    from a float64 eigendecomposition of the sum's Gram matrix, each
    residual's top triplets from Gram-matrix eigendecompositions of the
    small side (``_svd``, precision by condition number as in TSV-M; only
    the leading eigenpairs, by MRRR, on CPU), the polar factors likewise.
    On CPU the tasks' residuals are decomposed side by side, one per thread
    (``_svd.map_tasks``). Relative difference from a float64 reference on 8
    random task vectors: 3.4e-6 at 768×768 and 5.5e-6 at 3072×768 (a float32 SVD: 3.2e-5 and
    3.5e-5).
    """

    name = "iso_cts"
    reference = REFERENCE

    scaling: float = DEFAULT_SCALING
    common_space_fraction: float = 0.8

    def validate(self) -> None:
        check_fraction("common_space_fraction", self.common_space_fraction, allow_zero=True, method=self.name)

    def merge_tensor(self, key, base, deltas, context):
        if is_svd_matrix(key, base):
            merged = iso_cts_matrix(deltas, self.common_space_fraction)
        else:
            merged = mean_of(deltas)
        return merged.mul_(self.scaling).add_(base)
