"""Where each dataset's images and labels come from.

A dataset can lie on disk in several layouts (:data:`LAYOUTS`): its Hugging
Face copy as FusionBench reads it (``hf``: a local ``save_to_disk``/parquet
folder under ``<root>/hf/<hub id>`` or the HF cache), the folders of the task
vectors code (``task_vectors``: ``sun397/train|val``, ``EuroSAT_splits``,
``dtd/train|val``, ``svhn/``, ``resisc45`` with its split files), and
torchvision's (``torchvision``). ``open_source(name, root)`` reads the first
layout present (or the one named) and returns its splits as
:class:`~cl_merge.data.base.LabeledDataset` objects (``train``, ``test`` and,
where the layout ships one, ``val``) with labels in the registry's order, and
the layout used. Datasets without a test split get one carved with the fixed
seed ``TEST_SPLIT_SEED`` (stratified, ``DatasetInfo.test_fraction``).

When no layout is present, one DataError lists each layout looked for and
what it is missing, and how to get the data. Image files are decoded with PIL,
per item (in DataLoader workers): no loader reads every image up front.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import cl_merge._torchvision_compat  # noqa: F401  (must run before torchvision is imported)
from cl_merge.data._safe_pickle import safe_load
from cl_merge.data.base import ArrayImageDataset, CallableImageDataset, FileImageDataset, LabeledDataset, TaskSplit
from cl_merge.data.idx import find_idx, read_idx
from cl_merge.data.registry import DatasetInfo, get_dataset_info
from cl_merge.data.sampling import stratified_split
from cl_merge.errors import DataError

log = logging.getLogger(__name__)

TEST_SPLIT_SEED = 0
# Debian's dataset-fashion-mnist package installs the original gzipped IDX files here.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")

Splits = dict[str, LabeledDataset]


def _missing(info: DatasetInfo, root: Path, paths: list[str]) -> DataError:
    return DataError(
        f"{info.name}: missing under {root}: {', '.join(paths)}; to get it: {info.how_to_get}"
    )


def _require(info: DatasetInfo, root: Path, relative: list[str]) -> None:
    absent = [p for p in relative if not (root / p).exists()]
    if absent:
        raise _missing(info, root, absent)


def _torchvision_download(info: DatasetInfo, build: Callable[[], object]) -> None:
    """Let torchvision download (and checksum) the files; wrap its errors."""
    try:
        build()
    except Exception as exc:  # network errors, checksum mismatches
        raise DataError(f"{info.name}: download failed ({type(exc).__name__}: {exc})") from None


def _carve_test(info: DatasetInfo, everything: LabeledDataset) -> Splits:
    rest, test = stratified_split(everything.labels, info.test_fraction, seed=TEST_SPLIT_SEED)
    return {"train": TaskSplit(everything, rest), "test": TaskSplit(everything, test)}


# --------------------------------------------------------------------- IDX family
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_splits(info: DatasetInfo, folders: list[Path], files: dict[str, tuple[str, str]]) -> Splits:
    """Read IDX pairs from the first folder that has all of them (plain or .gz)."""
    for folder in folders:
        found = {split: [find_idx(folder, stem) for stem in stems] for split, stems in files.items()}
        if all(p is not None for paths in found.values() for p in paths):
            out = {}
            for split, (images, labels) in found.items():
                x, y = read_idx(images), read_idx(labels).astype(np.int64)
                if x.ndim != 3 or x.shape[0] != y.shape[0]:
                    raise DataError(f"{images}: expected (N, H, W) images matching {labels}, got {x.shape} and {y.shape}")
                out[split] = (x.astype(np.uint8), y)
            return out
    folder = folders[0]  # <root>/<Name>/raw
    absent = [f"{folder.parent.name}/raw/{s}[.gz]" for stems in files.values() for s in stems if find_idx(folder, s) is None]
    raise _missing(info, folder.parent.parent, absent)


def _mnist_like(tv_class: str, folder: str) -> Callable:
    def load(info: DatasetInfo, root: Path, download: bool) -> Splits:
        raw = root / folder / "raw"
        if download and not all(find_idx(raw, s) for stems in _IDX_FILES.values() for s in stems):
            import torchvision.datasets as tvd

            _torchvision_download(info, lambda: getattr(tvd, tv_class)(str(root), train=True, download=True))
        folders = [raw]
        if info.name == "fashion_mnist":
            folders.append(DEBIAN_FASHION_MNIST)
        data = _idx_splits(info, folders, _IDX_FILES)
        return {split: ArrayImageDataset(x, y) for split, (x, y) in data.items()}

    return load


def _emnist_letters(info: DatasetInfo, root: Path, download: bool) -> Splits:
    raw = root / "EMNIST" / "raw"
    files = {
        split: (f"emnist-letters-{split}-images-idx3-ubyte", f"emnist-letters-{split}-labels-idx1-ubyte")
        for split in ("train", "test")
    }
    if download and not all(find_idx(raw, s) for stems in files.values() for s in stems):
        import torchvision.datasets as tvd

        _torchvision_download(info, lambda: tvd.EMNIST(str(root), split="letters", train=True, download=True))
    out = {}
    for split, (x, y) in _idx_splits(info, [raw], files).items():
        if y.min() < 1 or y.max() > 26:
            raise DataError(f"{raw}: EMNIST letters labels must be 1..26, found {y.min()}..{y.max()}")
        # raw EMNIST stores each image transposed; transpose back so letters read upright
        out[split] = ArrayImageDataset(np.ascontiguousarray(x.transpose(0, 2, 1)), y - 1)
    return out


# --------------------------------------------------------------------- CIFAR
def _cifar(folder: str, train_files: list[str], test_files: list[str], label_key: str, tv_class: str) -> Callable:
    def read(info: DatasetInfo, base: Path, names: list[str]) -> ArrayImageDataset:
        images, labels = [], []
        for name in names:
            batch = safe_load((base / name).read_bytes(), source=str(base / name))
            if isinstance(batch, dict):  # Python 3 pickles keep bytes keys; latin1 gives str for Python 2 ones
                batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
            if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
                raise DataError(f"{base / name}: not a CIFAR batch (needs 'data' and '{label_key}')")
            data = np.asarray(batch["data"], dtype=np.uint8)
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[label_key], dtype=np.int64))
        return ArrayImageDataset(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels))

    def load(info: DatasetInfo, root: Path, download: bool) -> Splits:
        base = root / folder
        if download and not all((base / n).is_file() for n in train_files + test_files):
            import torchvision.datasets as tvd

            _torchvision_download(info, lambda: getattr(tvd, tv_class)(str(root), train=True, download=True))
        _require(info, root, [f"{folder}/{n}" for n in train_files + test_files])
        return {"train": read(info, base, train_files), "test": read(info, base, test_files)}

    return load


# --------------------------------------------------------------------- torchvision file datasets
def _paths_and_labels(ds) -> tuple[list[str], np.ndarray]:
    """(image paths, labels) from a torchvision file-based dataset, without decoding images."""
    for paths_attr, labels_attr in (("_image_files", "_labels"), ("_images", "_labels")):
        if hasattr(ds, paths_attr) and hasattr(ds, labels_attr):
            return [str(p) for p in getattr(ds, paths_attr)], np.asarray(getattr(ds, labels_attr), dtype=np.int64)
    for attr in ("_samples", "samples"):
        if hasattr(ds, attr):
            samples = getattr(ds, attr)
            return [str(p) for p, _ in samples], np.asarray([int(t) for _, t in samples], dtype=np.int64)
    raise DataError(f"{type(ds).__name__}: this torchvision version exposes no (path, label) list")


def _tv_build(info: DatasetInfo, root: Path, cls, download: bool, **kwargs):
    try:
        return cls(str(root), **({"download": True} if download else {}), **kwargs)
    except (RuntimeError, ValueError) as exc:  # "Dataset not found or corrupted", broken download URLs
        raise DataError(f"{info.name}: torchvision cannot load it from {root} ({exc}); {info.how_to_get}") from None


def _tv_files(tv_class: str, split_args: dict[str, dict], *, can_download: bool = True, **fixed) -> Callable:
    def load(info: DatasetInfo, root: Path, download: bool) -> Splits:
        import torchvision.datasets as tvd

        cls = getattr(tvd, tv_class)
        out = {}
        for split, kwargs in split_args.items():
            paths, labels = _paths_and_labels(_tv_build(info, root, cls, download and can_download, **kwargs, **fixed))
            out[split] = FileImageDataset(paths, labels)
        return out

    return load


def _dtd_torchvision(info: DatasetInfo, root: Path, download: bool) -> Splits:
    """Partition 1 as task vectors use it: train1 + val1 train, test1 tests (the
    validation split is then carved from that training set)."""
    parts = _tv_files("DTD", {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}},
                      partition=1)(info, root, download)
    train = FileImageDataset(list(parts["train"].paths) + list(parts["val"].paths),
                             np.concatenate([parts["train"].labels, parts["val"].labels]))
    return {"train": train, "test": parts["test"]}


def _sun397(info: DatasetInfo, root: Path, download: bool) -> Splits:
    import torchvision.datasets as tvd

    ds = _tv_build(info, root, tvd.SUN397, download)
    paths, labels = _paths_and_labels(ds)
    everything = FileImageDataset(paths, labels)
    base = (root / "SUN397").resolve()
    # the official partition 1 (50 train + 50 test images per class) when its lists are present
    for folder in (root / "SUN397", root / "SUN397" / "Partitions"):
        train_list, test_list = folder / "Training_01.txt", folder / "Testing_01.txt"
        if train_list.is_file() and test_list.is_file():
            # keys relative to <root>/SUN397, so a root whose path itself contains "SUN397" still matches
            position = {"/" + Path(p).resolve().relative_to(base).as_posix(): i for i, p in enumerate(paths)}

            def pick(listing: Path) -> TaskSplit:
                keys = [line.strip().replace("\\", "/") for line in listing.read_text().splitlines() if line.strip()]
                absent = [k for k in keys if k not in position]
                if absent:
                    raise DataError(f"{listing}: {len(absent)} listed images are not in {root / 'SUN397'} (e.g. {absent[0]})")
                return TaskSplit(everything, sorted(position[k] for k in keys))

            return {"train": pick(train_list), "test": pick(test_list)}
    log.warning("sun397: no Training_01.txt/Testing_01.txt under %s; carving a seeded test split "
                "(not the published partition)", root / "SUN397")
    return _carve_test(info, everything)


def _pcam(info: DatasetInfo, root: Path, download: bool) -> Splits:
    if importlib.util.find_spec("h5py") is None:
        raise DataError("pcam: reading the PCAM .h5 files needs h5py; install it with: pip install 'cl_merge[pcam]' "
                        "(or pip install h5py)")
    import h5py
    import torchvision.datasets as tvd

    names = {"train": "train", "val": "valid", "test": "test"}
    out = {}
    for split in names:
        ds = _tv_build(info, root, tvd.PCAM, download, split=split)
        with h5py.File(root / "pcam" / f"camelyonpatch_level_2_split_{names[split]}_y.h5", "r") as f:
            labels = np.asarray(f["y"]).reshape(-1).astype(np.int64)
        out[split] = CallableImageDataset(_PcamImage(ds), labels)
    return out


class _PcamImage:
    """Picklable ``i -> image`` over torchvision's PCAM (opened per access, so workers can share it)."""

    def __init__(self, ds):
        self.ds = ds

    def __call__(self, index: int):
        return self.ds[index][0]


def _array_tv(tv_class: str, split_args: dict[str, dict], to_arrays: Callable, *, can_download: bool = True,
              subdir: str | None = None) -> Callable:
    """torchvision datasets that hold every image in memory (SVHN, STL10, FER2013)."""

    def load(info: DatasetInfo, root: Path, download: bool) -> Splits:
        import torchvision.datasets as tvd

        base = root / subdir if subdir else root
        out = {}
        for split, kwargs in split_args.items():
            ds = _tv_build(info, base, getattr(tvd, tv_class), download and can_download, **kwargs)
            out[split] = ArrayImageDataset(*to_arrays(info, ds))
        return out

    return load


def _svhn(subdir: str | None) -> Callable:
    """SVHN's ``{train,test}_32x32.mat`` read with scipy (torchvision's reader
    refuses files whose md5 differs from the original, e.g. re-saved copies)."""

    def load(info: DatasetInfo, root: Path, download: bool) -> Splits:
        base = root / subdir if subdir else root
        if download and not all((base / f"{s}_32x32.mat").is_file() for s in ("train", "test")):
            import torchvision.datasets as tvd

            for split in ("train", "test"):
                _torchvision_download(info, lambda split=split: tvd.SVHN(str(base), split=split, download=True))
        from scipy.io import loadmat

        out = {}
        for split in ("train", "test"):
            path = base / f"{split}_32x32.mat"
            try:
                mat = loadmat(str(path))
                images, labels = np.asarray(mat["X"], dtype=np.uint8), np.asarray(mat["y"], dtype=np.int64).reshape(-1)
            except (OSError, ValueError, KeyError) as exc:
                raise DataError(f"{path}: not an SVHN .mat file with X and y ({type(exc).__name__}: {exc})") from None
            if images.ndim != 4 or images.shape[:3] != (32, 32, 3) or images.shape[3] != len(labels):
                raise DataError(f"{path}: expected X of shape (32, 32, 3, N) matching y, got {images.shape}")
            # the digit 0 is stored as label 10
            out[split] = ArrayImageDataset(np.ascontiguousarray(images.transpose(3, 0, 1, 2)), labels % 10)
        return out

    return load


def _fer2013(info: DatasetInfo, root: Path, download: bool) -> Splits:
    """``fer2013/fer2013.csv`` (or ``icml_face_data.csv``): Training rows train,
    PublicTest + PrivateTest rows test (7,178 images, as torchvision and CLIP's benchmark)."""
    import csv

    folder = root / "fer2013"
    path = next((folder / n for n in ("fer2013.csv", "icml_face_data.csv") if (folder / n).is_file()), None)
    if path is None:
        raise _missing(info, root, ["fer2013/fer2013.csv or fer2013/icml_face_data.csv"])
    images = {"train": [], "test": []}
    labels = {"train": [], "test": []}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
        missing = {"emotion", "pixels", "Usage"} - set(reader.fieldnames)
        if missing:
            raise DataError(f"{path}: not a FER2013 csv (missing columns {', '.join(sorted(missing))})")
        for row in reader:
            split = "train" if row["Usage"].strip() == "Training" else "test"
            pixels = np.asarray(row["pixels"].split(), dtype=np.uint8)
            if pixels.size != 48 * 48:
                raise DataError(f"{path}: row {reader.line_num} has {pixels.size} pixels, not 48x48")
            images[split].append(pixels.reshape(48, 48))
            labels[split].append(int(row["emotion"]))
    return {s: ArrayImageDataset(np.stack(images[s]) if images[s] else np.zeros((0, 48, 48), np.uint8), labels[s])
            for s in ("train", "test")}


def _chw(info, ds):
    return np.ascontiguousarray(np.asarray(ds.data, dtype=np.uint8).transpose(0, 2, 3, 1)), np.asarray(ds.labels)


# --------------------------------------------------------------------- folder datasets
def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _folder_dataset(info: DatasetInfo, base: Path) -> FileImageDataset:
    """``base/<folder>/<image>`` with the registry's folder names in label order."""
    absent = [name for name in info.folder_names if not (base / name).is_dir()]
    if absent:
        shown = ", ".join(absent[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
        raise DataError(f"{info.name}: missing class folders under {base}: {shown}; to get it: {info.how_to_get}")
    paths, labels = [], []
    for label, name in enumerate(info.folder_names):
        files = _image_files(base / name)
        paths += [str(p) for p in files]
        labels += [label] * len(files)
    return FileImageDataset(paths, labels)


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").replace("/", " ").lower().split())


def _named_folders(info: DatasetInfo, base: Path, to_name: Callable[[str], str]) -> FileImageDataset:
    """``base/<class folder>/<image>``: each folder's class found by name in the registry
    (``to_name`` turns the folder name into a class name), so the folder order never
    decides the labels."""
    by_name = {_norm(n): i for i, n in enumerate(info.classnames)}
    by_name.update({_norm(n): i for i, n in enumerate(info.folder_names or ())})
    folders = sorted(p for p in base.iterdir() if p.is_dir())
    unknown = [f.name for f in folders if _norm(to_name(f.name)) not in by_name]
    if unknown:
        raise DataError(f"{info.name}: class folders under {base} that match no {info.name} class: "
                        f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    paths, labels = [], []
    for folder in folders:
        files = _image_files(folder)
        paths += [str(p) for p in files]
        labels += [by_name[_norm(to_name(folder.name))]] * len(files)
    return FileImageDataset(paths, labels)


def _resisc45(info: DatasetInfo, root: Path, download: bool) -> Splits:
    home = next((c for c in (root / "resisc45", root) if (c / "NWPU-RESISC45").is_dir()), root / "resisc45")
    everything = _folder_dataset(info, home / "NWPU-RESISC45")
    lists = {s: home / f"resisc45-{s}.txt" for s in ("train", "val", "test")}
    if all(p.is_file() for p in lists.values()):  # the standard split files (torchgeo's, task vectors'), by file name
        position = {Path(p).name: i for i, p in enumerate(everything.paths)}
        out = {}
        for split, listing in lists.items():
            names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
            absent = [n for n in names if n not in position]
            if absent:
                raise DataError(f"{listing}: {len(absent)} listed images are not in {home / 'NWPU-RESISC45'} (e.g. {absent[0]})")
            out[split] = TaskSplit(everything, sorted(position[n] for n in names))
        return out
    log.warning("resisc45: no resisc45-{train,val,test}.txt next to %s; carving a seeded test split "
                "(not the published one)", home / "NWPU-RESISC45")
    return _carve_test(info, everything)


def _imagenet_r(info: DatasetInfo, root: Path, download: bool) -> Splits:
    return _carve_test(info, _folder_dataset(info, root / "imagenet-r"))


# --------------------------------------------------------------------- task vectors' folder layouts
def _tv_layout_folders(folder: str, splits: dict[str, str], to_name: Callable[[str], str]) -> Callable:
    """ImageFolder splits as task vectors keep them: ``<root>/<folder>/<split>/<class>/*``
    (``splits`` maps our split names to theirs)."""

    def load(info: DatasetInfo, root: Path, download: bool) -> Splits:
        return {ours: _named_folders(info, root / folder / theirs, to_name) for ours, theirs in splits.items()}

    return load


def _sun397_folder_name(folder: str) -> str:
    return folder[2:] if len(folder) > 2 and folder[1] == "_" else folder  # "a_abbey" -> "abbey"


# --------------------------------------------------------------------- Hugging Face copies
def _hf_local(info: DatasetInfo, root: Path) -> Path:
    return root / info.hub.local_name


def _hf_layout(info: DatasetInfo, root: Path, download: bool) -> Splits:
    from cl_merge.data.hf import HFImageDataset, IMAGE_COLUMN_GUESSES, LABEL_COLUMN_GUESSES, is_local_hf, label_array, \
        open_hf, pick_column

    hub = info.hub
    local = _hf_local(info, root)
    source = local if is_local_hf(local) else hub.id
    tables = open_hf(source, config=hub.config, download=download, what=info.name)
    if hub.label_names is not None:  # the hub's label order, by name, onto the registry's
        by_name = {_norm(n): i for i, n in enumerate(info.classnames)}
        relabel = np.asarray([by_name[_norm(n)] for n in hub.label_names], dtype=np.int64)
    out = {}
    for ours, theirs in hub.splits:
        if theirs not in tables:
            raise DataError(f"{info.name}: the Hugging Face copy at {source} has no {theirs!r} split "
                            f"(splits: {', '.join(tables)})")
        table = tables[theirs]
        image = pick_column(table, None, IMAGE_COLUMN_GUESSES, "image", f"{info.name} ({source})")
        label = pick_column(table, None, LABEL_COLUMN_GUESSES, "label", f"{info.name} ({source})")
        labels = label_array(table, label, f"{info.name} ({source})")
        if hub.label_names is not None:
            if len(labels) and (labels.min() < 0 or labels.max() >= len(relabel)):
                raise DataError(f"{info.name} ({source}, {theirs}): labels span {labels.min()}..{labels.max()}, "
                                f"outside the hub's {len(relabel)} classes")
            labels = relabel[labels]
        out[ours] = HFImageDataset(table, image, labels)
    if "validation" in tables and all(t != "validation" for _, t in hub.splits):
        table = tables["validation"]
        label = pick_column(table, None, LABEL_COLUMN_GUESSES, "label", info.name)
        labels = label_array(table, label, info.name)
        out["val"] = HFImageDataset(table, pick_column(table, None, IMAGE_COLUMN_GUESSES, "image", info.name),
                                    relabel[labels] if hub.label_names is not None else labels)
    return out


# --------------------------------------------------------------------- offline packages
def _animal_mnist(info: DatasetInfo, root: Path, download: bool) -> Splits:
    names = ("animal_data_version_3.gz", "animal_label_version_3.gz")
    folder = root / "animal_mnist"  # a copy under the data root wins over the installed package
    if not all((folder / n).is_file() for n in names):
        spec = importlib.util.find_spec("animal_mnist")
        if spec is None or not spec.submodule_search_locations:
            raise DataError("animal_mnist: not under the data root (<root>/animal_mnist/*.gz) and the animal-mnist "
                            "package is not installed; install it with: pip install --no-deps animal-mnist==0.4")
        folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "Animal_MNIST"
    arrays = []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise DataError(f"animal_mnist: {path} is missing; reinstall with: pip install --no-deps --force-reinstall animal-mnist==0.4")
        with gzip.open(path, "rb") as f:
            # a pickle from the pinned package: unpickled with numpy-arrays-only globals
            arrays.append(safe_load(f.read(), source=str(path)))
    images, labels = arrays
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 3):
        raise DataError(f"animal_mnist: expected uint8 (N, 28, 28) images in {folder}, got {getattr(images, 'shape', type(images))}")
    return _carve_test(info, ArrayImageDataset(images, labels))


def _digits(info: DatasetInfo, root: Path, download: bool) -> Splits:
    if importlib.util.find_spec("sklearn") is None:
        raise DataError("digits: scikit-learn is not installed; install it with: pip install scikit-learn")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # values are 0..16; scale to 0..255 so the images use the full uint8 range
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return _carve_test(info, ArrayImageDataset(images, bunch.target))


# --------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class Layout:
    """One way a dataset can lie on disk. ``needs(info, root)`` lists what is
    missing (empty: present); ``load`` reads it; ``protocol`` names whose
    splits/labels it reproduces; ``can_download``: ``download=True`` can fetch it."""

    name: str
    needs: Callable[[DatasetInfo, Path], list[str]]
    load: Callable[[DatasetInfo, Path, bool], Splits]
    protocol: str
    can_download: bool = False


def _paths_needed(*relative: str | tuple[str, ...]) -> Callable[[DatasetInfo, Path], list[str]]:
    """Each item a path (or a tuple: any one of them) relative to the root."""

    def needs(info: DatasetInfo, root: Path) -> list[str]:
        out = []
        for item in relative:
            options = item if isinstance(item, tuple) else (item,)
            if not any((root / o).exists() for o in options):
                out.append(" or ".join(options))
        return out

    return needs


def _idx_needed(folder: str, stems: list[str], debian: Path | None = None) -> Callable[[DatasetInfo, Path], list[str]]:
    def needs(info: DatasetInfo, root: Path) -> list[str]:
        absent = [f"{folder}/raw/{s}[.gz]" for s in stems if find_idx(root / folder / "raw", s) is None]
        if absent and debian is not None and all(find_idx(debian, s) for s in stems):
            return []
        return absent

    return needs


def _hf_needed(info: DatasetInfo, root: Path) -> list[str]:
    from cl_merge.data.hf import hub_cache_has, is_local_hf

    if is_local_hf(_hf_local(info, root)):
        return []
    try:
        if hub_cache_has(info.hub.id):
            return []
    except DataError:
        pass
    return [f"{info.hub.local_name} (save_to_disk or parquet) or the HF cache of {info.hub.id}"]


def _nothing_needed(info: DatasetInfo, root: Path) -> list[str]:
    return []


_MNIST_STEMS = [s for stems in _IDX_FILES.values() for s in stems]
_EMNIST_STEMS = [f"emnist-letters-{split}-{kind}-idx{n}-ubyte" for split in ("train", "test")
                 for kind, n in (("images", 3), ("labels", 1))]
_TV = "torchvision's layout"
_TVEC = "task vectors' layout and splits"
_HFP = "FusionBench's Hugging Face copy and splits"


def _tv(needs, load, protocol=_TV, can_download=True) -> Layout:
    return Layout("torchvision", needs, load, protocol, can_download)


LAYOUTS: dict[str, dict[str, Layout]] = {
    "mnist": {"torchvision": _tv(_idx_needed("MNIST", _MNIST_STEMS), _mnist_like("MNIST", "MNIST"))},
    "fashion_mnist": {"torchvision": _tv(_idx_needed("FashionMNIST", _MNIST_STEMS, DEBIAN_FASHION_MNIST),
                                         _mnist_like("FashionMNIST", "FashionMNIST"))},
    "kmnist": {"torchvision": _tv(_idx_needed("KMNIST", _MNIST_STEMS), _mnist_like("KMNIST", "KMNIST"))},
    "emnist_letters": {"torchvision": _tv(_idx_needed("EMNIST", _EMNIST_STEMS), _emnist_letters)},
    "cifar10": {"torchvision": _tv(_paths_needed(*(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)),
                                                 "cifar-10-batches-py/test_batch"),
                                   _cifar("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                                          ["test_batch"], "labels", "CIFAR10"))},
    "cifar100": {"torchvision": _tv(_paths_needed("cifar-100-python/train", "cifar-100-python/test"),
                                    _cifar("cifar-100-python", ["train"], ["test"], "fine_labels", "CIFAR100"))},
    "svhn": {
        "task_vectors": Layout("task_vectors", _paths_needed("svhn/train_32x32.mat", "svhn/test_32x32.mat"),
                               _svhn("svhn"), _TVEC),
        "torchvision": _tv(_paths_needed("train_32x32.mat", "test_32x32.mat"), _svhn(None)),
    },
    "stl10": {"torchvision": _tv(_paths_needed("stl10_binary"),
                                 _array_tv("STL10", {"train": {"split": "train"}, "test": {"split": "test"}}, _chw))},
    # torchvision's FER2013 has no download argument (Kaggle needs an account)
    "fer2013": {"torchvision": _tv(_paths_needed(("fer2013/fer2013.csv", "fer2013/icml_face_data.csv")),
                                   _fer2013, can_download=False)},
    # torchvision's StanfordCars download raises (the original URL is gone), even when the files are there
    "stanford_cars": {"torchvision": _tv(
        _paths_needed("stanford_cars/devkit", "stanford_cars/cars_train", "stanford_cars/cars_test",
                      "stanford_cars/cars_test_annos_withlabels.mat"),
        _tv_files("StanfordCars", {"train": {"split": "train"}, "test": {"split": "test"}}, can_download=False),
        protocol=_TV + " (also task vectors')", can_download=False)},
    "gtsrb": {"torchvision": _tv(_paths_needed("gtsrb/GTSRB/Training", "gtsrb/GTSRB/Final_Test/Images",
                                               "gtsrb/GT-final_test.csv"),
                                 _tv_files("GTSRB", {"train": {"split": "train"}, "test": {"split": "test"}}),
                                 protocol=_TV + " (also task vectors')")},
    "dtd": {
        "task_vectors": Layout("task_vectors", _paths_needed("dtd/train", "dtd/val"),
                               _tv_layout_folders("dtd", {"train": "train", "test": "val"}, lambda f: f), _TVEC),
        "torchvision": _tv(_paths_needed("dtd/dtd/images", "dtd/dtd/labels"), _dtd_torchvision,
                           protocol=_TV + ", partition 1 with train1+val1 for training as task vectors"),
    },
    "flowers102": {"torchvision": _tv(_paths_needed("flowers-102/jpg", "flowers-102/imagelabels.mat",
                                                    "flowers-102/setid.mat"),
                                      _tv_files("Flowers102", {"train": {"split": "train"}, "val": {"split": "val"},
                                                               "test": {"split": "test"}}))},
    "oxford_pets": {"torchvision": _tv(_paths_needed("oxford-iiit-pet/images", "oxford-iiit-pet/annotations"),
                                       _tv_files("OxfordIIITPet", {"train": {"split": "trainval"},
                                                                   "test": {"split": "test"}}))},
    "food101": {"torchvision": _tv(_paths_needed("food-101/images", "food-101/meta"),
                                   _tv_files("Food101", {"train": {"split": "train"}, "test": {"split": "test"}}))},
    "rendered_sst2": {"torchvision": _tv(_paths_needed("rendered-sst2/train", "rendered-sst2/valid",
                                                       "rendered-sst2/test"),
                                         _tv_files("RenderedSST2", {"train": {"split": "train"},
                                                                    "val": {"split": "val"},
                                                                    "test": {"split": "test"}}))},
    "eurosat": {
        "task_vectors": Layout("task_vectors", _paths_needed("EuroSAT_splits/train", "EuroSAT_splits/val",
                                                             "EuroSAT_splits/test"),
                               _tv_layout_folders("EuroSAT_splits", {"train": "train", "val": "val", "test": "test"},
                                                  lambda f: f), _TVEC),
        "torchvision": _tv(_paths_needed("eurosat/2750"), lambda info, root, download: _carve_test(
            info, _tv_files("EuroSAT", {"all": {}})(info, root, download)["all"]),
            protocol=_TV + " with a seeded 10% test split (not the published split)"),
    },
    "sun397": {
        "task_vectors": Layout("task_vectors", _paths_needed("sun397/train", "sun397/val"),
                               _tv_layout_folders("sun397", {"train": "train", "test": "val"}, _sun397_folder_name),
                               _TVEC),
        "torchvision": _tv(_paths_needed("SUN397/ClassName.txt"), _sun397,
                           protocol=_TV + "; partition 1 (Training_01/Testing_01) when its lists are there"),
    },
    "pcam": {"torchvision": _tv(_paths_needed(*(f"pcam/camelyonpatch_level_2_split_{n}_{xy}.h5"
                                                for n in ("train", "valid", "test") for xy in "xy")), _pcam)},
    "resisc45": {"task_vectors": Layout("task_vectors",
                                        lambda info, root: [] if any((c / "NWPU-RESISC45").is_dir() for c in
                                                                     (root / "resisc45", root))
                                        else ["resisc45/NWPU-RESISC45/<class>/<image>.jpg"], _resisc45,
                                        _TVEC + " (resisc45-{train,val,test}.txt)")},
    "imagenet_r": {"folder": Layout("folder", lambda info, root: [] if (root / "imagenet-r").is_dir()
                                    else ["imagenet-r/<wnid>/<image>.jpg"], _imagenet_r,
                                    "imagenet-r/<wnid>/*, a seeded 20% test split")},
    "animal_mnist": {"package": Layout("package", _nothing_needed, _animal_mnist, "the animal-mnist package")},
    "digits": {"package": Layout("package", _nothing_needed, _digits, "scikit-learn's bundled digits")},
}
for _name, _layouts in LAYOUTS.items():
    _info = get_dataset_info(_name)
    if _info.hub is not None:
        _layouts["hf"] = Layout("hf", _hf_needed, _hf_layout, _HFP, can_download=True)


def layout_names(name: str) -> list[str]:
    """Layouts ``name`` can be read from, in the order they are looked for."""
    info = get_dataset_info(name)
    return [n for n in info.layouts if n in LAYOUTS[info.name]] + \
        [n for n in LAYOUTS[info.name] if n not in info.layouts]


def find_layout(name: str, root: Path, *, download: bool = False, layout: str | None = None) -> Layout:
    """The layout to read ``name`` from: ``layout`` if given, else the first one present
    under ``root``; with ``download`` and none present, the first that can download.
    DataError listing every layout looked for and what each is missing otherwise."""
    info = get_dataset_info(name)
    known = LAYOUTS[info.name]
    if layout is not None:
        if layout not in known:
            raise DataError(f"{info.name}: unknown layout {layout!r} (this dataset has: {', '.join(layout_names(name))})")
        chosen = known[layout]
        missing = chosen.needs(info, root)
        if missing and not (download and chosen.can_download):
            raise DataError(f"{info.name}: layout {layout!r} not found under {root}: missing {', '.join(missing)}; "
                            f"to get it: {info.how_to_get}")
        return chosen
    report = []
    for candidate in layout_names(name):
        missing = known[candidate].needs(info, root)
        if not missing:
            return known[candidate]
        report.append(f"{candidate} (missing {', '.join(missing)})")
    if download:
        for candidate in layout_names(name):
            # a hub download only when asked for by name: the default download is torchvision's
            if known[candidate].can_download and candidate != "hf":
                return known[candidate]
        if "hf" in known:
            return known["hf"]
    raise DataError(f"{info.name}: no copy found under {root}; layouts looked for: {'; '.join(report)}; "
                    f"to get it: {info.how_to_get}")


def open_source(name: str, root: Path, *, download: bool = False, layout: str | None = None) -> tuple[Splits, Layout]:
    """``(splits, layout used)``; labels in registry order, checked against the class list."""
    info = get_dataset_info(name)
    chosen = find_layout(info.name, Path(root), download=download, layout=layout)
    splits = chosen.load(info, Path(root), bool(download))
    for split, ds in splits.items():
        check_labels(ds.labels, info.num_classes, f"{info.name} ({chosen.name} layout, {split})")
    return splits, chosen


def check_labels(labels: np.ndarray, num_classes: int, what: str) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise DataError(f"{what}: label {int(bad[0])} is outside the class list (labels span "
                        f"{labels.min()}..{labels.max()}, {num_classes} class names)")


def load_source(name: str, root: Path, *, download: bool = False, layout: str | None = None) -> Splits:
    """The dataset's splits (``train``, ``test``, maybe ``val``) with labels in registry order."""
    return open_source(name, root, download=download, layout=layout)[0]
