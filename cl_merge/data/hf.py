"""Hugging Face ``datasets`` as image sources.

Three places a dataset can come from, tried in this order:

- a local folder written by ``DatasetDict.save_to_disk`` (it holds ``dataset_dict.json``);
- a local folder of parquet files, one or more per split (``train-*.parquet``,
  ``data/train-00000-of-00002.parquet``, ``train/*.parquet``, ...);
- a hub id (``tanganke/sun397``) read with ``datasets.load_dataset``: from the
  local HF cache when offline, downloaded when online.

Images are decoded per item (in DataLoader workers); only the label column is
read up front, as one int64 array. The ``datasets.Dataset`` object is memory-mapped
Arrow, so handing it to worker processes copies no image data.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from cl_merge.data.base import LabeledDataset
from cl_merge.errors import DataError

IMAGE_COLUMN_GUESSES = ("image", "img", "jpg", "png", "webp")
LABEL_COLUMN_GUESSES = ("label", "labels", "fine_label", "cls", "target")


def _require_datasets():
    try:
        import datasets  # noqa: F401
    except ImportError:  # pragma: no cover - a dependency of cl_merge
        raise DataError("reading Hugging Face datasets needs the 'datasets' package: pip install datasets") from None
    import datasets

    return datasets


class HFImageDataset(LabeledDataset):
    """One split of a ``datasets.Dataset``: ``(PIL RGB image, label)`` per row."""

    def __init__(self, table, image_column: str, labels: np.ndarray):
        self.table = table.select_columns([image_column])
        self.image_column = image_column
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)

    def image(self, index: int) -> Image.Image:
        value = self.table[int(index)][self.image_column]
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        if isinstance(value, dict) and value.get("bytes") is not None:  # an undecoded Image feature
            with Image.open(io.BytesIO(value["bytes"])) as img:
                return img.convert("RGB")
        if isinstance(value, dict) and value.get("path"):
            value = value["path"]
        if isinstance(value, (str, os.PathLike)):
            with Image.open(value) as img:
                return img.convert("RGB")
        if isinstance(value, (bytes, bytearray)):
            with Image.open(io.BytesIO(value)) as img:
                return img.convert("RGB")
        raise DataError(f"column {self.image_column!r} row {index}: not an image ({type(value).__name__})")


def hub_cache_has(hub_id: str) -> bool:
    """Whether the local HF caches hold anything of ``hub_id`` (no network)."""
    datasets = _require_datasets()
    from huggingface_hub import constants

    owner_name = hub_id.replace("/", "--")
    candidates = [Path(constants.HF_HUB_CACHE) / f"datasets--{owner_name}",
                  Path(datasets.config.HF_DATASETS_CACHE) / hub_id.replace("/", "___")]
    return any(c.is_dir() for c in candidates)


def _parquet_files(folder: Path) -> dict[str, list[str]]:
    """``{split: [files]}`` of the parquet files under ``folder``, split from the name."""
    files = sorted(p for p in folder.rglob("*.parquet") if p.is_file())
    out: dict[str, list[str]] = {}
    for path in files:
        parts = [path.parent.name if path.parent != folder else "", path.stem]
        for part in parts:
            split = part.split("-")[0].split(".")[0]
            if split in ("train", "test", "validation", "valid", "val"):
                out.setdefault(split, []).append(str(path))
                break
    return out


def is_local_hf(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()
                              or bool(_parquet_files(path)))


def open_hf(source: str | Path, *, config: str | None = None, download: bool = False, what: str = "dataset") -> dict:
    """``{split: datasets.Dataset}`` from a local folder or a hub id."""
    datasets = _require_datasets()
    path = Path(source).expanduser()
    try:
        if path.is_dir():
            if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
                loaded = datasets.load_from_disk(str(path))
                return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
            files = _parquet_files(path)
            if not files:
                raise DataError(f"{what}: {path} is neither a save_to_disk folder (dataset_dict.json) "
                                "nor a folder of <split>*.parquet files")
            return dict(datasets.load_dataset("parquet", data_files=files))
        if not download and not hub_cache_has(str(source)):
            # fetching from the hub is a download: only with download=True (--download)
            raise DataError(f"{what}: {source} is not a local folder and not in the Hugging Face cache; "
                            "pass --download (download=True) to fetch it, or give a save_to_disk / parquet folder")
        loaded = datasets.load_dataset(str(source), config) if config else datasets.load_dataset(str(source))
        return dict(loaded)
    except DataError:
        raise
    except Exception as exc:  # network, missing config, corrupt cache
        raise DataError(f"{what}: cannot load Hugging Face dataset {source}"
                        f"{f' ({config})' if config else ''}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None


def pick_column(table, wanted: str | None, guesses: tuple[str, ...], kind: str, what: str) -> str:
    """The named column, or (when ``wanted`` is None) the first guess present /
    the first column of the right feature type."""
    datasets = _require_datasets()
    columns = list(table.column_names)
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{what}: no {kind} column {wanted!r} (columns: {', '.join(columns)})")
        return wanted
    feature_type = datasets.Image if kind == "image" else datasets.ClassLabel
    typed = [c for c in columns if isinstance(table.features.get(c), feature_type)]
    for name in guesses:
        if name in columns:
            return name
    if typed:
        return typed[0]
    raise DataError(f"{what}: no {kind} column found (looked for {', '.join(guesses)}; columns: {', '.join(columns)})")


def label_array(table, column: str, what: str) -> np.ndarray:
    values = np.asarray(table.select_columns([column]).with_format("numpy")[column])
    if values.dtype == bool:
        values = values.astype(np.int64)
    if not np.issubdtype(values.dtype, np.integer):
        raise DataError(f"{what}: label column {column!r} holds {values.dtype} values, not integer labels")
    return values.astype(np.int64)


def class_label_names(table, column: str) -> list[str] | None:
    """Names of a ``ClassLabel`` column, in label order, or None."""
    datasets = _require_datasets()
    feature = table.features.get(column)
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
