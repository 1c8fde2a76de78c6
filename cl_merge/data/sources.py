"""Where each dataset's images and labels come from.

``load_source(name, root, download=...)`` returns the dataset's own splits as
:class:`~cl_merge.data.base.LabeledDataset` objects: a dict with ``train``,
``test`` and, where the dataset ships one, ``val``. Datasets without a test split
get one carved with the fixed seed ``TEST_SPLIT_SEED`` (stratified,
``DatasetInfo.test_fraction``), so every run tests on the same images.

Before any torchvision class is built the expected files are checked, so a
missing dataset raises one DataError listing what is missing under which root and
how to get it. Image files are decoded with PIL.
"""

from __future__ import annotations

import gzip
import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np

import cl_merge._torchvision_compat  # noqa: F401  (must run before torchvision is imported)
from cl_merge.data._safe_pickle import safe_load
from cl_merge.data.base import ArrayImageDataset, CallableImageDataset, FileImageDataset, LabeledDataset, TaskSplit
from cl_merge.data.idx import find_idx, read_idx
from cl_merge.data.registry import DatasetInfo, get_dataset_info
from cl_merge.data.sampling import stratified_split
from cl_merge.errors import DataError

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


def _tv_files(tv_class: str, required: list[str], split_args: dict[str, dict], **fixed) -> Callable:
    def load(info: DatasetInfo, root: Path, download: bool) -> Splits:
        import torchvision.datasets as tvd

        cls = getattr(tvd, tv_class)
        if not download:
            _require(info, root, required)
        out = {}
        for split, kwargs in split_args.items():
            try:
                ds = cls(str(root), download=download, **kwargs, **fixed)
            except RuntimeError as exc:  # torchvision's "Dataset not found or corrupted"
                raise DataError(f"{info.name}: torchvision cannot load it from {root} ({exc}); {info.how_to_get}") from None
            paths, labels = _paths_and_labels(ds)
            out[split] = FileImageDataset(paths, labels)
        return out

    return load


def _sun397(info: DatasetInfo, root: Path, download: bool) -> Splits:
    import torchvision.datasets as tvd

    if not download:
        _require(info, root, ["SUN397/ClassName.txt"])
    try:
        ds = tvd.SUN397(str(root), download=download)
    except RuntimeError as exc:
        raise DataError(f"{info.name}: torchvision cannot load it from {root} ({exc}); {info.how_to_get}") from None
    paths, labels = _paths_and_labels(ds)
    everything = FileImageDataset(paths, labels)
    # the official partition 1 (50 train + 50 test images per class) when its lists are present
    for folder in (root / "SUN397", root / "SUN397" / "Partitions"):
        train_list, test_list = folder / "Training_01.txt", folder / "Testing_01.txt"
        if train_list.is_file() and test_list.is_file():
            position = {p.replace("\\", "/").split("SUN397", 1)[-1]: i for i, p in enumerate(paths)}

            def pick(listing: Path) -> TaskSplit:
                keys = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
                absent = [k for k in keys if k not in position]
                if absent:
                    raise DataError(f"{listing}: {len(absent)} listed images are not in {root / 'SUN397'} (e.g. {absent[0]})")
                return TaskSplit(everything, sorted(position[k] for k in keys))

            return {"train": pick(train_list), "test": pick(test_list)}
    return _carve_test(info, everything)


def _pcam(info: DatasetInfo, root: Path, download: bool) -> Splits:
    if importlib.util.find_spec("h5py") is None:
        raise DataError("pcam: reading PCAM needs h5py; install it with: pip install h5py")
    import h5py
    import torchvision.datasets as tvd

    names = {"train": "train", "val": "valid", "test": "test"}
    if not download:
        _require(info, root, [f"pcam/camelyonpatch_level_2_split_{n}_{xy}.h5" for n in names.values() for xy in "xy"])
    out = {}
    for split in names:
        try:
            ds = tvd.PCAM(str(root), split=split, download=download)
        except RuntimeError as exc:
            raise DataError(f"{info.name}: torchvision cannot load it from {root} ({exc}); {info.how_to_get}") from None
        with h5py.File(root / "pcam" / f"camelyonpatch_level_2_split_{names[split]}_y.h5", "r") as f:
            labels = np.asarray(f["y"]).reshape(-1).astype(np.int64)
        out[split] = CallableImageDataset(lambda i, ds=ds: ds[i][0], labels)
    return out


def _array_tv(tv_class: str, required: list[str], split_args: dict[str, dict], to_arrays: Callable) -> Callable:
    """torchvision datasets that hold every image in memory (SVHN, STL10, FER2013)."""

    def load(info: DatasetInfo, root: Path, download: bool) -> Splits:
        import torchvision.datasets as tvd

        if not download and not any((root / r).exists() for r in required):
            raise _missing(info, root, required if len(required) == 1 else [" or ".join(required)])
        out = {}
        for split, kwargs in split_args.items():
            try:
                ds = getattr(tvd, tv_class)(str(root), download=download, **kwargs)
            except RuntimeError as exc:
                raise DataError(f"{info.name}: torchvision cannot load it from {root} ({exc}); {info.how_to_get}") from None
            out[split] = ArrayImageDataset(*to_arrays(info, ds))
        return out

    return load


def _chw(info, ds):
    return np.ascontiguousarray(np.asarray(ds.data, dtype=np.uint8).transpose(0, 2, 3, 1)), np.asarray(ds.labels)


def _fer_arrays(info, ds):
    images = np.stack([np.asarray(t, dtype=np.uint8) for t, _ in ds._samples])
    labels = [t for _, t in ds._samples]
    if any(t is None for t in labels):
        raise DataError("fer2013: the test split has no labels with train.csv/test.csv; use fer2013.csv or icml_face_data.csv")
    return images, np.asarray(labels)


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


def _resisc45(info: DatasetInfo, root: Path, download: bool) -> Splits:
    candidates = [root / "resisc45", root]
    home = next((c for c in candidates if (c / "NWPU-RESISC45").is_dir()), None)
    if home is None:
        raise _missing(info, root, ["resisc45/NWPU-RESISC45/<class>/<image>.jpg"])
    everything = _folder_dataset(info, home / "NWPU-RESISC45")
    lists = {s: home / f"resisc45-{s}.txt" for s in ("train", "val", "test")}
    if all(p.is_file() for p in lists.values()):  # the standard split files (torchgeo's), by file name
        position = {Path(p).name: i for i, p in enumerate(everything.paths)}
        out = {}
        for split, listing in lists.items():
            names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
            absent = [n for n in names if n not in position]
            if absent:
                raise DataError(f"{listing}: {len(absent)} listed images are not in {home / 'NWPU-RESISC45'} (e.g. {absent[0]})")
            out[split] = TaskSplit(everything, sorted(position[n] for n in names))
        return out
    return _carve_test(info, everything)


def _imagenet_r(info: DatasetInfo, root: Path, download: bool) -> Splits:
    if not (root / "imagenet-r").is_dir():
        raise _missing(info, root, ["imagenet-r/<wnid>/<image>.jpg"])
    return _carve_test(info, _folder_dataset(info, root / "imagenet-r"))


# --------------------------------------------------------------------- offline packages
def _animal_mnist(info: DatasetInfo, root: Path, download: bool) -> Splits:
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("animal_mnist: the animal-mnist package is not installed; install it with: "
                        "pip install --no-deps animal-mnist==0.4")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "Animal_MNIST"
    arrays = []
    for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
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


_LOADERS: dict[str, Callable[[DatasetInfo, Path, bool], Splits]] = {
    "mnist": _mnist_like("MNIST", "MNIST"),
    "fashion_mnist": _mnist_like("FashionMNIST", "FashionMNIST"),
    "kmnist": _mnist_like("KMNIST", "KMNIST"),
    "emnist_letters": _emnist_letters,
    "cifar10": _cifar("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", "CIFAR10"),
    "cifar100": _cifar("cifar-100-python", ["train"], ["test"], "fine_labels", "CIFAR100"),
    "svhn": _array_tv("SVHN", ["train_32x32.mat"], {"train": {"split": "train"}, "test": {"split": "test"}}, _chw),
    "stl10": _array_tv("STL10", ["stl10_binary"], {"train": {"split": "train"}, "test": {"split": "test"}}, _chw),
    "fer2013": _array_tv("FER2013", ["fer2013/fer2013.csv", "fer2013/icml_face_data.csv"],
                         {"train": {"split": "train"}, "test": {"split": "test"}}, _fer_arrays),
    "stanford_cars": _tv_files("StanfordCars", ["stanford_cars/devkit", "stanford_cars/cars_train", "stanford_cars/cars_test",
                                                "stanford_cars/cars_test_annos_withlabels.mat"],
                               {"train": {"split": "train"}, "test": {"split": "test"}}),
    "gtsrb": _tv_files("GTSRB", ["gtsrb/GTSRB/Training", "gtsrb/GTSRB/Final_Test/Images", "gtsrb/GT-final_test.csv"],
                       {"train": {"split": "train"}, "test": {"split": "test"}}),
    "dtd": _tv_files("DTD", ["dtd/dtd/images", "dtd/dtd/labels"],
                     {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}}, partition=1),
    "flowers102": _tv_files("Flowers102", ["flowers-102/jpg", "flowers-102/imagelabels.mat", "flowers-102/setid.mat"],
                            {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}}),
    "oxford_pets": _tv_files("OxfordIIITPet", ["oxford-iiit-pet/images", "oxford-iiit-pet/annotations"],
                             {"train": {"split": "trainval"}, "test": {"split": "test"}}),
    "food101": _tv_files("Food101", ["food-101/images", "food-101/meta"],
                         {"train": {"split": "train"}, "test": {"split": "test"}}),
    "rendered_sst2": _tv_files("RenderedSST2", ["rendered-sst2/train", "rendered-sst2/valid", "rendered-sst2/test"],
                               {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}}),
    "eurosat": lambda info, root, download: _carve_test(
        info, _tv_files("EuroSAT", ["eurosat/2750"], {"all": {}})(info, root, download)["all"]
    ),
    "sun397": _sun397,
    "pcam": _pcam,
    "resisc45": _resisc45,
    "imagenet_r": _imagenet_r,
    "animal_mnist": _animal_mnist,
    "digits": _digits,
}


def load_source(name: str, root: Path, *, download: bool = False) -> Splits:
    """The dataset's splits (``train``, ``test``, maybe ``val``) with labels in registry order."""
    info = get_dataset_info(name)
    splits = _LOADERS[info.name](info, Path(root), bool(download))
    for split, ds in splits.items():
        if len(ds) and (ds.labels.min() < 0 or ds.labels.max() >= info.num_classes):
            raise DataError(
                f"{info.name} ({split}): labels span {ds.labels.min()}..{ds.labels.max()} "
                f"but the registry has {info.num_classes} classes"
            )
    return splits
