"""Unpickling restricted to plain containers and numpy arrays.

CIFAR's python batches and Animal-MNIST's data files are pickles. A pickle can
name any callable, so loading one with :mod:`pickle` can run code; this
unpickler resolves only the few globals that numpy arrays need and refuses
everything else, so a tampered file fails instead of executing.
"""

from __future__ import annotations

import io
import pickle

import numpy as np

from cl_merge.errors import DataError

# (module, name) pairs a numpy array (and its dtype) pickles to, across numpy 1.x and 2.x.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): np.core.multiarray._reconstruct
    if hasattr(np, "core")
    else None,
    ("numpy._core.multiarray", "_reconstruct"): None,
    ("numpy.core.multiarray", "scalar"): None,
    ("numpy._core.multiarray", "scalar"): None,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


def _resolve(module: str, name: str):
    # numpy 2 moved numpy.core to numpy._core; both spellings map to the live module.
    if name == "_reconstruct":
        from numpy.lib import format as _unused  # noqa: F401  (ensures numpy is fully imported)

        return np.ndarray.__reduce__  # placeholder replaced below
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, *, source: str):
        super().__init__(file, encoding="latin1")
        self._source = source

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise DataError(
                f"{self._source}: refusing to unpickle {module}.{name} "
                "(only numpy arrays and plain containers are allowed)"
            )
        mod = module.replace("numpy._core", "numpy.core") if not hasattr(np, "_core") else module.replace(
            "numpy.core", "numpy._core"
        )
        import importlib

        return getattr(importlib.import_module(mod), name)


def safe_load(data: bytes, *, source: str):
    """Unpickle ``data`` allowing only numpy arrays, dtypes and builtin containers."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), source=source).load()
    except DataError:
        raise
    except Exception as exc:  # truncated or corrupt files
        raise DataError(f"{source}: cannot read pickle ({type(exc).__name__}: {exc})") from None
