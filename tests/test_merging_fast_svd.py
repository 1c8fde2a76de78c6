"""The fast decompositions of the SVD family and the sampled TIES threshold
agree with the exact algorithms (float64 SVDs, full sorts)."""

import pytest
import torch

import cl_merge  # noqa: F401  (compat shims first)
from cl_merge.merging import _svd, merge
from cl_merge.merging._topk import BracketedKth, kth_largest_in_tensor, sample_magnitudes
from cl_merge.merging.iso import iso_cts_matrix
from cl_merge.merging.tsv import tsv_merge_matrix


def with_spectrum(gen, m, n, sigma):
    """m×n matrix with singular values ``sigma`` and random singular vectors."""
    r = min(m, n)
    q1, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    return ((q1 * sigma) @ q2.T).float()


SHAPES = [(64, 64), (96, 48), (40, 120)]
SPECTRA = {
    "flat": lambda r: 1.0 + 0.01 * torch.arange(r, dtype=torch.float64),  # random-like: all well conditioned
    "decaying": lambda r: torch.logspace(0, -2, r, dtype=torch.float64),  # σ_1/σ_r = 100: float64 path
    "rank_deficient": lambda r: torch.cat([torch.logspace(0, -1, r // 2, dtype=torch.float64),
                                           torch.zeros(r - r // 2, dtype=torch.float64)]),
}


@pytest.fixture
def fast(monkeypatch):
    """Use the Gram paths even for these small matrices."""
    monkeypatch.setattr(_svd, "EXACT_BELOW", 1)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def exact(fn, *args):
    old = _svd.EXACT_BELOW
    _svd.EXACT_BELOW = 10**9
    try:
        return fn(*args)
    finally:
        _svd.EXACT_BELOW = old


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("spectrum", ["flat", "decaying"])
def test_top_triplets_match_the_exact_svd(fast, shape, spectrum):
    gen = torch.Generator().manual_seed(0)
    m, n = shape
    a = with_spectrum(gen, m, n, SPECTRA[spectrum](min(m, n)))
    rank = min(m, n) // 4
    u, s, vh = _svd.top_singular_triplets(a, rank)
    u64, s64, vh64 = torch.linalg.svd(a.double(), full_matrices=False)
    assert u.shape == (m, rank) and s.shape == (rank,) and vh.shape == (rank, n)
    assert rel(s, s64[:rank]) < 1e-5
    # the rank-r reconstruction (invariant to signs and rotations within equal σ)
    assert rel((u * s) @ vh, (u64[:, :rank] * s64[:rank]) @ vh64[:rank]) < 1e-5
    assert rel(u.T.double() @ u.double(), torch.eye(rank, dtype=torch.float64)) < 1e-4


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("spectrum", list(SPECTRA))
def test_polar_factor_matches_the_exact_svd(fast, shape, spectrum):
    gen = torch.Generator().manual_seed(1)
    m, n = shape
    a = with_spectrum(gen, m, n, SPECTRA[spectrum](min(m, n)))
    p64, _, q64 = torch.linalg.svd(a.double(), full_matrices=False)
    got = _svd.polar_factor(a)
    small = got.T @ got if m >= n else got @ got.T
    torch.testing.assert_close(small, torch.eye(min(m, n)), atol=1e-4, rtol=0)
    if spectrum != "rank_deficient":  # otherwise the factor is not unique
        assert rel(got, p64 @ q64) < 1e-5


@pytest.mark.parametrize("spectrum", list(SPECTRA))
def test_isotropic_matches_the_exact_svd(fast, spectrum):
    gen = torch.Generator().manual_seed(2)
    a = with_spectrum(gen, 80, 50, SPECTRA[spectrum](50))
    p, s, q = torch.linalg.svd(a.double(), full_matrices=False)
    got = _svd.isotropic(a)
    if spectrum == "rank_deficient":  # same spectrum mean, orthonormal columns up to that mean
        assert abs(float(torch.linalg.matrix_norm(got.double(), "nuc")) - float(s.mean()) * 50) < 1e-3
    else:
        assert rel(got, (p @ q) * s.mean()) < 1e-5


def test_tsv_and_iso_cts_fast_agree_with_exact(fast):
    gen = torch.Generator().manual_seed(3)
    for m, n in [(48, 40), (40, 64)]:
        deltas = [with_spectrum(gen, m, n, torch.logspace(0, -1.5, min(m, n), dtype=torch.float64)) * 0.01
                  for _ in range(3)]
        assert rel(tsv_merge_matrix(deltas), exact(tsv_merge_matrix, [d.double() for d in deltas])) < 5e-5
        assert rel(iso_cts_matrix(deltas, 0.8), exact(iso_cts_matrix, [d.double() for d in deltas], 0.8)) < 5e-5


def test_iso_cts_common_subspace_does_not_lose_the_gap(fast):
    # random task vectors: the common/residual cut falls between close
    # eigenvalues. A float32 Gram there gave 1.4e-5 (a float32 SVD 8e-6);
    # the float64 common decomposition keeps it near 1e-6
    gen = torch.Generator().manual_seed(14)
    deltas = [torch.randn(96, 96, generator=gen) * 1e-3 for _ in range(8)]
    want = exact(iso_cts_matrix, [d.double() for d in deltas], 0.8)
    assert rel(iso_cts_matrix(deltas, 0.8), want) < 5e-6


def test_float64_inputs_stay_float64(fast):
    gen = torch.Generator().manual_seed(4)
    a = with_spectrum(gen, 48, 40, SPECTRA["decaying"](40)).double()
    u, s, vh = _svd.top_singular_triplets(a, 10)
    assert u.dtype == s.dtype == vh.dtype == torch.float64
    _, s64, _ = torch.linalg.svd(a, full_matrices=False)
    assert rel(s, s64[:10]) < 1e-12


def test_merge_level_agreement_on_larger_matrices():
    # above EXACT_BELOW the strategies take the fast path by default
    gen = torch.Generator().manual_seed(5)
    pre = {"w": torch.zeros(64, 48), "b": torch.zeros(48)}
    tvs = [with_spectrum(gen, 64, 48, torch.logspace(0, -1, 48, dtype=torch.float64)) * 0.01 for _ in range(3)]
    fts = [{"w": tv, "b": torch.zeros(48)} for tv in tvs]
    for method, fn in [("tsv_m", lambda ds: tsv_merge_matrix(ds)),
                       ("iso_c", lambda ds: _svd.isotropic(sum(ds))),
                       ("iso_cts", lambda ds: iso_cts_matrix(ds, 0.8))]:
        got = merge(pre, fts, method, scaling=1.0)["w"]
        want = exact(fn, [t.double() for t in tvs])
        assert rel(got, want) < 5e-5, method


# ------------------------------------------------------------------ CPU kernels
@pytest.fixture
def one_thread():
    """torch single-threaded: every CPU kernel then goes to scipy's LAPACK."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_kernel_choice_follows_the_thread_count(one_thread):
    x = torch.zeros(4, 4)
    assert _svd._on_lapack(x) and not _svd._on_lapack(x.to(torch.float16))
    torch.set_num_threads(2)
    assert not _svd._on_lapack(x)
    assert _svd._on_lapack(x, algorithmic=True)  # MRRR on a subset is the cheaper algorithm at any count


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(70, 40), (40, 70)])
def test_cpu_gram_is_the_lower_triangle_of_the_product(one_thread, dtype, shape):
    gen = torch.Generator().manual_seed(9)
    a = torch.randn(shape, generator=gen, dtype=dtype)
    wide = shape[0] < shape[1]
    want = a @ a.T if wide else a.T @ a
    got = _svd._gram(a, wide)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.tril(), want.tril())


@pytest.mark.parametrize("count", [5, 40])  # MRRR on a subset, and the full divide-and-conquer
def test_cpu_leading_eigenpairs_match_torch(one_thread, count):
    gen = torch.Generator().manual_seed(10)
    a = torch.randn(90, 40, generator=gen, dtype=torch.float64)
    gram = a.T @ a
    lam_t, vec_t = torch.linalg.eigh(gram)
    lam, vec = _svd._eigh_leading(_svd._gram(a, wide=False), count)
    assert lam.shape == (count,) and vec.shape == (40, count)
    torch.testing.assert_close(lam, lam_t.flip(0)[:count])
    # eigenvectors up to sign
    dots = (vec * vec_t.flip(1)[:, :count]).sum(0).abs()
    torch.testing.assert_close(dots, torch.ones(count, dtype=torch.float64))


def test_cpu_svd_matches_torch(one_thread):
    gen = torch.Generator().manual_seed(11)
    a = torch.randn(80, 50, generator=gen)
    u, s, vh = _svd._full_svd(a)
    _, s_t, _ = torch.linalg.svd(a, full_matrices=False)
    torch.testing.assert_close(s, s_t)
    torch.testing.assert_close((u * s) @ vh, a, atol=1e-5, rtol=0)


def test_device_path_agrees_with_the_cpu_kernels(fast, one_thread, monkeypatch):
    # the torch calls a GPU takes, exercised on CPU: same triplets, polar and merges
    gen = torch.Generator().manual_seed(12)
    deltas = [with_spectrum(gen, 64, 48, torch.logspace(0, -1.5, 48, dtype=torch.float64)) * 0.01
              for _ in range(3)]
    lapack = (tsv_merge_matrix(deltas), _svd.isotropic(sum(deltas)), iso_cts_matrix(deltas, 0.8),
              _svd.top_singular_triplets(deltas[0], 5)[1])
    monkeypatch.setattr(_svd, "_on_lapack", lambda tensor, algorithmic=False: False)
    device = (tsv_merge_matrix(deltas), _svd.isotropic(sum(deltas)), iso_cts_matrix(deltas, 0.8),
              _svd.top_singular_triplets(deltas[0], 5)[1])
    for got, want in zip(device, lapack):
        assert rel(got, want) < 1e-5


def test_lapack_calls_run_in_the_calling_thread():
    from threadpoolctl import threadpool_info

    with _svd._one_blas_thread():
        inside = {info["filepath"]: info["num_threads"] for info in threadpool_info()
                  if info["user_api"] == "blas"}
    assert inside and set(inside.values()) == {1}


def test_nearly_square_ill_conditioned_polar_takes_the_exact_svd(fast):
    # σ_max/σ_min = 1e3: float32 Gram refused, and a square matrix skips the float64 Gram
    gen = torch.Generator().manual_seed(13)
    a = with_spectrum(gen, 60, 60, torch.logspace(0, -3, 60, dtype=torch.float64))
    assert _svd._gram_eigh(a, 59, float64=False) is None
    p64, _, q64 = torch.linalg.svd(a.double())
    assert rel(_svd.polar_factor(a), p64 @ q64) < 1e-4


# ------------------------------------------------------------------ the sketch
def decaying_like_fine_tuning(gen, m, n):
    """σ_i ∝ 1/i: λ_1/λ_k of the Gram matrix is k², far beyond float32's limit."""
    return with_spectrum(gen, m, n, 1.0 / torch.arange(1, min(m, n) + 1, dtype=torch.float64))


@pytest.mark.parametrize("spectrum", ["flat", "fine_tuning"])
def test_sketch_tells_ill_conditioned_leading_blocks_apart(spectrum):
    gen = torch.Generator().manual_seed(3)
    a = with_spectrum(gen, 300, 200, SPECTRA["flat"](200)) if spectrum == "flat" \
        else decaying_like_fine_tuning(gen, 300, 200)
    gram = a.T @ a
    lam = torch.linalg.eigvalsh(gram.double()).flip(0)
    lowest = 24
    true_ratio = float(lam[0] / lam[lowest])
    limit = _svd.SKETCH_MARGIN * _svd.FP32_MAX_COND
    assert (true_ratio > limit) == (spectrum == "fine_tuning")  # the case is what it says
    # the lower triangle is all the sketch reads (scipy's syrk leaves the upper one undefined)
    assert _svd._sketch_exceeds(torch.tril(gram) + 7.0 * torch.triu(torch.ones_like(gram), 1), lowest, limit) \
        == (spectrum == "fine_tuning")


def test_fine_tuning_spectra_skip_the_float32_attempt_and_stay_exact(fast, monkeypatch):
    gen = torch.Generator().manual_seed(4)
    a = decaying_like_fine_tuning(gen, 240, 160)
    attempts = []
    leading = _svd._eigh_leading
    monkeypatch.setattr(_svd, "_eigh_leading", lambda gram, count: attempts.append(gram.dtype) or leading(gram, count))
    u, s, vh = _svd.top_singular_triplets(a, 20)
    assert attempts == [torch.float64]
    u64, s64, vh64 = torch.linalg.svd(a.double(), full_matrices=False)
    assert rel(s, s64[:20]) < 1e-6
    assert rel((u * s) @ vh, (u64[:, :20] * s64[:20]) @ vh64[:20]) < 1e-5
    # a flat spectrum keeps the float32 route
    attempts.clear()
    _svd.top_singular_triplets(with_spectrum(gen, 240, 160, SPECTRA["flat"](160)), 20)
    assert attempts == [torch.float32]


def test_a_wrong_sketch_guess_costs_time_only(fast, monkeypatch):
    gen = torch.Generator().manual_seed(5)
    flat = with_spectrum(gen, 200, 120, SPECTRA["flat"](120))
    steep = decaying_like_fine_tuning(gen, 200, 120)
    expected = {name: torch.linalg.svd(m.double(), full_matrices=False) for name, m in (("flat", flat), ("steep", steep))}
    for guess in (True, False):
        monkeypatch.setattr(_svd, "_sketch_exceeds", lambda *args, guess=guess: guess)
        for name, matrix in (("flat", flat), ("steep", steep)):
            u, s, vh = _svd.top_singular_triplets(matrix, 15)
            u64, s64, vh64 = expected[name]
            assert rel((u * s) @ vh, (u64[:, :15] * s64[:15]) @ vh64[:15]) < 1e-5, (guess, name)


# ------------------------------------------------------------------ TIES threshold
def test_bracketed_kth_equals_sort_and_falls_back():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(300_000, generator=gen) * torch.rand(300_000, generator=gen)
    ordered = x.abs().sort(descending=True).values
    for k in (1, 17, 60_000, 299_999):
        assert kth_largest_in_tensor(x, k) == float(ordered[k - 1])
        selector = BracketedKth(sample_magnitudes(x), k, x.numel())
        for chunk in x.split(70_001):
            selector.feed(chunk.abs())
        assert selector.threshold() in (None, float(ordered[k - 1]))
    # a sample that misrepresents the data: the bracket misses and says so
    misleading = BracketedKth(torch.full((1000,), 10.0), 5, x.numel())
    misleading.feed(x.abs())
    assert misleading.threshold() is None


def test_ties_global_threshold_with_skewed_tensors_equals_sorted_topk():
    # one large tensor holds most of the mass: the sampled bracket must still be exact
    gen = torch.Generator().manual_seed(7)
    pre = {"a": torch.zeros(400, 400), "b": torch.zeros(50), "c": torch.zeros(0)}
    tvs = [{"a": torch.randn(400, 400, generator=gen) ** 3, "b": 5 * torch.randn(50, generator=gen),
            "c": torch.zeros(0)} for _ in range(2)]
    fts = [{k: pre[k] + tv[k] for k in pre} for tv in tvs]
    merged = merge(pre, fts, "ties", density=0.1, scaling=1.0, aggregate="sum")
    flat = [torch.cat([tv["a"].reshape(-1), tv["b"]]) for tv in tvs]
    k = int(0.1 * flat[0].numel())
    trimmed = []
    for f in flat:
        threshold = f.abs().sort(descending=True).values[k - 1]
        trimmed.append(torch.where(f.abs() >= threshold, f, torch.zeros(())))
    total = trimmed[0] + trimmed[1]
    sign = torch.sign(total)
    expected = sum(torch.where(t * sign > 0, t, torch.zeros(())) for t in trimmed)
    torch.testing.assert_close(torch.cat([merged["a"].reshape(-1), merged["b"]]), expected)
    assert merged["c"].shape == (0,)


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_per_tensor_chunked_fold_equals_incremental(method):
    # a tensor above the chunk size takes the chunked per-tensor path in batch form
    gen = torch.Generator().manual_seed(8)
    pre = {"w": torch.randn(300, 300, generator=gen), "b": torch.randn(7, generator=gen)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in pre.items()} for _ in range(3)]
    hp = {"topk_scope": "per_tensor", "density": 0.3}
    batch = merge(pre, fts, method, **hp)
    merger = cl_merge.merging.incremental_merger(pre, method, **hp)
    for ft in fts:
        merger.update_finetuned(ft)
    for key in pre:
        assert torch.equal(batch[key], merger.current()[key]), key
