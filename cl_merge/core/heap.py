"""Handing freed C heap memory back to the OS."""

from __future__ import annotations

_malloc_trim = None


def release_freed_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc's ``malloc_trim``; a
    no-op elsewhere).

    Why: glibc keeps the memory that large temporaries free inside the
    process, and where their sizes vary the heap grows with fragmentation
    although nothing stays live. A CPU evaluation of 224-px batches grew by
    ~4 MB per batch (400 MB over a 10,000-image test set in
    ``scripts/bench_data.py``); DARE-TIES' per-tensor draws grew the heap to
    three model copies. A trim costs well under a millisecond here.
    """
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes

        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (AttributeError, OSError):  # not glibc
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)
