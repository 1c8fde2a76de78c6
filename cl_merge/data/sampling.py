"""Seeded, stratified index selection: splits, k-shot, subsampling, class splits.

Every function takes an explicit seed and draws from its own ``torch.Generator``,
never from a global RNG, so results depend on the arguments alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from cl_merge.errors import ConfigError, DataError


def _permutation(n: int, seed: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=generator).numpy()


def _by_class(labels: np.ndarray) -> dict[int, np.ndarray]:
    """Positions of each label, ascending."""
    labels = np.asarray(labels)
    return {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}


def stratified_split(labels: Sequence[int] | np.ndarray, fraction: float, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split positions into ``(rest, held_out)`` with ``fraction`` of every class held out.

    Each class with at least two members keeps at least one on each side;
    both outputs are sorted.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"split fraction must be in [0, 1), got {fraction}")
    labels = np.asarray(labels)
    rest, held = [], []
    for offset, (_, positions) in enumerate(sorted(_by_class(labels).items())):
        order = positions[_permutation(len(positions), seed * 1_000_003 + offset)]
        n_held = int(round(fraction * len(order)))
        if fraction > 0 and len(order) >= 2:
            n_held = min(max(n_held, 1), len(order) - 1)
        held.append(order[:n_held])
        rest.append(order[n_held:])
    cat = lambda parts: np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)  # noqa: E731
    return cat(rest).astype(np.int64), cat(held).astype(np.int64)


def k_shot_indices(
    labels: Sequence[int] | np.ndarray, k: int, *, seed: int, classnames: Sequence[str] | None = None
) -> np.ndarray:
    """Exactly ``k`` positions per class (sorted), drawn with ``seed``.

    Raises DataError naming the smallest class when it has fewer than ``k`` examples.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k_shot must be a positive integer, got {k!r}")
    labels = np.asarray(labels)
    groups = _by_class(labels)
    for label, positions in sorted(groups.items(), key=lambda kv: (len(kv[1]), kv[0])):
        if len(positions) < k:
            name = f" ({classnames[label]!r})" if classnames is not None and label < len(classnames) else ""
            raise DataError(f"k_shot={k} is larger than class {label}{name}, which has {len(positions)} examples")
        break
    chosen = [
        positions[_permutation(len(positions), seed * 1_000_003 + offset)[:k]]
        for offset, (_, positions) in enumerate(sorted(groups.items()))
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, dtype=np.int64)


def stratified_subsample(labels: Sequence[int] | np.ndarray, n: int, *, seed: int) -> np.ndarray:
    """At most ``n`` positions (sorted), class proportions kept (largest remainders), seeded."""
    labels = np.asarray(labels)
    if n < 1:
        raise ConfigError(f"subsample size must be positive, got {n}")
    if n >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    groups = sorted(_by_class(labels).items())
    sizes = np.array([len(p) for _, p in groups], dtype=np.float64)
    quota = sizes * n / sizes.sum()
    take = np.floor(quota).astype(np.int64)
    # hand the remaining slots to the largest fractional parts (ties: lower label first)
    for i in np.argsort(-(quota - take), kind="stable")[: n - int(take.sum())]:
        take[i] += 1
    chosen = [
        positions[_permutation(len(positions), seed * 1_000_003 + offset)[: int(t)]]
        for offset, ((_, positions), t) in enumerate(zip(groups, take))
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def sample_calibration(dataset, *, n_per_class: int | None = None, n: int | None = None, seed: int = 0):
    """A small seeded subset for data-based merging (calibration / unlabeled data).

    Give exactly one of ``n_per_class`` (class-balanced, exactly that many per class)
    or ``n`` (stratified, at most ``n`` in total). ``dataset`` must expose ``.labels``;
    a :class:`~cl_merge.data.base.TaskSplit` is returned for TaskSplits, a
    ``torch.utils.data.Subset`` otherwise.
    """
    if (n_per_class is None) == (n is None):
        raise ConfigError("sample_calibration: give exactly one of n_per_class or n")
    labels = getattr(dataset, "labels", None)
    if labels is None:
        raise ConfigError(f"sample_calibration: {type(dataset).__name__} has no .labels array")
    positions = (
        k_shot_indices(labels, n_per_class, seed=seed)
        if n_per_class is not None
        else stratified_subsample(labels, n, seed=seed)
    )
    if hasattr(dataset, "subset"):
        return dataset.subset(positions)
    return torch.utils.data.Subset(dataset, positions.tolist())


def split_classes(
    num_classes: int,
    num_tasks: int,
    order_seed: int | None = None,
    *,
    require_equal: bool = True,
) -> list[list[int]]:
    """Class ids split into ``num_tasks`` contiguous groups (class-incremental benchmarks).

    With ``order_seed`` the class order is shuffled first (seeded); otherwise the
    groups are ``[0..k-1], [k..2k-1], ...`` as in the contiguous CIFAR100 / ImageNet-R
    splits. ``require_equal`` demands ``num_classes % num_tasks == 0``; without it the
    first ``num_classes % num_tasks`` groups get one class more.
    """
    if num_classes < 1 or num_tasks < 1:
        raise ConfigError(f"split_classes: num_classes ({num_classes}) and num_tasks ({num_tasks}) must be positive")
    if num_tasks > num_classes:
        raise ConfigError(f"split_classes: {num_tasks} tasks cannot split {num_classes} classes")
    if require_equal and num_classes % num_tasks:
        raise ConfigError(
            f"split_classes: {num_classes} classes do not split into {num_tasks} equal tasks "
            "(pass require_equal=False for unequal groups)"
        )
    order = np.arange(num_classes) if order_seed is None else _permutation(num_classes, order_seed)
    return contiguous_chunks(order, num_tasks)


def contiguous_chunks(order: Sequence[int], num_tasks: int) -> list[list[int]]:
    """``order`` cut into ``num_tasks`` consecutive groups; when the count does
    not divide evenly, the first groups get one item more."""
    base, extra = divmod(len(order), num_tasks)
    groups, start = [], 0
    for t in range(num_tasks):
        size = base + (1 if t < extra else 0)
        groups.append([int(c) for c in order[start : start + size]])
        start += size
    return groups


def check_class_splits(
    splits: Sequence[Sequence[int]], num_classes: int, *, require_equal: bool = False, require_cover: bool = False
) -> None:
    """Validate user-given class splits: in range, no overlap, optionally equal sizes / full cover."""
    seen: dict[int, int] = {}
    for t, group in enumerate(splits):
        if len(group) == 0:
            raise ConfigError(f"class split {t} is empty")
        for c in group:
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c < num_classes:
                raise ConfigError(f"class split {t}: class {c!r} is out of range 0..{num_classes - 1}")
            if c in seen:
                raise ConfigError(f"class {c} appears in class splits {seen[c]} and {t}")
            seen[int(c)] = t
    if require_equal and len({len(g) for g in splits}) > 1:
        raise ConfigError(f"class splits have unequal sizes {[len(g) for g in splits]}")
    if require_cover and len(seen) != num_classes:
        missing = sorted(set(range(num_classes)) - set(seen))
        raise ConfigError(f"class splits miss classes {missing[:10]}{'...' if len(missing) > 10 else ''}")
