"""Unpickling restricted to plain containers and numpy arrays.

CIFAR's python batches and Animal-MNIST's data files are pickles. A pickle can
name any callable, so loading one with :mod:`pickle` can run code; this
unpickler resolves only the globals that numpy arrays need and refuses
everything else, so a tampered file fails instead of executing.
"""

from __future__ import annotations

import importlib
import io
import pickle

import numpy as np

from cl_merge.errors import DataError

# What a numpy array (and its dtype) pickles to; numpy 2 renamed numpy.core to numpy._core.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}
_CORE = "numpy._core" if hasattr(np, "_core") else "numpy.core"


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, *, source: str):
        super().__init__(file, encoding="latin1")  # CIFAR batches were written by Python 2
        self._source = source

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise DataError(
                f"{self._source}: refusing to unpickle {module}.{name} "
                "(only numpy arrays and builtin containers are allowed)"
            )
        module = module.replace("numpy._core", _CORE).replace("numpy.core", _CORE)
        return getattr(importlib.import_module(module), name)


def safe_load(data: bytes, *, source: str):
    """Unpickle ``data`` allowing only numpy arrays, dtypes and builtin containers."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), source=source).load()
    except DataError:
        raise
    except Exception as exc:  # truncated or corrupt file
        raise DataError(f"{source}: cannot read pickle ({type(exc).__name__}: {exc})") from None
