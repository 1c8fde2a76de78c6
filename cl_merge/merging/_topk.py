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

``BracketedKth`` needs one full pass instead of two: a strided sample
(1/61 of the entries) brackets the k-th largest between two sample order
statistics ~8 standard deviations of the rank apart; the full pass then
counts the entries above the bracket and collects the few inside it
(≈0.5% of them), and the exact value is the right order statistic of those.
Should the bracket miss (an 8-sigma event, or a sample that is not
representative), the caller falls back to the radix passes: the result is
always the exact k-th largest.
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
        self._high += _high_histogram(bits).cpu()

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
            self._low += torch.bincount(in_bucket & 0xFFFF, minlength=_LOW_BINS).cpu()

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


SAMPLE_STRIDE = 61  # prime: no alignment with row lengths of weight matrices


def sample_magnitudes(tensor: Tensor, stride: int = SAMPLE_STRIDE) -> Tensor:
    """|x| of every ``stride``-th entry (float32, flattened, a fresh tensor)."""
    return tensor.detach().reshape(-1)[::stride].to(torch.float32).abs()


class BracketedKth:
    """Exact k-th largest |x| of ``n`` entries from a sample of them plus one
    counting pass (see the module docstring). ``feed`` every chunk once,
    then ``threshold()`` returns the value, or None when the bracket missed."""

    def __init__(self, sample: Tensor, k: int, n: int):
        if not 1 <= k <= n:
            raise ValueError(f"asked for the {k}-th largest of {n} entries")
        self.k = k
        s = sample.numel()
        expected = k * s / n  # rank of the k-th largest within the sample
        margin = 8.0 * math.sqrt(max(expected * (1 - expected / max(s, 1)), 1.0)) + 16
        hi_rank, lo_rank = int(math.floor(expected - margin)), int(math.ceil(expected + margin))
        sample = sample.float()  # two order statistics: selection, not a sort
        self.hi = float(torch.kthvalue(sample, s - hi_rank + 1).values) if hi_rank >= 1 else math.inf
        self.lo = float(torch.kthvalue(sample, s - lo_rank + 1).values) if lo_rank <= s else 0.0
        self.above = 0
        self._inside: list[Tensor] = []
        self._buffers: tuple[Tensor, Tensor] | None = None

    def feed(self, magnitude: Tensor) -> None:
        """``magnitude``: |x| of a chunk. Comparisons go into 0/1 float
        buffers (bool kernels are several times slower per element)."""
        if self._buffers is None or self._buffers[0].shape != magnitude.shape \
                or self._buffers[0].dtype != magnitude.dtype or self._buffers[0].device != magnitude.device:
            self._buffers = (torch.empty_like(magnitude), torch.empty_like(magnitude))
        low, high = self._buffers
        if self.hi < math.inf:
            self.above += int(torch.gt(magnitude, self.hi, out=high).sum())
        torch.ge(magnitude, self.lo, out=low).mul_(torch.le(magnitude, self.hi, out=high))
        self._inside.append(magnitude[low.bool()])

    def threshold(self) -> float | None:
        inside = torch.cat(self._inside).float().cpu() if self._inside else torch.zeros(0)
        need = self.k - self.above
        if not 1 <= need <= inside.numel():
            return None
        return float(torch.kthvalue(inside, inside.numel() - need + 1).values)


# below this size a partial sort is cheaper than two 32k/64k-bin histograms
_SMALL = 1 << 16


_FEED_CHUNK = 1 << 18  # entries per chunk of a counting pass (1 MiB of float32: stays in cache)


def kth_largest_in_tensor(tensor: Tensor, k: int, minus: Tensor | None = None) -> float:
    """k-th largest |x| of one tensor, or of ``tensor − minus`` (a task vector
    from fine-tuned and pretrained weights, formed chunk by chunk in cache
    instead of as a whole tensor). Exact; same value as the radix path."""
    n = tensor.numel()
    if not 1 <= k <= n:
        raise ValueError(f"asked for the {k}-th largest of {n} entries")
    flat = tensor.detach().reshape(-1)
    flat_minus = None if minus is None else minus.detach().reshape(-1)
    if n <= _SMALL:
        values = flat if flat_minus is None else flat - flat_minus
        return float(torch.kthvalue(values.to(torch.float32).abs(), n - k + 1).values)
    sample = flat[::SAMPLE_STRIDE] if flat_minus is None else flat[::SAMPLE_STRIDE] - flat_minus[::SAMPLE_STRIDE]
    selector = BracketedKth(sample.to(torch.float32).abs(), k, n)
    scratch = torch.empty(min(n, _FEED_CHUNK), dtype=torch.float32, device=flat.device)
    for start in range(0, n, _FEED_CHUNK):
        part = slice(start, start + _FEED_CHUNK)
        values = flat[part] if flat_minus is None else flat[part] - flat_minus[part]
        magnitude = scratch[:values.numel()]
        torch.abs(values.to(torch.float32), out=magnitude)
        selector.feed(magnitude)
    found = selector.threshold()
    if found is not None:
        return found
    return kth_largest_magnitude([flat if flat_minus is None else flat - flat_minus], k)
