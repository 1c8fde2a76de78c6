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
  Fine-tuning updates' spectra decay fast (σ_i ∝ 1/i puts σ_1²/σ_96² near
  9e3), so for a leading block a Gaussian sketch of the Gram matrix
  (``_sketch_exceeds``) first tells whether float32 can pass; where it
  surely cannot, the float32 attempt is skipped.
  Where all eigenvalues matter (polar factors), a Cholesky factorisation
  first bounds the condition number from below and skips the float32 attempt
  when it cannot pass.
- ``polar_factor``: A·(AᵀA)^(-1/2) (or (AAᵀ)^(-1/2)·A for a wide matrix) from
  the eigendecomposition of the small side's Gram matrix; the condition rule
  is the same with σ_rank replaced by the smallest singular value (error
  ≈ ε·κ² against ε·κ for an SVD). A nearly square matrix (long side below
  ``NEARLY_SQUARE`` × short side) that fails the float32 rule goes straight
  to the exact SVD, which is cheaper there than the float64 Gram route.
- ``isotropic``: both the polar factor and the mean singular value from that
  one eigendecomposition.

Kernels, on CPU: when at most ``SUBSET_UP_TO`` of the eigenpairs are wanted
(TSV-M's per-task triplets, Iso-CTS's residuals) LAPACK's ``?syevr`` (MRRR)
computes only those, through scipy. When torch runs single-threaded, the
Gram matrix is ``?syrk`` (one triangle, half the flops of ``A.T @ A``), a
full eigendecomposition ``?syevd`` and the exact SVD ``?gesdd``, through
scipy too (its OpenBLAS beat torch's MKL there); with more threads those
stay torch's threaded calls. scipy's calls always run in the calling
thread (``_one_blas_thread``); ``?syrk`` and ``?syevr`` go through
``_lapack``, which calls scipy's exported routines without holding the GIL.
The per-task decompositions of TSV-M and Iso-CTS run side by side on
``torch.get_num_threads()`` threads, each single-threaded (``map_tasks``):
one 768-wide eigendecomposition gains little from a second thread, separate
ones gain nearly all of it. Other devices use torch's (cuSOLVER) calls.

Matrices whose small side is below ``EXACT_BELOW`` (32) use torch's exact
SVD (the overhead of the checks would dominate), so small cases are
bit-for-bit the authors' arithmetic. ``tests/test_merging_fast_svd.py``
checks agreement with float64 SVDs on matrices with flat, decaying and
rank-deficient spectra, and the CPU kernels against torch's.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy
import torch

from cl_merge.merging import _lapack, _placement

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


# ------------------------------------------------------------------ kernels
# (module docstring). One thread, 768-wide float32: ?syrk is 1.7× faster than
# A.T @ A, ?syevr for the top eighth 1.7× faster than a full torch eigh, and
# ?gesdd 1.2× faster than torch.linalg.svd.
NEARLY_SQUARE = 1.25  # long side / short side below this: exact SVD instead of a float64 Gram
SUBSET_UP_TO = 0.25  # MRRR on a subset when at most this fraction of the eigenpairs is needed

_blas_controller = None
_blas_limit_lock = threading.Lock()
_blas_limit_depth = 0
_blas_limit = None


@contextlib.contextmanager
def _one_blas_thread():
    """scipy's LAPACK calls run in the calling thread. Its OpenBLAS worker
    threads would spin after each call next to torch's own pool: on two
    cores that made TSV-M 1.2× and Iso-C 1.7× slower than with torch alone.
    Re-entrant and thread-safe: only the outermost entry sets and restores
    the limit (``map_tasks``' workers enter it inside their caller's)."""
    global _blas_controller, _blas_limit_depth, _blas_limit
    with _blas_limit_lock:
        if _blas_limit_depth == 0:
            if _blas_controller is None:
                import scipy.linalg  # noqa: F401  (load its BLAS before the controller looks)
                from threadpoolctl import ThreadpoolController

                _blas_controller = ThreadpoolController()
            _blas_limit = contextlib.ExitStack()
            _blas_limit.enter_context(_blas_controller.limit(limits=1, user_api="blas"))
        _blas_limit_depth += 1
    try:
        yield
    finally:
        with _blas_limit_lock:
            _blas_limit_depth -= 1
            if _blas_limit_depth == 0:
                _blas_limit.close()
                _blas_limit = None


# smallest side from which map_tasks spreads matrices over threads: smaller
# ones decompose in about a millisecond, less than starting the threads costs
PARALLEL_FROM = 128


_threads_section = threading.Lock()  # one map_tasks section at a time sets the thread counts


@contextlib.contextmanager
def _torch_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def map_tasks(function, matrices: list[Tensor]) -> list:
    """``[function(m) for m in matrices]``, spread over up to
    ``torch.get_num_threads()`` threads for CPU matrices whose small side is
    at least ``PARALLEL_FROM``.

    Why: TSV-M and Iso-CTS decompose every task's matrix on its own, and
    one 768-wide eigendecomposition scales poorly over threads (LAPACK's
    tridiagonal reduction is bound by memory traffic), while separate ones
    scale with the cores. Each worker runs single-threaded (torch's
    intra-op threads and BLAS set to 1 for the duration, then restored), so
    the kernels are those of a single-threaded run and the results are the
    same bit for bit as ``torch.set_num_threads(1)`` gives. The heavy
    kernels release the GIL (torch's, and ``_lapack``'s calls of scipy's
    BLAS/LAPACK). torch's thread setting is partly process-wide (MKL's,
    and what new threads start with): other torch work in this process may
    run single-threaded meanwhile; a second section started from another
    thread meanwhile runs serially.
    Memory: one decomposition's temporaries per worker (a float64 copy and
    Gram matrices: about 30 MB per ViT-B/32 MLP matrix)."""
    workers = min(len(matrices), torch.get_num_threads())
    if workers < 2 or any(not _placement.host_kernels(m) or min(m.shape) < PARALLEL_FROM for m in matrices) \
            or not _threads_section.acquire(blocking=False):
        # (a section already running in another thread: setting and restoring
        # the process-wide thread count from two threads would leave it wrong)
        return [function(m) for m in matrices]
    try:
        with _one_blas_thread(), _torch_threads(1), ThreadPoolExecutor(workers) as pool:
            return list(pool.map(function, matrices))
    finally:
        _threads_section.release()


def _on_lapack(tensor: Tensor, algorithmic: bool = False) -> bool:
    """Whether this CPU kernel goes to scipy: always where it is the cheaper
    algorithm (``algorithmic``: MRRR on a subset), otherwise only when torch
    runs single-threaded (scipy's single-threaded OpenBLAS is then faster than
    torch's; with more threads torch's threaded MKL kernels are kept)."""
    return _placement.host_kernels(tensor) and tensor.dtype in (torch.float32, torch.float64) \
        and (algorithmic or torch.get_num_threads() == 1)


def _gram(a: Tensor, wide: bool) -> Tensor:
    """AAᵀ (``wide``) or AᵀA; only the lower triangle is defined (the
    eigensolvers and the Cholesky factorisation read nothing else)."""
    if not _on_lapack(a):
        return a @ a.T if wide else a.T @ a
    with _one_blas_thread():  # a Fortran-ordered result: a view of AᵀA as it is
        return torch.from_numpy(_lapack.syrk_lower(a.detach().contiguous().numpy(), wide))


def _eigh_leading(gram: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """The ``count`` largest eigenvalues (descending) and their eigenvectors
    of a symmetric matrix given by its lower triangle (which may be overwritten)."""
    size = gram.shape[0]
    subset = count <= SUBSET_UP_TO * size
    if _on_lapack(gram, algorithmic=subset):
        with _one_blas_thread():
            if subset:
                lam, vec = _lapack.syevr_leading(numpy.asfortranarray(gram.numpy()), count)
            else:
                import scipy.linalg

                lam, vec = scipy.linalg.eigh(gram.numpy(), lower=True, check_finite=False, overwrite_a=True,
                                             driver="evd")
        lam, vec = torch.from_numpy(lam), torch.from_numpy(vec)
    else:
        lam, vec = torch.linalg.eigh(gram)
    return lam.flip(0)[:count], vec.flip(1)[:, :count]


def _gram_eigh(matrix: Tensor, lowest: int, left: bool = False, count: int | None = None,
               float64: bool = True):
    """Leading eigenpairs of the small side's Gram matrix, in the cheapest
    precision that meets the condition rule for eigenvalue index ``lowest``
    (counted from the largest, 0-based). ``count``: how many pairs to
    compute (default: all). ``float64=False``: do not retry in float64
    (the caller has a cheaper exact route). Returns (λ descending, vectors, wide) or None
    when even float64 is not accurate enough. ``left``: use AAᵀ for a square
    matrix too (its eigenvectors are the left singular vectors)."""
    wide = matrix.shape[0] < matrix.shape[1] or (left and matrix.shape[0] == matrix.shape[1])
    size = min(matrix.shape)
    count = size if count is None else max(count, lowest + 1)
    dtypes = (torch.float64,) if matrix.dtype == torch.float64 else \
        (torch.float32, torch.float64) if float64 else (torch.float32,)
    for dtype in dtypes:
        max_cond = FP32_MAX_COND if dtype == torch.float32 else FP64_MAX_COND
        gram = _gram(matrix.to(dtype), wide)
        if dtype == torch.float32 and lowest == size - 1 and matrix.dtype != torch.float64 \
                and not _may_be_conditioned(gram, max_cond):
            continue  # certainly too ill-conditioned for float32: skip that eigendecomposition
        if dtype == torch.float32 and float64 and lowest < size - 1 and count <= SUBSET_UP_TO * size \
                and _sketch_exceeds(gram, lowest, SKETCH_MARGIN * max_cond):
            continue  # almost surely too ill-conditioned for float32 (a wrong guess costs time only)
        lam, vec = _eigh_leading(gram, count)
        top, low = float(lam[0]), float(lam[lowest])
        if top == 0.0:
            return None  # zero matrix: let the SVD define its (arbitrary) vectors
        if low > 0 and top / low <= max_cond:
            return lam, vec, wide
    return None


SKETCH_OVERSAMPLE = 8  # sketch columns beyond the eigenvalue index
SKETCH_MARGIN = 4.0  # skip float32 only when the sketch's ratio is this far beyond its limit


def _sketch_exceeds(gram: Tensor, lowest: int, limit: float) -> bool:
    """Whether a Gaussian sketch puts λ_1/λ_(lowest+1) of a symmetric PSD
    matrix (lower triangle) above ``limit``.

    Why: TSV-M and Iso-CTS ask for the leading eigenpairs of each task
    vector's Gram matrix, and fine-tuning updates have fast-decaying spectra
    (σ_i ∝ 1/i puts λ_1/λ_96 near 9e3, far beyond float32's 100), so the
    float32 attempt failed on nearly every matrix and was thrown away
    (skipping it took TSV-M from 63.4 s to 53.8 s on ViT-B/32 × 8 such
    task vectors, 1 thread). The sketch G·Ω (Ω: lowest + 1 + 8 Gaussian
    columns, fixed seed) costs about a tenth of the eigendecomposition; its
    ratio overestimated the true one by 1.3–2× on flat and decaying spectra
    (768-wide), hence the margin. The guess only picks the route: both
    routes are checked by the exact rule afterwards."""
    size = gram.shape[0]
    lower = gram.tril()
    full = lower + lower.tril(-1).T
    generator = torch.Generator(device=gram.device).manual_seed(0)
    omega = torch.randn(size, min(size, lowest + 1 + SKETCH_OVERSAMPLE), generator=generator,
                        dtype=gram.dtype, device=gram.device)
    sketch = (full @ omega).to(torch.float64)
    mu = torch.linalg.eigvalsh(sketch.T @ sketch).flip(0)  # σ_i(G·Ω)², descending
    top, low = float(mu[0]), float(mu[lowest])
    if not top > 0:
        return False  # zero matrix: the exact route decides
    return low <= 0 or top > limit * limit * low


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


def _full_svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD in float32 (float64 for float64 input), for the matrices the
    fast paths give up on: LAPACK's ``?gesdd`` through scipy where
    ``_on_lapack`` says so (1.2× faster single-threaded than
    ``torch.linalg.svd``, which calls the same algorithm), torch's below
    ``EXACT_BELOW``, with more threads and on other devices.

    ``?gesdd``'s divide and conquer can fail to converge on matrices that
    are not even ill-conditioned: torch's float32 SVD at 2 threads failed on
    Iso-CTS's 1024×1024 V of a ViT-L/14 matrix with condition number 2.2e3
    (the failure that also stops FusionBench's Iso-CTS at 2 threads), while
    the same call single-threaded, scipy's and float64 all converged. A
    failed call is retried in float64, then by the QR-iteration SVD
    ``?gesvd`` (slower, and it always converges); the result keeps the
    input's precision (``with_svd_retries``)."""
    return with_svd_retries(_gesdd, matrix.to(_svd_dtype(matrix)))


def with_svd_retries(svd, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``svd(a)`` (a thin SVD); where it fails to converge, ``svd`` of ``a``
    in float64, then LAPACK's ``?gesvd`` in float64; the factors in ``a``'s dtype."""
    try:
        return svd(a)
    except (torch.linalg.LinAlgError, numpy.linalg.LinAlgError):
        pass
    wider = a.to(torch.float64)
    try:
        u, s, vh = svd(wider)
    except (torch.linalg.LinAlgError, numpy.linalg.LinAlgError):
        u, s, vh = _gesvd(wider)
    return u.to(a.dtype), s.to(a.dtype), vh.to(a.dtype)


def thin_svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.linalg.svd(a, full_matrices=False)``, retried where it fails
    to converge (``with_svd_retries``): for the strategies that need every
    singular triplet of a matrix (OPCM, DOP)."""
    return with_svd_retries(lambda m: torch.linalg.svd(m, full_matrices=False), a)


def _gesdd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if not _on_lapack(a) or min(a.shape) < EXACT_BELOW:
        return torch.linalg.svd(a, full_matrices=False)
    return _scipy_svd(a, "gesdd")


def _gesvd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # not a choice of kernels (``_placement``): torch takes ``driver`` on CUDA only
    if a.device.type == "cuda":
        return torch.linalg.svd(a, full_matrices=False, driver="gesvd")
    return _scipy_svd(a, "gesvd")


def _scipy_svd(a: Tensor, driver: str) -> tuple[Tensor, Tensor, Tensor]:
    import scipy.linalg

    with _one_blas_thread():
        u, s, vh = scipy.linalg.svd(a.detach().cpu().numpy(), full_matrices=False, check_finite=False,
                                    lapack_driver=driver)
    return tuple(torch.from_numpy(x).to(a.device) for x in (u, s, vh))


def exact_truncated_svd(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top ``rank`` singular triplets by a full SVD, sliced (the authors' way)."""
    u, s, vh = _full_svd(matrix)
    return u[:, :rank].to(matrix.dtype), s[:rank].to(matrix.dtype), vh[:rank, :].to(matrix.dtype)


def top_singular_triplets(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top ``rank`` singular triplets U [m, r], S [r], Vh [r, n] (see the
    module docstring for the algorithm and its error)."""
    rank = min(rank, min(matrix.shape))
    if min(matrix.shape) < EXACT_BELOW or rank < 1:
        return exact_truncated_svd(matrix, rank)
    found = _gram_eigh(matrix, rank - 1, count=rank)
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
    exact SVD path was taken. Always in float64: the complement's error is
    set by the eigenvalue gap at ``rank``, which the condition rule does not
    see (float32 gave 8e-5 relative on Iso-CTS of 8 random 768×768 task
    vectors, 2.6× a float32 SVD's; float64 3e-6)."""
    m, n = matrix.shape
    if m > n or m < EXACT_BELOW or rank < 1:
        return (*top_singular_triplets(matrix, rank), None)
    a = matrix.to(torch.float64)
    found = _gram_eigh(a, rank - 1, left=True)
    if found is None:
        return (*exact_truncated_svd(matrix, rank), None)
    lam, vec, _wide = found
    sigma = lam[:rank].sqrt()
    u = vec[:, :rank]
    vh = (u.T @ a) / sigma[:, None]
    out = matrix.dtype
    return u.to(out), sigma.to(out), vh.to(out), vec[:, rank:].to(out)


def _polar_and_spectrum(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """(polar factor, all min(m, n) singular values, descending)."""
    if min(matrix.shape) >= EXACT_BELOW:
        # nearly square and too ill-conditioned for float32: one SVD costs
        # less than the float64 Gram route (2/3 of it at 768×768)
        nearly_square = max(matrix.shape) < NEARLY_SQUARE * min(matrix.shape)
        found = _gram_eigh(matrix, min(matrix.shape) - 1, float64=not nearly_square)
        if found is not None:
            lam, vec, wide = found
            a = matrix.to(lam.dtype)
            inv_sqrt = (vec * lam.rsqrt()) @ vec.T  # (Gram)^(-1/2)
            polar = inv_sqrt @ a if wide else a @ inv_sqrt
            return polar.to(matrix.dtype), lam.sqrt().to(matrix.dtype)
    p, s, qh = _full_svd(matrix)
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
