"""Tasks: a dataset, optionally restricted to some classes, shifted by a variant,
cut to k shots or a maximum size, split into train / val / test.

>>> task = load_task(TaskSpec("cifar100", classes=list(range(10))), root="data")
>>> image, label = task.train[0]      # PIL RGB image, label in 0..9
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cl_merge.data.base import LabeledDataset, TaskSplit
from cl_merge.data.registry import DatasetInfo, get_dataset_info, resolve_data_root
from cl_merge.data.sampling import k_shot_indices, stratified_split, stratified_subsample
from cl_merge.data.custom import custom_name, is_custom, open_custom
from cl_merge.data.sources import open_source
from cl_merge.data.variants import get_variant
from cl_merge.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class TaskSpec:
    """One task. ``classes`` (label ids or class names) picks a subset, relabelled
    0..k-1 in the listed order; ``variant`` names an image variant
    (:mod:`cl_merge.data.variants`); ``k_shot`` keeps exactly k training images per
    class; ``val_fraction`` is carved (stratified) from train when the dataset has
    no validation split; ``max_train`` / ``max_val`` / ``max_test`` subsample
    (stratified) for fast runs. ``layout`` picks one on-disk layout of a registry
    dataset (see :func:`cl_merge.data.sources.layout_names`)."""

    dataset: str | dict[str, Any]  # a registry name, or {folder: ...} / {hf: ...} (cl_merge.data.custom)
    name: str | None = None
    classes: list[int] | list[str] | None = None
    variant: str | None = None
    k_shot: int | None = None
    val_fraction: float = 0.1
    max_train: int | None = None
    max_val: int | None = None
    max_test: int | None = None
    layout: str | None = None  # hf, task_vectors, torchvision, ...: None takes the first present

    @property
    def task_name(self) -> str:
        """``name`` or ``dataset[+variant][classes]``."""
        if self.name:
            return self.name
        base = custom_name(self.dataset) if is_custom(self.dataset) else self.dataset
        out = base + (f"+{self.variant}" if self.variant else "")
        if self.classes is not None:
            items = list(self.classes)
            if all(isinstance(c, int) for c in items) and items == list(range(items[0], items[0] + len(items))):
                out += f"[{items[0]}-{items[-1]}]"
            elif len(items) <= 6:
                out += "[" + ",".join(str(c) for c in items) + "]"
            else:
                digest = hashlib.sha1(",".join(map(str, items)).encode()).hexdigest()[:8]
                out += f"[{len(items)} classes {digest}]"
        return out


@dataclass
class TaskData:
    """A loaded task. ``train`` / ``val`` / ``test`` yield ``(PIL RGB image, label)``
    with labels in ``0..len(classnames)-1``; ``class_ids`` are the dataset's
    original label ids of those classes."""

    name: str
    classnames: list[str]
    templates: list[str]
    train: TaskSplit
    val: TaskSplit
    test: TaskSplit
    class_ids: list[int]
    info: DatasetInfo
    spec: TaskSpec = field(repr=False)
    layout: str = ""  # the on-disk layout the data was read from
    protocol: str = ""  # whose splits and labels that layout reproduces

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


def _check_positive(value, field_name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
        raise ConfigError(f"TaskSpec.{field_name} must be a positive integer or None, got {value!r}")


def resolve_classes(info: DatasetInfo, classes) -> list[int]:
    """Label ids for ``classes`` (ids, class names or folder names), order kept."""
    if classes is None:
        return list(range(info.num_classes))
    if isinstance(classes, (str, bytes)) or len(classes) == 0:
        raise ConfigError(f"{info.name}: classes must be a non-empty list, got {classes!r}")
    by_name = {n: i for i, n in enumerate(info.classnames)}
    by_name.update({n: i for i, n in enumerate(info.folder_names or ())})
    ids = []
    for c in classes:
        if isinstance(c, str):
            if c not in by_name:
                from cl_merge.errors import close_matches

                raise ConfigError(f"{info.name}: unknown class name {c!r}{close_matches(c, info.classnames)}")
            ids.append(by_name[c])
        elif isinstance(c, (int, np.integer)) and not isinstance(c, bool):
            if not 0 <= c < info.num_classes:
                raise ConfigError(f"{info.name}: class id {c} is out of range 0..{info.num_classes - 1}")
            ids.append(int(c))
        else:
            raise ConfigError(f"{info.name}: class {c!r} is neither a label id nor a class name")
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ConfigError(f"{info.name}: classes list repeats label ids {duplicates}")
    return ids


def _select(ds: LabeledDataset, keep: np.ndarray) -> np.ndarray:
    """Positions of ``ds`` whose label is one of the kept classes."""
    return np.flatnonzero(keep[ds.labels])


def load_task(spec: TaskSpec, root=None, *, download: bool = False, seed: int = 0) -> TaskData:
    """Load the task ``spec`` from ``root`` (see :func:`resolve_data_root`).

    ``seed`` drives the validation carve-out, k-shot sampling and subsampling;
    the test split of datasets that ship none is fixed (see ``sources``).
    """
    variant = get_variant(spec.variant) if spec.variant is not None else None
    if not 0.0 <= spec.val_fraction < 1.0:
        raise ConfigError(f"TaskSpec.val_fraction must be in [0, 1), got {spec.val_fraction}")
    for name in ("k_shot", "max_train", "max_val", "max_test"):
        _check_positive(getattr(spec, name), name)
    data_root = resolve_data_root(root)
    if is_custom(spec.dataset):
        if spec.layout is not None:
            raise ConfigError("TaskSpec.layout: only for registry datasets (a folder/hf dataset has one layout)")
        info, splits = open_custom(spec.dataset, data_root, download=download)
        layout_name, protocol = info.layouts[0], "the user's own splits"
    else:
        info = get_dataset_info(spec.dataset)
        if info.bundled and root is not None:
            log.warning("%s ships with its package (%s): the data root %s is not used", info.name, info.source, root)
        splits, layout = open_source(info.name, data_root, download=download, layout=spec.layout)
        layout_name, protocol = layout.name, layout.protocol
    class_ids = resolve_classes(info, spec.classes)

    label_map = np.full(info.num_classes, -1, dtype=np.int64)
    label_map[class_ids] = np.arange(len(class_ids))
    keep = label_map >= 0
    view = lambda ds, positions: TaskSplit(ds, positions, label_map=label_map, variant=variant)  # noqa: E731

    train = view(splits["train"], _select(splits["train"], keep))
    if "val" in splits:
        val = view(splits["val"], _select(splits["val"], keep))
    else:
        rest, held = stratified_split(train.labels, spec.val_fraction, seed=seed)
        train, val = train.subset(rest), train.subset(held)
    test = view(splits["test"], _select(splits["test"], keep))

    task_classnames = [info.classnames[i] for i in class_ids]
    if spec.k_shot is not None:
        train = train.subset(k_shot_indices(train.labels, spec.k_shot, seed=seed, classnames=task_classnames))
    parts = {"train": train, "val": val, "test": test}
    for split_name, limit in (("train", spec.max_train), ("val", spec.max_val), ("test", spec.max_test)):
        if limit is not None and len(parts[split_name]) > limit:
            ds = parts[split_name]
            parts[split_name] = ds.subset(stratified_subsample(ds.labels, limit, seed=seed))

    return TaskData(
        name=spec.task_name,
        classnames=task_classnames,
        templates=list(info.templates),
        train=parts["train"],
        val=parts["val"],
        test=parts["test"],
        class_ids=class_ids,
        info=info,
        spec=spec,
        layout=layout_name,
        protocol=protocol,
    )
