"""Hugging Face ``datasets`` as image sources.

Three places a dataset can come from, tried in this order:

- a local folder written by ``DatasetDict.save_to_disk`` (it holds ``dataset_dict.json``);
- a local folder of parquet files, one or more per split (``train-*.parquet``,
  ``data/train-00000-of-00002.parquet``, ``train/*.parquet``, ...);
- a hub id (``tanganke/sun397``) read with ``datasets.load_dataset``: from the
  local HF cache when offline, downloaded when online.

Images are decoded per item (in DataLoader workers); only the label column is
read up front, as one int64 array. A dataset backed by Arrow files (a
``save_to_disk`` folder, the hub cache, a parquet folder once ``datasets`` has
converted it) is read by :class:`ArrowImageBytes`: the image bytes straight
from the files through memory maps that are released every few MiB read, so
neither the resident memory of a worker nor its time per image grows with the
dataset; anything else goes through ``datasets``' own row access.
"""

from __future__ import annotations

import bisect
import io
import mmap
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


# Resident pages of the memory maps are dropped after this many bytes of images have been read
RELEASE_EVERY_BYTES = 16 * 2**20


def _decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")  # convert() would copy an RGB image


class ArrowImageBytes:
    """Random access to the encoded images of one column of a dataset's Arrow files.

    Why not ``datasets``' own row access: it memory-maps the files, and every
    page a process touches stays in its resident set until the map is closed.
    A shuffled pass makes each DataLoader worker touch (nearly, with the
    kernel's fault-around) the whole split, so the workers' RSS grew with the
    dataset (2.2 GB at 10k images, 4.0 GB at 50k in ``scripts/bench_data.py``).
    Here the files are mapped by this object, read-only, and after every
    :data:`RELEASE_EVERY_BYTES` of images read the maps get
    ``madvise(MADV_DONTNEED)``: the pages leave the process (the kernel's page
    cache keeps them, so the next read of them is a minor fault, not disk I/O)
    and a worker's resident share stays a few MiB whatever the dataset size.
    Skipping ``datasets``' per-row formatting (a Python dict per row, its
    ``Image`` feature's decode) also saves ~15% of the per-image time.

    Rows are the concatenation of ``files`` in order, which is how ``datasets``
    concatenates a split's files (``Dataset.cache_files``). The maps are opened
    lazily in the process that reads, and not pickled.
    """

    def __init__(self, files: list[str], column: str):
        self.files, self.column = [str(f) for f in files], column
        self._state = None
        self._since_release = 0

    # ---- opening
    def _open(self):
        import pyarrow as pa

        maps, chunks, types = [], [], set()
        for path in self.files:
            with open(path, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            maps.append(mapped)
            # a BufferReader over the map: record batches are zero-copy views of it
            table = pa.ipc.open_stream(pa.BufferReader(pa.py_buffer(mapped))).read_all()
            if self.column not in table.column_names:
                raise DataError(f"{path}: no column {self.column!r} (columns: {', '.join(table.column_names)})")
            types.add(table.schema.field(self.column).type)
            for chunk in table.column(self.column).chunks:
                if pa.types.is_struct(chunk.type):  # datasets' Image feature: {bytes, path}
                    fields = dict(zip([f.name for f in chunk.type], chunk.flatten()))
                    chunks.append((fields.get("bytes"), fields.get("path")))
                else:  # a plain binary column
                    chunks.append((chunk, None))
        starts = np.cumsum([0] + [len(b if b is not None else p) for b, p in chunks]).tolist()
        self._state = (maps, chunks, starts, types)
        return self._state

    @staticmethod
    def supports(arrow_type) -> bool:
        """Binary, or a struct with a binary ``bytes`` field (datasets' ``Image``)."""
        import pyarrow as pa

        if pa.types.is_struct(arrow_type) and arrow_type.get_field_index("bytes") >= 0:
            arrow_type = arrow_type.field("bytes").type
        return pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type)

    def __getstate__(self):
        return {"files": self.files, "column": self.column}

    def __setstate__(self, state):
        self.__init__(state["files"], state["column"])

    # ---- reading
    def get(self, index: int) -> bytes | str | None:
        """The encoded image of row ``index``; else its path (an Image feature
        without bytes), else None."""
        _, chunks, starts, _ = self._state or self._open()
        if not 0 <= index < starts[-1]:
            raise IndexError(f"row {index} of {starts[-1]}")
        k = bisect.bisect_right(starts, index) - 1
        data, paths = chunks[k]
        row = index - starts[k]
        value = data[row].as_py() if data is not None else None
        if value is None:
            return paths[row].as_py() if paths is not None else None
        self._since_release += len(value)
        if self._since_release >= RELEASE_EVERY_BYTES:
            self.release()
        return value

    def release(self) -> None:
        """Drop this process's resident pages of the maps (they stay valid)."""
        self._since_release = 0
        if self._state is not None and hasattr(mmap, "MADV_DONTNEED"):
            for mapped in self._state[0]:
                mapped.madvise(mmap.MADV_DONTNEED)


def _arrow_reader(table, column: str) -> ArrowImageBytes | None:
    """An :class:`ArrowImageBytes` for ``table[column]`` when the table is
    exactly its Arrow files (no index mapping, same column type), else None."""
    files = [c["filename"] for c in (getattr(table, "cache_files", None) or [])]
    if not files or getattr(table, "_indices", None) is not None or not all(os.path.isfile(f) for f in files):
        return None
    arrow_type = table.data.schema.field(column).type
    if not ArrowImageBytes.supports(arrow_type):
        return None
    reader = ArrowImageBytes(files, column)
    try:
        _, _, starts, types = reader._open()
        fits = starts[-1] == len(table) and types == {arrow_type}
    except Exception:  # not the Arrow stream files datasets writes: its own row access still works
        return None
    finally:
        reader._state = None  # the parent only checks; each reading process maps the files itself
    return reader if fits else None


class HFImageDataset(LabeledDataset):
    """One split of a ``datasets.Dataset``: ``(PIL RGB image, label)`` per row."""

    def __init__(self, table, image_column: str, labels: np.ndarray):
        self.table = table.select_columns([image_column])
        self.image_column = image_column
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.reader = _arrow_reader(table, image_column)

    def image(self, index: int) -> Image.Image:
        if self.reader is not None:
            value = self.reader.get(int(index))
            if isinstance(value, bytes):
                return _decode(value)
            if isinstance(value, str) and os.path.isfile(value):
                with Image.open(value) as img:
                    return img.convert("RGB")
            # a path relative to an archive or a hub URL: datasets knows how to open it
        return self._image_from_datasets(index)

    def _image_from_datasets(self, index: int) -> Image.Image:
        value = self.table[int(index)][self.image_column]
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        if isinstance(value, dict) and value.get("bytes") is not None:  # an undecoded Image feature
            return _decode(value["bytes"])
        if isinstance(value, dict) and value.get("path"):
            value = value["path"]
        if isinstance(value, (str, os.PathLike)):
            with Image.open(value) as img:
                return img.convert("RGB")
        if isinstance(value, (bytes, bytearray)):
            return _decode(bytes(value))
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
