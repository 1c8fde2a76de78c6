"""Dataset registry: class names, prompt templates and where the data comes from.

Canonical names are lowercase (``cifar100``, ``stanford_cars``, ...). The data root
is resolved as: explicit argument > environment variable ``CL_MERGE_DATA`` >
``~/.cache/cl_merge/data``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cl_merge.data import classnames as C
from cl_merge.data import templates as T
from cl_merge.errors import UnknownNameError, close_matches

DATA_ROOT_ENV = "CL_MERGE_DATA"
DEFAULT_DATA_ROOT = Path("~/.cache/cl_merge/data")


@dataclass(frozen=True)
class DatasetInfo:
    """What the rest of cl_merge needs to know about one dataset.

    ``classnames`` are in label order; ``templates`` are format strings with one
    ``{}``. ``splits`` names the splits the source ships; a missing ``val`` is carved
    from train, a missing ``test`` is carved from everything with a fixed seed
    (``test_fraction``) so that every run evaluates on the same images.
    """

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    source: str
    splits: tuple[str, ...] = ("train", "test")
    test_fraction: float | None = None
    how_to_get: str = ""
    folder_names: tuple[str, ...] | None = None  # on-disk class folders, in label order

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def prompts(self, classname: str) -> list[str]:
        """Every template filled with ``classname``."""
        return [template.format(classname) for template in self.templates]


_TV = "pass download=True (torchvision downloads it)"

_INFOS = [
    # TA8
    DatasetInfo("sun397", C.SUN397, T.SUN397, "torchvision.datasets.SUN397", ("all",), 0.5,
                _TV + " or unpack SUN397.tar.gz from https://vision.princeton.edu/projects/2010/SUN/ into <root>/SUN397"),
    DatasetInfo("stanford_cars", C.STANFORD_CARS, T.STANFORD_CARS, "torchvision.datasets.StanfordCars", ("train", "test"), None,
                "the original download is gone; place cars_train/, cars_test/, devkit/ and "
                "cars_test_annos_withlabels.mat under <root>/stanford_cars (torchvision's layout)"),
    DatasetInfo("resisc45", C.RESISC45, T.RESISC45, "folder NWPU-RESISC45/<class>/<image>.jpg", ("all",), 0.2,
                "download NWPU-RESISC45 (https://www.tensorflow.org/datasets/catalog/resisc45) and unpack it to "
                "<root>/resisc45/NWPU-RESISC45; optional resisc45-{train,val,test}.txt split files go next to it",
                folder_names=tuple(c.replace(" ", "_") for c in C.RESISC45)),
    DatasetInfo("eurosat", C.EUROSAT, T.EUROSAT, "torchvision.datasets.EuroSAT", ("all",), 0.1, _TV,
                folder_names=("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                              "PermanentCrop", "Residential", "River", "SeaLake")),
    DatasetInfo("svhn", C.MNIST, T.MNIST, "torchvision.datasets.SVHN", ("train", "test"), None, _TV),
    DatasetInfo("gtsrb", C.GTSRB, T.GTSRB, "torchvision.datasets.GTSRB", ("train", "test"), None, _TV),
    DatasetInfo("mnist", C.MNIST, T.MNIST, "torchvision.datasets.MNIST (IDX files)", ("train", "test"), None, _TV),
    DatasetInfo("dtd", C.DTD, T.DTD, "torchvision.datasets.DTD (partition 1)", ("train", "val", "test"), None, _TV),
    # TALL14 additions
    DatasetInfo("flowers102", C.FLOWERS102, T.FLOWERS102, "torchvision.datasets.Flowers102", ("train", "val", "test"), None, _TV),
    DatasetInfo("pcam", C.PCAM, T.PCAM, "torchvision.datasets.PCAM", ("train", "val", "test"), None,
                _TV + "; needs h5py: pip install h5py"),
    DatasetInfo("fer2013", C.FER2013, T.FER2013, "torchvision.datasets.FER2013", ("train", "test"), None,
                "download fer2013.csv (or icml_face_data.csv) from "
                "https://www.kaggle.com/c/challenges-in-representation-learning-facial-expression-recognition-challenge "
                "into <root>/fer2013"),
    DatasetInfo("oxford_pets", C.OXFORD_PETS, T.OXFORD_PETS, "torchvision.datasets.OxfordIIITPet", ("train", "test"), None, _TV),
    DatasetInfo("stl10", C.STL10, T.STL10, "torchvision.datasets.STL10", ("train", "test"), None, _TV),
    DatasetInfo("cifar100", C.CIFAR100, T.CIFAR, "torchvision.datasets.CIFAR100 (python batches)", ("train", "test"), None, _TV),
    # TALL20 additions
    DatasetInfo("cifar10", C.CIFAR10, T.CIFAR, "torchvision.datasets.CIFAR10 (python batches)", ("train", "test"), None, _TV),
    DatasetInfo("food101", C.FOOD101, T.FOOD101, "torchvision.datasets.Food101", ("train", "test"), None, _TV),
    DatasetInfo("fashion_mnist", C.FASHION_MNIST, T.FASHION_MNIST,
                "IDX files: <root>/FashionMNIST/raw or Debian's dataset-fashion-mnist", ("train", "test"), None,
                "apt-get install dataset-fashion-mnist (files in /usr/share/datasets/fashion-mnist) or " + _TV),
    DatasetInfo("emnist_letters", C.EMNIST_LETTERS, T.EMNIST_LETTERS, "torchvision.datasets.EMNIST(split='letters')",
                ("train", "test"), None, _TV),
    DatasetInfo("kmnist", C.KMNIST, T.KMNIST, "torchvision.datasets.KMNIST (IDX files)", ("train", "test"), None, _TV),
    DatasetInfo("rendered_sst2", C.RENDERED_SST2, T.RENDERED_SST2, "torchvision.datasets.RenderedSST2",
                ("train", "val", "test"), None, _TV),
    # class-incremental
    DatasetInfo("imagenet_r", tuple(n for _, n in C.IMAGENET_R), T.IMAGENET, "folder imagenet-r/<wnid>/<image>.jpg",
                ("all",), 0.2,
                "download https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar and unpack it into <root>",
                folder_names=tuple(w for w, _ in C.IMAGENET_R)),
    # available offline
    DatasetInfo("animal_mnist", C.ANIMAL_MNIST, T.ANIMAL_MNIST, "PyPI package animal-mnist 0.4 (gzipped numpy pickles)",
                ("all",), 0.2, "pip install --no-deps animal-mnist==0.4"),
    DatasetInfo("digits", C.DIGITS, T.DIGITS, "sklearn.datasets.load_digits (8x8, bundled with scikit-learn)",
                ("all",), 0.2, "pip install scikit-learn"),
]

REGISTRY: dict[str, DatasetInfo] = {info.name: info for info in _INFOS}

# Benchmark task lists (names in REGISTRY), in the order the literature lists them.
TA8 = ("sun397", "stanford_cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
TALL14 = TA8 + ("flowers102", "pcam", "fer2013", "oxford_pets", "stl10", "cifar100")
TALL20 = TALL14 + ("cifar10", "food101", "fashion_mnist", "emnist_letters", "kmnist", "rendered_sst2")


def available_datasets() -> list[str]:
    return sorted(REGISTRY)


def get_dataset_info(name: str) -> DatasetInfo:
    """Registry entry for ``name``; UnknownNameError listing close matches otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownNameError(
            f"unknown dataset {name!r}{close_matches(name, REGISTRY)}; available: {', '.join(available_datasets())}"
        ) from None


def resolve_data_root(root: str | os.PathLike | None = None) -> Path:
    """``root`` if given, else ``$CL_MERGE_DATA``, else ``~/.cache/cl_merge/data``."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        return Path(env).expanduser()
    return DEFAULT_DATA_ROOT.expanduser()
