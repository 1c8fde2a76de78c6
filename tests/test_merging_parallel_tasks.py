"""The SVD family's per-task decompositions run side by side on threads:
the GIL-free BLAS/LAPACK calls equal scipy's wrappers bit for bit, the
threaded map equals a single-threaded run bit for bit, and every setting it
changes is restored."""

import threading
import time

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.linalg import blas
from threadpoolctl import threadpool_info

import cl_merge  # noqa: F401  (compat shims first)
from cl_merge.merging import _lapack, _svd, merge
from cl_merge.merging.iso import iso_cts_matrix
from cl_merge.merging.tsv import tsv_merge_matrix


@pytest.fixture
def threads():
    """Restore torch's thread count after a test that sets it."""
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def blas_threads() -> set:
    return {info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"}


# ------------------------------------------------------------------ _lapack
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(150, 60), (60, 150), (40, 40)])
def test_gil_free_syrk_and_syevr_equal_scipys_wrappers(dtype, shape):
    a = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    for wide in (False, True):
        syrk = blas.ssyrk if dtype == np.float32 else blas.dsyrk
        want = syrk(1.0, a.T, trans=1 if wide else 0, lower=1)
        got = _lapack.syrk_lower(a, wide)
        assert got.flags.f_contiguous and got.dtype == dtype
        np.testing.assert_array_equal(np.tril(got), np.tril(want))
        size = got.shape[0]
        for count in (1, size // 5, size):
            lam, vec = scipy.linalg.eigh(want.copy(order="F"), lower=True, check_finite=False, overwrite_a=True,
                                         driver="evr", subset_by_index=[size - count, size - 1])
            got_lam, got_vec = _lapack.syevr_leading(got.copy(order="F"), count)
            np.testing.assert_array_equal(got_lam, lam)
            np.testing.assert_array_equal(got_vec, vec)


def test_gil_free_calls_refuse_layouts_they_would_misread():
    a = np.ones((6, 4), dtype=np.float64)
    with pytest.raises(ValueError, match="C-contiguous"):
        _lapack.syrk_lower(np.asfortranarray(a), wide=False)
    with pytest.raises(ValueError, match="C-contiguous"):
        _lapack.syrk_lower(a.astype(np.float16), wide=False)
    with pytest.raises(ValueError, match="Fortran-ordered"):
        _lapack.syevr_leading(np.ones((4, 5), dtype=np.float64)[:, :4], 2)
    with pytest.raises(ValueError, match="count 5 outside 1..4"):
        _lapack.syevr_leading(np.eye(4, order="F"), 5)


def test_svd_kernels_accept_non_contiguous_inputs(threads):
    # the Gram route copies a transposed (column-major) matrix instead of misreading it
    torch.set_num_threads(1)
    a = torch.randn(60, 90, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(_svd._gram(a.T, wide=False).tril(), (a @ a.T).tril())


# ------------------------------------------------------------------ map_tasks
def task_matrices(count=4, shape=(160, 130), seed=2):
    gen = torch.Generator().manual_seed(seed)
    return [1e-3 * torch.randn(shape, generator=gen) for _ in range(count)]


def test_map_tasks_equals_a_single_threaded_run_bit_for_bit(threads):
    matrices = task_matrices()
    rank = 130 // 4
    torch.set_num_threads(1)
    want = [_svd.truncated_svd(m, rank) for m in matrices]
    torch.set_num_threads(2)
    got = _svd.map_tasks(lambda m: _svd.truncated_svd(m, rank), matrices)
    for (u, s, vh), (u0, s0, vh0) in zip(got, want):
        assert torch.equal(u, u0) and torch.equal(s, s0) and torch.equal(vh, vh0)


def test_map_tasks_spreads_over_threads_and_restores_every_setting(threads):
    torch.set_num_threads(2)
    before_blas = blas_threads()
    seen, inside = set(), []

    def work(matrix):
        time.sleep(0.02)  # long enough that both workers get a task
        seen.add(threading.get_ident())
        inside.append((torch.get_num_threads(), blas_threads()))
        return float(_svd.truncated_svd(matrix, 8)[1][0])

    results = _svd.map_tasks(work, task_matrices(count=6))
    assert len(results) == 6 and threading.get_ident() not in seen and len(seen) == 2
    assert all(count == 1 and limits == {1} for count, limits in inside)
    assert torch.get_num_threads() == 2 and blas_threads() == before_blas


def test_map_tasks_stays_serial_where_threads_cannot_pay(threads):
    torch.set_num_threads(2)
    caller = threading.get_ident()
    for matrices in (task_matrices(count=1), task_matrices(shape=(160, 100)), []):
        idents = _svd.map_tasks(lambda m: threading.get_ident(), matrices)
        assert set(idents) <= {caller}
    torch.set_num_threads(1)
    assert set(_svd.map_tasks(lambda m: threading.get_ident(), task_matrices())) == {caller}


def test_map_tasks_in_two_threads_at_once_leaves_the_thread_count_as_it_was(threads):
    # a second section while one runs stays serial instead of racing on the
    # process-wide thread count
    torch.set_num_threads(2)
    inner_ran_in = []
    started, release = threading.Event(), threading.Event()

    def first(matrix):
        started.set()
        release.wait(10)
        return 0

    outer = threading.Thread(target=lambda: _svd.map_tasks(first, task_matrices(count=2)))
    outer.start()
    assert started.wait(10)
    caller = threading.get_ident()
    _svd.map_tasks(lambda m: inner_ran_in.append(threading.get_ident()), task_matrices(count=2))
    release.set()
    outer.join()
    assert set(inner_ran_in) == {caller}
    assert torch.get_num_threads() == 2


def test_map_tasks_raises_a_workers_error_and_restores_the_settings(threads):
    torch.set_num_threads(2)
    before_blas = blas_threads()

    def fail(matrix):
        raise ValueError("task failed")

    with pytest.raises(ValueError, match="task failed"):
        _svd.map_tasks(fail, task_matrices())
    assert torch.get_num_threads() == 2 and blas_threads() == before_blas


def test_one_blas_thread_is_reentrant_across_threads():
    before = blas_threads()
    with _svd._one_blas_thread():
        barrier = threading.Barrier(2)

        def nested():
            with _svd._one_blas_thread():
                barrier.wait()  # both inside at once; the first to leave must not lift the limit
            assert blas_threads() == {1}

        workers = [threading.Thread(target=nested) for _ in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert blas_threads() == {1}
    assert blas_threads() == before


def test_threaded_merges_agree_with_the_exact_algorithms(threads):
    # matrices large enough for map_tasks, at two threads
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(3)
    sigma = torch.logspace(0, -1, 128, dtype=torch.float64)
    tvs = []
    for _ in range(4):
        q1, _ = torch.linalg.qr(torch.randn(160, 128, generator=gen, dtype=torch.float64))
        q2, _ = torch.linalg.qr(torch.randn(128, 128, generator=gen, dtype=torch.float64))
        tvs.append((0.01 * (q1 * sigma) @ q2.T).float())
    pre = {"w": torch.zeros(160, 128)}
    for method, exact in [("tsv_m", tsv_merge_matrix), ("iso_cts", lambda ds: iso_cts_matrix(ds, 0.8))]:
        got = merge(pre, [{"w": tv} for tv in tvs], method, scaling=1.0)["w"]
        old = _svd.EXACT_BELOW
        _svd.EXACT_BELOW = 10**9
        try:
            want = exact([t.double() for t in tvs])
        finally:
            _svd.EXACT_BELOW = old
        assert float((got.double() - want).norm() / want.norm()) < 5e-5, method


# ------------------------------------------------------------------ robust exact SVD
@pytest.mark.parametrize("failures", [1, 2])
def test_an_svd_that_fails_to_converge_is_retried(monkeypatch, failures):
    # gesdd failed to converge on a well-conditioned 1024×1024 matrix (torch's
    # float32 SVD at 2 threads): retried in float64, then by gesvd
    a = torch.randn(70, 50, generator=torch.Generator().manual_seed(4))
    real, calls = _svd._gesdd, []

    def flaky(matrix):
        calls.append(matrix.dtype)
        if len(calls) <= failures:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(matrix)

    monkeypatch.setattr(_svd, "_gesdd", flaky)
    u, s, vh = _svd._full_svd(a)
    assert calls == [torch.float32, torch.float64][:min(failures + 1, 2)]
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    torch.testing.assert_close(s, torch.linalg.svdvals(a.double()).float())
    torch.testing.assert_close((u * s) @ vh, a, atol=1e-5, rtol=0)
    torch.testing.assert_close(u.T @ u, torch.eye(50), atol=1e-5, rtol=0)


def test_opcm_and_dop_survive_an_svd_that_fails_to_converge(monkeypatch):
    from cl_merge.merging.dop import principal_subspace
    from cl_merge.merging.opcm import project_task_matrix

    gen = torch.Generator().manual_seed(5)
    merged, task = torch.randn(40, 30, generator=gen), torch.randn(40, 30, generator=gen)
    want_opcm, want_dop = project_task_matrix(merged, task, 0.5), principal_subspace(task, 0.9)
    real = torch.linalg.svd

    def fails_in_float32(matrix, *args, **kwargs):
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", fails_in_float32)
    got_opcm, got_dop = project_task_matrix(merged, task, 0.5), principal_subspace(task, 0.9)
    assert got_opcm.dtype == torch.float32
    torch.testing.assert_close(got_opcm, want_opcm, atol=1e-5, rtol=0)
    assert got_dop[0].shape == want_dop[0].shape
    torch.testing.assert_close(got_dop[1], want_dop[1])
    # singular vectors up to sign
    torch.testing.assert_close((got_dop[0] * want_dop[0]).sum(0).abs(), torch.ones(got_dop[0].shape[1]))


def test_gil_free_calls_check_scipys_signature():
    with pytest.raises(RuntimeError, match="dsyrk has an unexpected signature"):
        _lapack._routine("blas", "dsyrk", 9)
