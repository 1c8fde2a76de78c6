"""Shared linear algebra for the SVD-based strategies (TSV-M, Iso-C, Iso-CTS).

Which entries are "matrices": the authors of TSV and Iso-C/CTS decompose
every 2-D entry of the state dict except CLIP's ``text_projection`` (their
code excludes that key by name); everything else (biases, LayerNorms,
``class_embedding``, the 4-D patch-embedding conv kernel) is merged by the
mean of the task vectors. 2-D embeddings such as ``positional_embedding`` are
decomposed like any weight matrix, as in their code.

SVDs run in the strategy's compute dtype (float32, as the authors' code),
with ``full_matrices=False``.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

# entries the authors' code never decomposes, even though they are 2-D
_EXCLUDED_SUFFIXES = ("text_projection",)


def is_svd_matrix(key: str, tensor: Tensor) -> bool:
    """True for the entries TSV/Iso treat as matrices (2-D, not text_projection)."""
    return tensor.dim() == 2 and not key.endswith(_EXCLUDED_SUFFIXES)


def mean_of(tensors: list[Tensor]) -> Tensor:
    """Mean of a list of tensors into a fresh accumulator (inputs untouched)."""
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total.add_(tensor)
    return total.div_(len(tensors))


def truncated_svd(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top ``rank`` singular triplets: U [m, r], S [r], Vh [r, n] (exact SVD, sliced)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank, :]


def polar_factor(matrix: Tensor) -> Tensor:
    """The orthogonal polar factor P·Qᵀ of ``matrix`` = P·diag(σ)·Qᵀ: the
    matrix with orthonormal columns (rows, if wider than tall) nearest to it
    in Frobenius norm."""
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def orthogonalized_merge(u_cat: Tensor, s_cat: Tensor, vh_cat: Tensor) -> Tensor:
    """U⊥ · diag(s_cat) · V⊥ᵀ with U⊥, V⊥ the polar factors of the concatenated
    singular vectors (TSV-M's and Iso-CTS's decorrelation step)."""
    return (polar_factor(u_cat) * s_cat) @ polar_factor(vh_cat)


def isotropic(matrix: Tensor) -> Tensor:
    """``matrix`` with every singular value replaced by their mean:
    mean(σ) · P·Qᵀ (Iso-C's flattened spectrum; the mean runs over all
    min(m, n) singular values, zeros included, as in the authors' code)."""
    p, s, qh = torch.linalg.svd(matrix, full_matrices=False)
    return (p @ qh).mul_(s.mean())
