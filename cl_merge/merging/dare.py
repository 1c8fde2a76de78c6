"""DARE (drop and rescale) before task arithmetic or TIES."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from cl_merge.core.heap import release_freed_heap
from cl_merge.merging.base import MergeMethod, require
from cl_merge.merging.registry import register
from cl_merge.merging.ties import Ties

Tensor = torch.Tensor


def dare_generator(seed: int, task_index: int, key: str) -> torch.Generator:
    """Generator seeded from (seed, task index, key) by a stable hash: the
    mask of an entry does not depend on the order or the grouping in which
    entries and tasks are streamed (batch, streaming and incremental agree)."""
    digest = hashlib.blake2b(f"{seed}\x00{task_index}\x00{key}".encode(), digest_size=8).digest()
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return generator


def drop_and_rescale(delta: Tensor, drop_rate: float, seed: int, task_index: int, key: str) -> Tensor:
    """Zero each entry with probability ``drop_rate``; divide the kept ones by
    (1 − drop_rate), so that E[result] = delta."""
    if drop_rate == 0:
        return delta
    # drawn on the CPU whatever the merge's device: the same masks everywhere
    uniform = torch.rand(delta.shape, generator=dare_generator(seed, task_index, key), dtype=torch.float32)
    kept = (uniform >= drop_rate).to(delta.device)
    return torch.where(kept, delta / (1.0 - drop_rate), 0.0)


TRIM_EVERY_BYTES = 256 * 2**20  # of DARE draws between two heap trims (DARE-TIES)
_drawn_since_trim = 0


def check_drop_rate(method: str, drop_rate: float) -> None:
    require(0 <= drop_rate < 1,
            f"{method}: drop_rate must be in [0, 1), got {drop_rate!r}")


def check_seed(method: str, seed: int) -> None:
    require(seed >= 0,
            f"{method}: seed must be a non-negative integer, got {seed!r}")


@register
@dataclass
class DareTaskArithmetic(MergeMethod):
    """DARE + task arithmetic: θ = θ0 + scaling · Σ_t DARE(τ_t).

    Yu et al., "Language Models are Super Mario: Absorbing Abilities from
    Homologous Models as a Free Lunch", ICML 2024
    (https://arxiv.org/abs/2311.03099). DARE(τ) = m ⊙ τ / (1 − p) with
    m ~ Bernoulli(1 − p) per entry, ``drop_rate`` = p, so E[DARE(τ)] = τ.

    We follow the paper and FusionBench (``sparsity_ratio`` = drop
    probability, exact 1/(1 − p) rescale). mergekit's ``density`` is the
    *keep* probability (1 − p) and it rescales each tensor to keep its L1
    norm, a random factor close to 1/density.

    Defaults: drop_rate 0.5 and scaling 0.3, FusionBench's CLIP ViT
    configuration (the paper's language-model experiments mostly use
    p = 0.9). Masks come from a generator seeded by (seed, task index, key),
    never the global RNG.

    Incremental: yes, the running sum of the dropped task vectors (the mask of
    task i is derived from i = the number of tasks seen before it).
    """

    name = "dare_task_arithmetic"
    reference = "https://arxiv.org/abs/2311.03099"
    incremental = True

    drop_rate: float = 0.5
    scaling: float = 0.3
    seed: int = 0

    def validate(self) -> None:
        check_drop_rate(self.name, self.drop_rate)
        check_seed(self.name, self.seed)

    def merge_tensor(self, key, base, deltas, context):
        return self.fold_tensor(key, base, deltas)

    def init_state(self, key, base):
        return {"sum": torch.zeros_like(base)}

    def update_state(self, key, base, state, delta, num_seen, task_context):
        return {"sum": state["sum"] + drop_and_rescale(delta, self.drop_rate, self.seed, num_seen, key)}

    def state_weights(self, key, base, state, num_seen):
        return base + self.scaling * state["sum"]


@register
@dataclass
class DareTies(Ties):
    """DARE + TIES: TIES-Merging (trim, elect, disjoint merge) of DARE(τ_t).

    Yu et al. 2024 (https://arxiv.org/abs/2311.03099) apply DARE to every
    task vector and then run TIES-Merging unchanged, as FusionBench does
    (top-k trimming of the dropped vectors included). mergekit's
    ``dare_ties`` replaces the magnitude trim by the random drop; here that is
    ``density=1.0``. The trim, sign election and aggregation are those of
    ``ties`` (see its docstring: thresholds, ties, zero-sum sign).

    Defaults: drop_rate 0.5 (FusionBench's CLIP configuration), and TIES'
    paper defaults density 0.2, scaling 1.0, disjoint mean (FusionBench's
    config: disjoint sum with scaling 0.5).

    Incremental: yes, through TIES' four-tensor state; the dropped vector
    of task i is reproducible from (seed, i, key), so the global threshold
    of each task is computed from that task alone.
    """

    name = "dare_ties"
    reference = "https://arxiv.org/abs/2311.03099"
    incremental = True

    drop_rate: float = 0.5
    density: float = 0.2
    scaling: float = 1.0
    seed: int = 0
    topk_scope: str = "global"
    aggregate: str = "mean"

    def validate(self) -> None:
        check_drop_rate(self.name, self.drop_rate)
        check_seed(self.name, self.seed)
        super().validate()

    def transform_delta(self, key, delta, task_index):
        global _drawn_since_trim
        _drawn_since_trim += delta.numel() * delta.element_size()
        if _drawn_since_trim >= TRIM_EVERY_BYTES:
            # TIES' passes draw every tensor of every task, sizes varying: glibc's
            # heap grew to three model copies at ViT-B/32 with nothing live
            release_freed_heap()
            _drawn_since_trim = 0
        return drop_and_rescale(delta, self.drop_rate, self.seed, task_index, key)
