"""Shared linear algebra for the SVD-based strategies (TSV-M, Iso-C, Iso-CTS).

Which entries are "matrices": the authors of TSV and Iso-C/CTS decompose
every 2-D entry of the state dict except CLIP's ``text_projection`` (their
code excludes that key by name); everything else (biases, LayerNorms,
``class_embedding``, the 4-D patch-embedding conv kernel) is merged by the
mean of the task vectors. 2-D embeddings such as ``positional_embedding`` are
decomposed like any weight matrix, as in their code.

Algorithms (the authors and FusionBench call a full ``torch.linalg.svd`` in
float32 for every decomposition; these give the same quantities faster):

- ``top_singular_triplets``: the leading ``rank`` triplets from the symmetric
  eigendecomposition of the Gram matrix of the *small side* (AᵀA or AAᵀ,
  min(m, n)² entries): σ = √λ, the other side's vectors by one product.
  An eigendecomposition is several times cheaper than an SVD, and the Gram
  matrix costs one matrix product. Its error: the Gram matrix squares the
  condition number, so σ_i's relative error is ≈ ε·(σ_1/σ_i)² instead of
  ε·σ_1/σ_i. It runs in float32 when σ_1²/σ_rank² ≤ ``FP32_MAX_COND``
  (100: at most 10× the error of a float32 SVD, i.e. ~1e-6 relative), in
  float64 when σ_1²/σ_rank² ≤ ``FP64_MAX_COND`` (1e10: error below ~1e-6),
  and falls back to an exact float32 SVD otherwise (a numerically
  rank-deficient block, where the vectors are not determined anyway).
  Where all eigenvalues matter (polar factors), a Cholesky factorisation
  first bounds the condition number from below and skips the float32 attempt
  when it cannot pass.
- ``polar_factor``: A·(AᵀA)^(-1/2) (or (AAᵀ)^(-1/2)·A for a wide matrix) from
  the eigendecomposition of the small side's Gram matrix; the condition rule
  is the same with σ_rank replaced by the smallest singular value (error
  ≈ ε·κ² against ε·κ for an SVD).
- ``isotropic``: both the polar factor and the mean singular value from that
  one eigendecomposition.

Matrices whose small side is below ``EXACT_BELOW`` (32) use the exact SVD
(the overhead of the checks would dominate), so small cases are bit-for-bit
the authors' arithmetic. ``tests/test_merging_fast_svd.py`` checks agreement
with float64 SVDs on matrices with flat, decaying and rank-deficient spectra.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

# entries the authors' code never decomposes, even though they are 2-D
_EXCLUDED_SUFFIXES = ("text_projection",)

EXACT_BELOW = 32  # small side below this: exact SVD
FP32_MAX_COND = 1e2  # largest λ_max/λ_min of the Gram matrix accepted in float32
FP64_MAX_COND = 1e10  # ... and in float64 (beyond: exact SVD)


def is_svd_matrix(key: str, tensor: Tensor) -> bool:
    """True for the entries TSV/Iso treat as matrices (2-D, not text_projection)."""
    return tensor.dim() == 2 and not key.endswith(_EXCLUDED_SUFFIXES)


def mean_of(tensors: list[Tensor]) -> Tensor:
    """Mean of a list of tensors into a fresh accumulator (inputs untouched)."""
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total.add_(tensor)
    return total.div_(len(tensors))


def _svd_dtype(matrix: Tensor) -> torch.dtype:
    return torch.float64 if matrix.dtype == torch.float64 else torch.float32


def _gram_eigh(matrix: Tensor, lowest: int, left: bool = False):
    """Eigendecomposition of the small side's Gram matrix, in the cheapest
    precision that meets the condition rule for eigenvalue index ``lowest``
    (counted from the largest, 0-based). Returns (λ descending, vectors,
    wide) or None when even float64 is not accurate enough. ``left``: use
    AAᵀ for a square matrix too (its eigenvectors are the left singular
    vectors)."""
    wide = matrix.shape[0] < matrix.shape[1] or (left and matrix.shape[0] == matrix.shape[1])
    dtypes = (torch.float64,) if matrix.dtype == torch.float64 else (torch.float32, torch.float64)
    for dtype, max_cond in zip(dtypes, (FP32_MAX_COND, FP64_MAX_COND)[-len(dtypes):]):
        a = matrix.to(dtype)
        gram = a @ a.T if wide else a.T @ a
        if dtype == torch.float32 and lowest == min(matrix.shape) - 1 and len(dtypes) > 1 \
                and not _may_be_conditioned(gram, max_cond):
            continue  # certainly too ill-conditioned for float32: skip that eigendecomposition
        lam, vec = torch.linalg.eigh(gram)
        lam, vec = lam.flip(0), vec.flip(1)
        top, low = float(lam[0]), float(lam[lowest])
        if top == 0.0:
            return None  # zero matrix: let the SVD define its (arbitrary) vectors
        if low > 0 and top / low <= max_cond:
            return lam, vec, wide
    return None


def _may_be_conditioned(gram: Tensor, max_cond: float) -> bool:
    """Cheap necessary test for cond(gram) <= max_cond: the Cholesky pivots
    R_ii² of an SPD matrix lie in [λ_min, λ_max], so their spread is a lower
    bound of the condition number (a failed factorisation: not even PD in
    this precision). Costs a sixth of the eigendecomposition."""
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        return False
    pivots = factor.diagonal().square()
    return float(pivots.max()) <= max_cond * float(pivots.min())


def exact_truncated_svd(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top ``rank`` singular triplets by a full SVD, sliced (the authors' way)."""
    u, s, vh = torch.linalg.svd(matrix.to(_svd_dtype(matrix)), full_matrices=False)
    return u[:, :rank].to(matrix.dtype), s[:rank].to(matrix.dtype), vh[:rank, :].to(matrix.dtype)


def top_singular_triplets(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top ``rank`` singular triplets U [m, r], S [r], Vh [r, n] (see the
    module docstring for the algorithm and its error)."""
    rank = min(rank, min(matrix.shape))
    if min(matrix.shape) < EXACT_BELOW or rank < 1:
        return exact_truncated_svd(matrix, rank)
    found = _gram_eigh(matrix, rank - 1)
    if found is None:
        return exact_truncated_svd(matrix, rank)
    lam, vec, wide = found
    a = matrix.to(lam.dtype)
    sigma = lam[:rank].sqrt()
    side = vec[:, :rank]
    if wide:  # A = U Σ Vᵀ with U the eigenvectors of AAᵀ: Vᵀ = Σ⁻¹ Uᵀ A
        u, vh = side, (side.T @ a) / sigma[:, None]
    else:  # V the eigenvectors of AᵀA: U = A V Σ⁻¹
        u, vh = (a @ side) / sigma, side.T
    out = matrix.dtype
    return u.to(out), sigma.to(out), vh.contiguous().to(out)


# the name the strategies use
truncated_svd = top_singular_triplets


def top_triplets_and_left_complement(matrix: Tensor, rank: int):
    """Top ``rank`` triplets of an m×n matrix with m <= n, plus an orthonormal
    basis [m, m − rank] of the orthogonal complement of their left vectors
    (the other eigenvectors of AAᵀ), or None for the complement when the
    exact SVD path was taken."""
    m, n = matrix.shape
    if m > n or m < EXACT_BELOW or rank < 1:
        return (*top_singular_triplets(matrix, rank), None)
    found = _gram_eigh(matrix, rank - 1, left=True)
    if found is None:
        return (*exact_truncated_svd(matrix, rank), None)
    lam, vec, _wide = found
    sigma = lam[:rank].sqrt()
    u = vec[:, :rank]
    vh = (u.T @ matrix.to(lam.dtype)) / sigma[:, None]
    out = matrix.dtype
    return u.to(out), sigma.to(out), vh.to(out), vec[:, rank:].to(out)


def _polar_and_spectrum(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """(polar factor, all min(m, n) singular values, descending)."""
    if min(matrix.shape) >= EXACT_BELOW:
        found = _gram_eigh(matrix, min(matrix.shape) - 1)
        if found is not None:
            lam, vec, wide = found
            a = matrix.to(lam.dtype)
            inv_sqrt = (vec * lam.rsqrt()) @ vec.T  # (Gram)^(-1/2)
            polar = inv_sqrt @ a if wide else a @ inv_sqrt
            return polar.to(matrix.dtype), lam.sqrt().to(matrix.dtype)
    p, s, qh = torch.linalg.svd(matrix.to(_svd_dtype(matrix)), full_matrices=False)
    return (p @ qh).to(matrix.dtype), s.to(matrix.dtype)


def polar_factor(matrix: Tensor) -> Tensor:
    """The orthogonal polar factor P·Qᵀ of ``matrix`` = P·diag(σ)·Qᵀ: the
    matrix with orthonormal columns (rows, if wider than tall) nearest to it
    in Frobenius norm. Gram eigendecomposition of the small side (module
    docstring); exact SVD when that is not accurate enough."""
    return _polar_and_spectrum(matrix)[0]


def orthogonalized_merge(u_cat: Tensor, s_cat: Tensor, vh_cat: Tensor) -> Tensor:
    """U⊥ · diag(s_cat) · V⊥ᵀ with U⊥, V⊥ the polar factors of the concatenated
    singular vectors (TSV-M's and Iso-CTS's decorrelation step)."""
    return (polar_factor(u_cat) * s_cat) @ polar_factor(vh_cat)


def isotropic(matrix: Tensor) -> Tensor:
    """``matrix`` with every singular value replaced by their mean:
    mean(σ) · P·Qᵀ (Iso-C's flattened spectrum; the mean runs over all
    min(m, n) singular values, zeros included, as in the authors' code).
    Polar factor and spectrum come from one Gram eigendecomposition."""
    polar, sigma = _polar_and_spectrum(matrix)
    return polar.mul_(sigma.mean())
