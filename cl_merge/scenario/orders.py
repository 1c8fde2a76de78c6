"""Seeded task orders and class splits.

Permutations come from a SHA-256 counter stream (Fisher-Yates), so an order
depends only on its seed — not on the numpy or Python version, nor on any
global RNG state.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from cl_merge.scenario.schema import Scenario, StageSpec


def _random_below(bound: int, key: str, counter: int) -> int:
    """Uniform integer in [0, bound) from the hash stream (rejection keeps it unbiased)."""
    limit = (1 << 64) - ((1 << 64) % bound)
    while True:
        digest = hashlib.sha256(f"{key}:{counter}".encode()).digest()
        value = int.from_bytes(digest[:8], "big")
        if value < limit:
            return value % bound
        counter += 1 << 32  # rejected draw: move to a disjoint part of the stream


def seeded_permutation(n: int, *seed_parts: int | str) -> list[int]:
    """A permutation of ``range(n)`` determined by ``seed_parts`` alone."""
    key = "/".join(str(p) for p in seed_parts)
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        j = _random_below(i + 1, key, i)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def contiguous_class_splits(class_order: Sequence[int], num_tasks: int) -> list[list[int]]:
    """Cut ``class_order`` into ``num_tasks`` contiguous chunks; when the count
    does not divide evenly the first chunks get one class more."""
    n = len(class_order)
    if not 1 <= num_tasks <= n:
        raise ValueError(f"num_tasks must be in 1..{n} (number of classes), got {num_tasks}")
    from cl_merge.data.sampling import contiguous_chunks

    return contiguous_chunks(list(class_order), num_tasks)


def split_stages(dataset: str, num_classes: int, num_tasks: int, class_order_seed: int | None,
                 variant: str | None = None, class_order: Sequence[int] | None = None) -> list["StageSpec"]:
    """Class-incremental stages: classes in contiguous splits of ``class_order``
    (given), or of 0..C-1 permuted by ``class_order_seed``, or of 0..C-1."""
    from cl_merge.scenario.schema import StageSpec

    if class_order is not None:
        order = list(class_order)
    elif class_order_seed is not None:
        order = seeded_permutation(num_classes, "classes", class_order_seed)
    else:
        order = list(range(num_classes))
    prefix = dataset if variant is None else f"{dataset}_{variant}"
    return [
        StageSpec(dataset=dataset, name=f"{prefix}_t{k:02d}", classes=classes, variant=variant)
        for k, classes in enumerate(contiguous_class_splits(order, num_tasks))
    ]


def expand_orders(scenario: "Scenario") -> list[list["StageSpec"]]:
    """Stage sequences for each order of ``scenario``.

    * ``order: fixed`` (``orders: 1``): the stages as listed.
    * ``order: random``: ``orders`` permutations, order ``k`` drawn from the
      seed ``(order_seed, k)``. For the class-split shorthand the *classes*
      are permuted and re-split (the usual class-incremental protocol: a new
      class order per run); otherwise the stages are permuted.
    """
    if scenario.order == "fixed":
        return [[dataclasses.replace(s) for s in scenario.stages]]
    sequences = []
    for k in range(scenario.orders):
        split = scenario.split
        if split is not None:
            num_classes = sum(len(s.classes or []) for s in scenario.stages)
            order = seeded_permutation(num_classes, "classes", scenario.order_seed, k)
            prefix = split.dataset if split.variant is None else f"{split.dataset}_{split.variant}"
            sequences.append([
                dataclasses.replace(scenario.stages[0], name=f"{prefix}_t{j:02d}", classes=classes,
                                    k_shot=scenario.stages[j].k_shot)
                for j, classes in enumerate(contiguous_class_splits(order, split.num_tasks))
            ])
        else:
            perm = seeded_permutation(len(scenario.stages), "stages", scenario.order_seed, k)
            sequences.append([dataclasses.replace(scenario.stages[i]) for i in perm])
    return sequences
