"""Exact k-th largest magnitude without sorting: radix selection over the
float32 bit patterns of |x|.

Non-negative IEEE-754 floats order exactly like their bit patterns read as
int32, so the k-th largest |x| is found with two counting passes: a histogram
of the high 16 bits (sign, exponent, 7 mantissa bits) picks the bucket that
holds the k-th value, and a histogram of the low 16 bits of the entries in
that bucket pins the exact value. Each pass is one ``bincount`` per tensor;
nothing of the size of the model is kept beyond one tensor at a time, which
is what makes a *global* top-k (TIES over the whole flattened model) cheap.

Entries equal to the threshold are all kept by ``|x| >= threshold``, so a
tie at the threshold keeps more than k entries (never fewer).
``kth_largest_in_tensor`` serves per-tensor selections and uses
``torch.kthvalue`` for small tensors (same exact value, less overhead).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

Tensor = torch.Tensor

_HIGH_BINS = 1 << 15  # |x| has a zero sign bit: high half is < 2**15
_LOW_BINS = 1 << 16


def keep_count(fraction: float, n: int) -> int:
    """⌊fraction·n⌋, at least 1 (the count a density keeps; the tiny tolerance
    makes 0.29·100 keep 29 although 0.29*100 is 28.999… in binary)."""
    return max(1, min(n, int(math.floor(fraction * n + 1e-6))))


def magnitude_bits(tensor: Tensor) -> Tensor:
    """int32 view of |x| (float32), flattened."""
    return tensor.detach().reshape(-1).to(torch.float32).abs().view(torch.int32)


def _high_histogram(bits: Tensor) -> Tensor:
    return torch.bincount(bits >> 16, minlength=_HIGH_BINS)


def _pick(hist: Tensor, k: int) -> tuple[int, int]:
    """Bin holding the k-th largest (1-based) element and how many elements of
    that bin are still needed (1..count of the bin)."""
    from_top = torch.flip(hist, [0]).cumsum(0)  # from_top[i]: elements in the top i+1 bins
    idx = int(torch.searchsorted(from_top, torch.tensor([k], dtype=from_top.dtype))[0])
    above = int(from_top[idx - 1]) if idx > 0 else 0
    return hist.numel() - 1 - idx, k - above


class KthLargestMagnitude:
    """Two-pass selection of the k-th largest |x| over a collection of tensors
    fed in chunks (``feed_high`` for every chunk, then ``feed_low`` for every
    chunk, in any order), e.g. all entries of one task vector."""

    def __init__(self, k: int):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.count = 0
        self._high = torch.zeros(_HIGH_BINS, dtype=torch.int64)
        self._low = torch.zeros(_LOW_BINS, dtype=torch.int64)
        self._bucket: int | None = None
        self._needed = 0

    def feed_high(self, tensor: Tensor) -> None:
        bits = magnitude_bits(tensor)
        self.count += bits.numel()
        self._high += _high_histogram(bits)

    def _select_bucket(self) -> None:
        if self._bucket is None:
            if self.k > self.count:
                raise ValueError(f"asked for the {self.k}-th largest of {self.count} entries")
            self._bucket, self._needed = _pick(self._high, self.k)

    def feed_low(self, tensor: Tensor) -> None:
        self._select_bucket()
        bits = magnitude_bits(tensor)
        in_bucket = bits[(bits >> 16) == self._bucket]
        if in_bucket.numel():
            self._low += torch.bincount(in_bucket & 0xFFFF, minlength=_LOW_BINS)

    def threshold(self) -> float:
        """The k-th largest |x| (exact float32 value)."""
        self._select_bucket()
        low, _ = _pick(self._low, self._needed)
        bits = torch.tensor([(self._bucket << 16) | low], dtype=torch.int32)
        return float(bits.view(torch.float32)[0])


def kth_largest_magnitude(tensors: Iterable[Tensor] | Callable[[], Iterable[Tensor]], k: int) -> float:
    """k-th largest |x| over ``tensors``. Pass a callable returning a fresh
    iterable to stream large collections twice instead of holding them."""
    make = tensors if callable(tensors) else (lambda items=list(tensors): items)
    selector = KthLargestMagnitude(k)
    for t in make():
        selector.feed_high(t)
    for t in make():
        selector.feed_low(t)
    return selector.threshold()


# below this size a partial sort is cheaper than two 32k/64k-bin histograms
_SMALL = 1 << 16


def kth_largest_in_tensor(tensor: Tensor, k: int) -> float:
    """k-th largest |x| of one tensor (exact; same value as the radix path)."""
    n = tensor.numel()
    if not 1 <= k <= n:
        raise ValueError(f"asked for the {k}-th largest of {n} entries")
    if n <= _SMALL:
        magnitude = tensor.detach().reshape(-1).to(torch.float32).abs()
        return float(torch.kthvalue(magnitude, n - k + 1).values)
    return kth_largest_magnitude([tensor], k)
