"""BLAS ``?syrk`` and LAPACK ``?syevr`` called without holding the GIL.

Why: the SVD family decomposes every task's matrix separately, and those
decompositions can run side by side on a machine's cores. scipy's Python
wrappers of these routines (``scipy.linalg.blas``, ``scipy.linalg.eigh``)
hold the GIL for the whole call, so two threads calling them take as long
as one (measured: 1.0× for ``dsyrk``, 1.03× for ``dsyevr`` on two cores).
scipy also exports the same routines, from the same OpenBLAS, as C function
pointers for Cython (``scipy.linalg.cython_blas``/``cython_lapack``); a ctypes
call of such a pointer releases the GIL. The arguments, the workspace query
and the Fortran layout are scipy's own, so the results are bit for bit those
of ``scipy.linalg.blas.?syrk`` and ``scipy.linalg.eigh(driver="evr")``
(tested). No code is loaded from anywhere but scipy's installed modules.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

_C_TYPES = {np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}
_PREFIX = {np.dtype(np.float32): "s", np.dtype(np.float64): "d"}


@functools.cache
def _routine(library: str, name: str, num_args: int):
    """The C function ``name`` of scipy.linalg.cython_<library>, every
    argument a pointer (Fortran convention)."""
    if library == "blas":
        from scipy.linalg import cython_blas as module
    else:
        from scipy.linalg import cython_lapack as module
    capsule = module.__pyx_capi__[name]
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    signature = get_name(capsule)
    # the Cython signature names every argument: check their number and that
    # integers are C ints (a 64-bit-integer build would be misread)
    text = signature.decode()
    arguments = text[text.index("(") + 1:text.rindex(")")].split(",")
    if len(arguments) != num_args or not all(a.strip() == "int *" for a in arguments if "int" in a):
        raise RuntimeError(f"scipy.linalg.cython_{library}.{name} has an unexpected signature: {text}")
    address = get_pointer(capsule, signature)
    # CFUNCTYPE (not PYFUNCTYPE): ctypes releases the GIL for the call
    return ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * num_args))(address)


def _int(value: int):
    return ctypes.byref(ctypes.c_int(value))


def _char(value: str):
    return ctypes.c_char_p(value.encode())


def _ptr(array: np.ndarray):
    return ctypes.c_void_p(array.ctypes.data)


def syrk_lower(a: np.ndarray, wide: bool) -> np.ndarray:
    """The lower triangle of AᵀA (or AAᵀ with ``wide``) of a C-contiguous
    float32/float64 matrix A, as a Fortran-ordered array (the upper triangle
    is left zero), as ``scipy.linalg.blas.?syrk(1.0, A.T, trans=wide, lower=1)``."""
    if a.dtype not in _C_TYPES or not a.flags.c_contiguous:
        raise ValueError(f"syrk_lower needs a C-contiguous float32/float64 matrix, got {a.dtype}")
    rows, cols = a.shape
    # A's memory read in Fortran order is Aᵀ (cols × rows, leading dimension cols)
    size, depth = (rows, cols) if wide else (cols, rows)
    out = np.zeros((size, size), dtype=a.dtype, order="F")
    scalar = _C_TYPES[a.dtype]
    _routine("blas", _PREFIX[a.dtype] + "syrk", 10)(
        _char("L"), _char("T" if wide else "N"), _int(size), _int(depth), ctypes.byref(scalar(1.0)),
        _ptr(a), _int(max(1, cols)), ctypes.byref(scalar(0.0)), _ptr(out), _int(max(1, size)))
    return out


def syevr_leading(gram: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` largest eigenvalues (ascending) and their eigenvectors of
    a symmetric matrix given by the lower triangle of a Fortran-ordered
    array, which is overwritten: MRRR (``?syevr``, range by index), as
    ``scipy.linalg.eigh(gram, lower=True, driver="evr",
    subset_by_index=[n - count, n - 1], overwrite_a=True)``."""
    if gram.dtype not in _C_TYPES or not gram.flags.f_contiguous or not gram.flags.writeable:
        raise ValueError("syevr_leading needs a writeable Fortran-ordered float32/float64 matrix")
    size = gram.shape[0]
    if not 1 <= count <= size:
        raise ValueError(f"syevr_leading: count {count} outside 1..{size}")
    routine = _routine("lapack", _PREFIX[gram.dtype] + "syevr", 21)
    scalar = _C_TYPES[gram.dtype]
    values = np.zeros(size, dtype=gram.dtype)
    vectors = np.zeros((size, count), dtype=gram.dtype, order="F")
    support = np.zeros(2 * max(1, count), dtype=np.intc)
    found, info = ctypes.c_int(0), ctypes.c_int(0)

    def call(work, lwork, iwork, liwork):
        routine(_char("V"), _char("I"), _char("L"), _int(size), _ptr(gram), _int(max(1, size)),
                ctypes.byref(scalar(0.0)), ctypes.byref(scalar(1.0)), _int(size - count + 1), _int(size),
                ctypes.byref(scalar(0.0)), ctypes.byref(found), _ptr(values), _ptr(vectors), _int(max(1, size)),
                _ptr(support), _ptr(work), _int(lwork), _ptr(iwork), _int(liwork), ctypes.byref(info))

    # workspace query, then the call, with the sizes scipy's eigh would use
    work, iwork = np.zeros(1, dtype=gram.dtype), np.zeros(1, dtype=np.intc)
    call(work, -1, iwork, -1)
    lwork, liwork = _workspace_size(work[0], gram.dtype), int(iwork[0])
    call(np.zeros(lwork, dtype=gram.dtype), lwork, np.zeros(liwork, dtype=np.intc), liwork)
    if info.value != 0:
        raise np.linalg.LinAlgError(f"?syevr failed (info={info.value})")
    return values[:found.value].copy(), vectors[:, :found.value]


def _workspace_size(value: float, dtype: np.dtype) -> int:
    """scipy's ``_compute_lwork`` rounding of a queried workspace size: up
    to the next value its float type represents (a float32 query may round
    below the true integer)."""
    size = int(value)
    if np.dtype(dtype) == np.float32:
        size = int(np.nextafter(np.float32(value), np.float32(np.inf)))
    return max(1, size)
