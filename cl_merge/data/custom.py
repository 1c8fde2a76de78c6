"""A user's own data as a task: an image folder or a Hugging Face dataset.

In a scenario or a ``TaskSpec`` the dataset is then a mapping instead of a
registry name::

    dataset: {folder: /data/my_birds}            # train/<class>/*, test/<class>/*, optional val/<class>/*
    dataset: {hf: user/my_dataset}                # hub id (HF cache offline), or a save_to_disk / parquet folder
    dataset: {hf: ./my_ds, image_column: img, label_column: y, class_names: [cat, dog]}

Folder tasks take their class names from the ``train`` folder names (sorted;
underscores read as spaces) unless ``class_names`` lists them (same count, in
that sorted folder order). HF tasks read the columns ``image`` and ``label`` by
default and the names of a ``ClassLabel`` label column, unless ``class_names``
is given. ``templates`` (default ``["a photo of a {}."]``) are the prompts of
a CLIP zero-shot head. A relative path is looked up under the data root first,
then in the working directory.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cl_merge.data.base import FileImageDataset, LabeledDataset, TaskSplit
from cl_merge.data.registry import DatasetInfo
from cl_merge.data.sampling import stratified_split
from cl_merge.errors import ConfigError, DataError

DEFAULT_TEMPLATES = ("a photo of a {}.",)
CUSTOM_TEST_FRACTION = 0.2
_KEYS = {"folder": str, "hf": str, "image_column": str, "label_column": str, "class_names": list,
         "templates": list, "config": str}
_HF_ONLY = ("image_column", "label_column", "config")


def is_custom(dataset) -> bool:
    return isinstance(dataset, Mapping)


def parse_custom(dataset: Mapping[str, Any], where: str = "dataset") -> dict[str, Any]:
    """Check a custom dataset mapping's keys and value types (no file access); a plain dict back."""
    if not isinstance(dataset, Mapping):
        raise ConfigError(f"{where}: expected a dataset name or a mapping with 'folder' or 'hf', got {dataset!r}")
    unknown = [k for k in dataset if k not in _KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (valid: {', '.join(_KEYS)})")
    kinds = [k for k in ("folder", "hf") if k in dataset]
    if len(kinds) != 1:
        raise ConfigError(f"{where}: give exactly one of 'folder' (an image folder) or 'hf' (a Hugging Face dataset)")
    for key, value in dataset.items():
        if not isinstance(value, _KEYS[key]) or (isinstance(value, str) and not value.strip()):
            raise ConfigError(f"{where}.{key}: expected a non-empty {_KEYS[key].__name__}, got {value!r}")
    if "folder" in dataset:
        extra = [k for k in _HF_ONLY if k in dataset]
        if extra:
            raise ConfigError(f"{where}.{extra[0]}: only for 'hf' datasets")
    names = dataset.get("class_names")
    if names is not None:
        if not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise ConfigError(f"{where}.class_names: expected a non-empty list of class names, got {names!r}")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"{where}.class_names: {duplicates[0]!r} listed twice")
    templates = dataset.get("templates")
    if templates is not None:
        bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
        if not templates or bad:
            raise ConfigError(f"{where}.templates: each template needs exactly one '{{}}' for the class name, got {bad[:1] or templates!r}")
    return dict(dataset)


def custom_name(dataset: Mapping[str, Any]) -> str:
    """A file-safe task name: the folder's or hub dataset's last path part."""
    source = str(dataset.get("folder") or dataset.get("hf"))
    stem = Path(source.rstrip("/")).name or "dataset"
    stem = re.sub(r"[^A-Za-z0-9_.+-]+", "_", stem).strip("._") or "dataset"
    return stem


def custom_key(dataset) -> str:
    """A hashable, stable identity of a dataset value (name or mapping)."""
    if not is_custom(dataset):
        return str(dataset)
    return json.dumps(dict(dataset), sort_keys=True)


def _resolve(path: str, root: Path | None) -> Path:
    candidate = Path(path).expanduser()
    if not candidate.is_absolute() and root is not None and (root / candidate).exists():
        return root / candidate
    return candidate


def _folder_classes(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir())


def _folder_split(split_dir: Path, class_index: dict[str, int], what: str) -> FileImageDataset:
    from cl_merge.data.sources import IMAGE_EXTENSIONS

    paths, labels = [], []
    for folder in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        if folder.name not in class_index:
            raise DataError(f"{what}: {split_dir.name}/{folder.name} is not a class of train/ "
                            f"(train has {len(class_index)} class folders)")
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        paths += [str(p) for p in files]
        labels += [class_index[folder.name]] * len(files)
    if not paths:
        raise DataError(f"{what}: no images ({', '.join(IMAGE_EXTENSIONS)}) under {split_dir}/<class>/")
    return FileImageDataset(paths, labels)


def _open_folder(spec: Mapping[str, Any], root: Path | None) -> tuple[list[str], dict[str, LabeledDataset]]:
    base = _resolve(spec["folder"], root)
    what = f"folder dataset {base}"
    if not base.is_dir():
        raise DataError(f"{what}: no such folder")
    missing = [s for s in ("train", "test") if not (base / s).is_dir() or not _folder_classes(base / s)]
    if missing:
        raise DataError(f"{what}: layout not recognised: looked for train/<class>/<image>, test/<class>/<image> "
                        f"and optional val/<class>/<image>; missing: {', '.join(m + '/<class>/' for m in missing)}")
    folders = _folder_classes(base / "train")
    names = spec.get("class_names")
    if names is not None and len(names) != len(folders):
        raise DataError(f"{what}: class_names lists {len(names)} names but train/ has {len(folders)} class folders")
    classnames = list(names) if names is not None else [f.replace("_", " ") for f in folders]
    index = {f: i for i, f in enumerate(folders)}
    splits = {s: _folder_split(base / s, index, what) for s in ("train", "val", "test") if (base / s).is_dir()}
    return classnames, splits


def _open_hf(spec: Mapping[str, Any], root: Path | None, download: bool) -> tuple[list[str], dict[str, LabeledDataset]]:
    from cl_merge.data.hf import HFImageDataset, class_label_names, label_array, open_hf, pick_column

    source = spec["hf"]
    local = _resolve(source, root)
    source = local if local.exists() else source
    what = f"hf dataset {source}"
    tables = open_hf(source, config=spec.get("config"), download=download, what=what)
    if "train" not in tables:
        raise DataError(f"{what}: no 'train' split (splits: {', '.join(tables)})")
    image_col, label_col = spec.get("image_column", "image"), spec.get("label_column", "label")
    names = spec.get("class_names")
    feature_names = None
    out: dict[str, LabeledDataset] = {}
    ours_of = {"train": "train", "test": "test", "validation": "val", "valid": "val", "val": "val"}
    for theirs, table in tables.items():
        ours = ours_of.get(theirs)
        if ours is None or ours in out:
            continue
        image = pick_column(table, image_col, (), "image", f"{what} ({theirs})")
        label = pick_column(table, label_col, (), "label", f"{what} ({theirs})")
        feature_names = feature_names or class_label_names(table, label)
        out[ours] = HFImageDataset(table, image, label_array(table, label, f"{what} ({theirs})"))
    if names is None:
        if feature_names is None:
            raise DataError(f"{what}: column {label_col!r} is not a ClassLabel; give class_names")
        names = feature_names
    elif feature_names is not None and len(feature_names) != len(names):
        raise DataError(f"{what}: class_names lists {len(names)} names but column {label_col!r} has "
                        f"{len(feature_names)} classes")
    return list(names), out


def open_custom(spec: Mapping[str, Any], root: Path | None, *, download: bool = False,
                where: str = "dataset") -> tuple[DatasetInfo, dict[str, LabeledDataset]]:
    """``(DatasetInfo, splits)`` of a user dataset; a test split is carved (seeded) when there is none."""
    from cl_merge.data.sources import TEST_SPLIT_SEED, check_labels

    spec = parse_custom(spec, where)
    kind = "folder" if "folder" in spec else "hf"
    classnames, splits = _open_folder(spec, root) if kind == "folder" else _open_hf(spec, root, download)
    name = custom_name(spec)
    for split, ds in splits.items():
        check_labels(ds.labels, len(classnames), f"{kind} dataset {spec[kind]} ({split})")
    if "test" not in splits:
        rest, test = stratified_split(splits["train"].labels, CUSTOM_TEST_FRACTION, seed=TEST_SPLIT_SEED)
        splits = {**splits, "train": TaskSplit(splits["train"], rest), "test": TaskSplit(splits["train"], test)}
    digest = hashlib.sha1(custom_key(spec).encode()).hexdigest()[:8]
    info = DatasetInfo(
        name=name,
        classnames=tuple(classnames),
        templates=tuple(spec.get("templates") or DEFAULT_TEMPLATES),
        source=f"{kind}: {spec[kind]} ({digest})",
        splits=tuple(sorted(splits)),
        layouts=(kind,),
        folder_names=None,
    )
    return info, splits

