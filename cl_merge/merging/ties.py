"""TIES-Merging: trim, elect sign, disjoint merge."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cl_merge.merging import _placement
from cl_merge.merging._topk import (
    SAMPLE_STRIDE,
    BracketedKth,
    KthLargestMagnitude,
    keep_count,
    kth_largest_in_tensor,
    sample_magnitudes,
)
from cl_merge.merging.base import MergeMethod, TensorStream, check_fraction, require
from cl_merge.merging.registry import register

Tensor = torch.Tensor

TOPK_SCOPES = ("global", "per_tensor")
AGGREGATES = ("mean", "sum")


# ----------------------------------------------------------------- the TIES steps as functions
STATE_FIELDS = ("pos_sum", "neg_sum", "pos_count", "neg_count")


def empty_sign_state(like: Tensor) -> dict[str, Tensor]:
    """Per-entry running mass and count of positive and negative trimmed values:
    enough to elect the sign and take the disjoint mean/sum, whatever T."""
    return {name: torch.zeros_like(like) for name in STATE_FIELDS}


def fold_trimmed_(state: dict[str, Tensor], delta: Tensor, threshold: float,
                  mask: Tensor | None = None) -> dict[str, Tensor]:
    """Trim ``delta`` (keep |τ| >= threshold, the k-th largest |τ|) and add it to
    ``state`` in place: per sign one comparison into a 0/1 float mask and one
    fused multiply-add (``addcmul``; the product by 0 or 1 is exact, so this
    equals adding the masked values). Float masks, not bool: bool tensors
    take ~5× longer per element in these kernels. ``mask``: scratch of
    ``delta``'s shape to reuse."""
    mask = torch.empty_like(delta) if mask is None else mask
    # with threshold > 0 a kept value is non-zero and its sign picks the side;
    # with threshold 0 everything is kept and zeros belong to neither side
    counts = "pos_count" in state  # a disjoint *sum* needs no counts
    if threshold > 0:
        torch.ge(delta, threshold, out=mask)
    else:
        torch.gt(delta, 0, out=mask)
    if counts:
        state["pos_count"].add_(mask)
    state["pos_sum"].addcmul_(delta, mask)
    if threshold > 0:
        torch.le(delta, -threshold, out=mask)
    else:
        torch.lt(delta, 0, out=mask)
    if counts:
        state["neg_count"].add_(mask)
    state["neg_sum"].addcmul_(delta, mask)
    return state


def disjoint_merge(state: dict[str, Tensor], aggregate: str, out: Tensor | None = None,
                   scratch: Tensor | None = None) -> Tensor:
    """Elected sign = sign(Σ_t trimmed τ_t) = sign(pos_sum + neg_sum); merge the
    entries that agree with it. A zero total elects sign 0 (the paper's sgn):
    no task agrees and the merged entry is 0.

    As ``pos·[total > 0] + neg·[total < 0]`` with 0/1 float masks: the same
    values as a nested ``torch.where`` (a product by 1 is exact, one by 0
    adds ±0), at a fraction of its cost; the state is left as it was."""
    pos_sum, neg_sum = state["pos_sum"], state["neg_sum"]
    total = torch.add(pos_sum, neg_sum)
    mask = torch.empty_like(total) if scratch is None else scratch
    if aggregate == "mean":
        # where the total is > 0 at least one positive value exists (count >= 1)
        pos = pos_sum / state["pos_count"].clamp(min=1)
        neg = neg_sum / state["neg_count"].clamp(min=1)
    else:
        pos, neg = pos_sum, neg_sum
    merged = torch.mul(pos, torch.gt(total, 0, out=mask), out=out)
    return merged.addcmul_(neg, torch.lt(total, 0, out=mask))


class _TaskThreshold:
    """Global threshold of one task vector, computed on first use (incremental
    form: the task index, needed by DARE's masks, is only known then)."""

    def __init__(self, stream: TensorStream):
        self.stream = stream
        self.value: float | None = None


# ----------------------------------------------------------------- the strategy
@register
@dataclass
class Ties(MergeMethod):
    """TIES-Merging: θ = θ0 + scaling · disjoint_merge(elect(trim(τ_1..τ_T))).

    Yadav et al., "TIES-Merging: Resolving Interference When Merging Models",
    NeurIPS 2023 (https://arxiv.org/abs/2306.01708).

    1. Trim: keep each τ_t's top-``density`` entries by magnitude. The count
       is k = max(1, ⌊density·n⌋); the threshold is the exact k-th largest
       |τ_t| (no sort: a 1/61 strided sample brackets it and one counting
       pass pins it, radix selection if the bracket misses; see
       ``cl_merge.merging._topk``) and every entry with |τ_t| >= it is
       kept, so ties *at* the threshold are all kept (k or more entries).
       The authors' code uses the same ``>=`` rule but with the k-th smallest
       of the complement, which keeps ⌊density·n⌋ + 1 entries (FusionBench
       inherits that); mergekit keeps exactly k per tensor, breaking ties
       arbitrarily.
       ``topk_scope="global"`` (default, the authors' code and FusionBench):
       one top-k per task over the whole flattened model, LayerNorms and
       biases in the same pool. ``"per_tensor"``: one top-k inside each
       tensor (mergekit).
    2. Elect: γ = sign(Σ_t trimmed τ_t) per entry (the paper's total-mass
       sign). A sum of exactly 0 elects 0 and the entry merges to 0, as in
       the paper's sgn; FusionBench instead takes the model-wide majority
       sign and mergekit takes +1.
    3. Disjoint merge over the tasks whose trimmed value has sign γ:
       ``aggregate="mean"`` (the paper) or ``"sum"`` (FusionBench's default).

    Defaults: density 0.2 and scaling 1.0 are the paper's recommendation
    without a validation set (it tunes λ on validation data otherwise);
    FusionBench's ViT-B/32 result (72.2) uses ``aggregate="sum"``,
    ``scaling=0.3``.

    Incremental: yes. Each task's global threshold depends on that task alone,
    and the running state is four tensors per entry (positive and negative
    sums and counts), constant in T; the batch form folds the same state, so
    both give identical results.
    """

    name = "ties"
    reference = "https://arxiv.org/abs/2306.01708"
    incremental = True

    density: float = 0.2
    scaling: float = 1.0
    topk_scope: str = "global"
    aggregate: str = "mean"

    def validate(self) -> None:
        check_fraction("density", self.density, method=self.name)
        require(self.topk_scope in TOPK_SCOPES,
                f"{self.name}: topk_scope must be one of {', '.join(TOPK_SCOPES)}, got {self.topk_scope!r}")
        require(self.aggregate in AGGREGATES,
                f"{self.name}: aggregate must be one of {', '.join(AGGREGATES)}, got {self.aggregate!r}")
        # with the thresholds fixed in prepare() the merge is entry-wise: the
        # engine then feeds cache-sized chunks (DARE's drop draws per tensor),
        # and the inputs come as fine-tuned weights: τ_t is formed chunk by
        # chunk in cache instead of as a whole tensor per model
        self.elementwise = self._plain_trim() and (self.topk_scope == "global" or self.density >= 1)
        self.uses_weights = self._plain_trim()

    # -- hook for variants that transform τ before trimming (DARE-TIES)
    def transform_delta(self, key: str, delta: Tensor, task_index: int) -> Tensor:
        return delta

    # -- thresholds
    def _plain_trim(self) -> bool:
        """No transform before trimming (TIES itself, not DARE-TIES)."""
        return type(self).transform_delta is Ties.transform_delta

    def _sample(self, stream: TensorStream, key: str, task_offset: int) -> list[Tensor]:
        """Strided sample of |τ_t| of one entry, for every task. Plain TIES
        samples the sources directly (the subtraction runs on 1/61 of the
        entries); a transform (DARE's drop) needs the whole τ_t."""
        if not self._plain_trim():
            _base, deltas = stream.load(key)
            return [sample_magnitudes(self.transform_delta(key, d, task_offset + i)) for i, d in enumerate(deltas)]
        base = stream.pretrained.get(key).detach().reshape(-1)[::SAMPLE_STRIDE].to(torch.float32)
        out = []
        for model in stream.finetuned:
            value = model.get(key).detach().reshape(-1)[::SAMPLE_STRIDE].to(torch.float32)
            out.append((value if stream.deltas_given else value - base).abs())
        return out

    def _global_thresholds(self, stream: TensorStream, task_offset: int = 0) -> list[float]:
        """Exact k-th largest |τ_t| over the whole model, for every task in the
        stream: a strided sample brackets it, one counting pass pins it
        (``BracketedKth``); tasks whose bracket missed get the two radix
        passes. One tensor at a time; the sample is 1/61 of a model per task."""
        total = sum(_numel(stream.shape(key)) for key in stream.keys)
        k = keep_count(self.density, total)
        num = stream.num_models
        samples: list[list[Tensor]] = [[] for _ in range(num)]
        for key in stream.keys:
            for i, sample in enumerate(self._sample(stream, key, task_offset)):
                samples[i].append(sample)
        selectors = [BracketedKth(torch.cat(parts), k, total) for parts in samples]
        del samples
        weights = stream.raw_weights  # the stream yields θ_t: τ_t is formed chunk by chunk
        scratch = None
        for key, base, inputs in stream:
            flat_base = base.reshape(-1)
            for i, value in enumerate(inputs):
                flat = (value if weights else self.transform_delta(key, value, task_offset + i)).reshape(-1)
                for start in range(0, flat.numel(), _PASS_CHUNK):
                    part = flat[start:start + _PASS_CHUNK]
                    if scratch is None or scratch.numel() < part.numel() or scratch.dtype != part.dtype \
                            or scratch.device != part.device:
                        scratch = torch.empty(_PASS_CHUNK, dtype=part.dtype, device=part.device)
                    magnitude = scratch[:part.numel()]
                    if weights:
                        torch.sub(part, flat_base[start:start + _PASS_CHUNK], out=magnitude).abs_()
                    else:
                        torch.abs(part, out=magnitude)
                    selectors[i].feed(magnitude)
        thresholds = [s.threshold() for s in selectors]
        missed = [i for i, t in enumerate(thresholds) if t is None]
        if missed:
            radix = [KthLargestMagnitude(k) for _ in missed]
            for feed in ("feed_high", "feed_low"):
                for key, base, inputs in stream:
                    for r, i in zip(radix, missed):
                        delta = inputs[i] - base if weights else inputs[i]
                        getattr(r, feed)(self.transform_delta(key, delta, task_offset + i))
            for r, i in zip(radix, missed):
                thresholds[i] = r.threshold()
        return thresholds

    def _fold(self, state, key: str, delta: Tensor, task_index: int, threshold: float | None):
        """Transform (DARE), trim and fold one task vector into ``state`` in place."""
        delta = self.transform_delta(key, delta, task_index)
        if delta.numel() == 0:
            return state  # nothing to trim (an empty tensor)
        if threshold is None:  # per tensor
            threshold = kth_largest_in_tensor(delta, keep_count(self.density, delta.numel()))
        return fold_trimmed_(state, delta, threshold)

    # -- batch form
    def prepare(self, stream: TensorStream) -> Any:
        if self.topk_scope == "global" and self.density < 1:
            return self._global_thresholds(stream)
        return None

    def _threshold_for(self, context, index: int) -> float | None:
        if self.density >= 1:
            return 0.0  # keep everything
        return context[index] if self.topk_scope == "global" else None

    def merge_tensor(self, key, base, deltas, context):
        if self.uses_weights:  # fine-tuned weights, not task vectors
            weights = deltas
            thresholds = [self._threshold_for(context, i) for i in range(len(weights))]
            if None in thresholds and base.numel():  # per tensor: a counting pass over each τ_t
                thresholds = [kth_largest_in_tensor(w, keep_count(self.density, w.numel()), minus=base)
                              for w in weights]
            out = torch.empty_like(base)
            flat_out, flat_base = out.view(-1), base.reshape(-1)
            flat = [w.reshape(-1) for w in weights]
            # on the CPU in cache-sized chunks (one chunk elsewhere)
            step = self.into_chunk if _placement.host_kernels(base) else max(1, base.numel())
            for start in range(0, base.numel(), step):
                part = slice(start, start + step)
                self._fold_into(flat_out[part], flat_base[part], [w[part] for w in flat], thresholds)
            return out
        thresholds = [self._threshold_for(context, i) for i in range(len(deltas))]
        if None in thresholds and base.numel() > _FOLD_CHUNK and _placement.host_kernels(base):
            # per-tensor top-k: thresholds first (they need the whole tensor),
            # then the fold in cache-sized chunks, as the engine does for
            # entry-wise merges
            deltas = [self.transform_delta(key, d, i) for i, d in enumerate(deltas)]
            thresholds = [kth_largest_in_tensor(d, keep_count(self.density, d.numel())) for d in deltas]
            flat = [d.reshape(-1) for d in deltas]
            flat_base = base.reshape(-1)
            out = torch.empty_like(flat_base)
            for start in range(0, flat_base.numel(), _FOLD_CHUNK):
                part = slice(start, start + _FOLD_CHUNK)
                out[part] = self._merge_trimmed(flat_base[part], [(d[part], t) for d, t in zip(flat, thresholds)])
            return out.view(base.shape)
        trimmed = []
        for i, delta in enumerate(deltas):
            delta = self.transform_delta(key, delta, i)
            if delta.numel() == 0:
                continue  # nothing to trim (an empty tensor)
            threshold = thresholds[i]
            if threshold is None:  # per tensor
                threshold = kth_largest_in_tensor(delta, keep_count(self.density, delta.numel()))
            trimmed.append((delta, threshold))
        return self._merge_trimmed(base, trimmed)

    def merge_tensor_into(self, out, key, base, weights, context):
        """The entry-wise form (global thresholds): ``weights`` are the
        fine-tuned chunks (``uses_weights``); each τ_t is formed in one
        scratch chunk and folded, then the disjoint merge is written into ``out``."""
        if not self.uses_weights:
            return super().merge_tensor_into(out, key, base, weights, context)
        self._fold_into(out, base, weights, [self._threshold_for(context, i) for i in range(len(weights))])

    def _fold_into(self, out: Tensor, base: Tensor, weights: list[Tensor], thresholds: list[float]) -> None:
        """θ0 + scaling · disjoint merge of the trimmed τ_t = θ_t − θ0, into ``out``."""
        state = empty_sign_state(base)
        if self.aggregate == "sum":  # the counts only serve the disjoint mean
            del state["pos_count"], state["neg_count"]
        delta, mask = torch.empty_like(base), torch.empty_like(base)
        if delta.numel():
            for weight, threshold in zip(weights, thresholds):
                fold_trimmed_(state, torch.sub(weight, base, out=delta), threshold, mask)
        disjoint_merge(state, self.aggregate, out=out, scratch=mask).mul_(self.scaling).add_(base)

    def _merge_trimmed(self, base: Tensor, trimmed: list[tuple[Tensor, float]]) -> Tensor:
        """θ0 + scaling · disjoint merge of the (τ_t, threshold_t) pairs."""
        state = empty_sign_state(base)
        if self.aggregate == "sum":  # the counts only serve the disjoint mean
            del state["pos_count"], state["neg_count"]
        for delta, threshold in trimmed:
            fold_trimmed_(state, delta, threshold)
        return base + self.scaling * disjoint_merge(state, self.aggregate)

    # -- incremental form
    def prepare_task(self, stream: TensorStream) -> Any:
        return _TaskThreshold(stream)

    def init_state(self, key, base):
        return empty_sign_state(base)

    def update_state(self, key, base, state, delta, num_seen, task_context):
        threshold: float | None
        if self.density >= 1:
            threshold = 0.0
        elif self.topk_scope == "global":
            if task_context.value is None:
                task_context.value = self._global_thresholds(task_context.stream, task_offset=num_seen)[0]
            threshold = task_context.value
        else:
            threshold = None
        # fresh tensors: the state may be the caller's (restored from a file)
        state = {name: tensor.clone() for name, tensor in state.items()}
        return self._fold(state, key, delta, num_seen, threshold)

    def state_weights(self, key, base, state, num_seen):
        return base + self.scaling * disjoint_merge(state, self.aggregate)


    # the engine's chunk for merge_tensor_into: state (2-4), τ and mask
    # chunks of 256 KiB each stay in L2
    into_chunk = 1 << 16


_PASS_CHUNK = 1 << 18  # entries per chunk of the counting pass (1 MiB of float32)
_FOLD_CHUNK = 1 << 16  # entries per chunk of a per-tensor fold (state and inputs stay in cache)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
