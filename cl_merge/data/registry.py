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
class HubDataset:
    """A dataset on the Hugging Face hub as FusionBench reads it.

    ``splits`` maps our split names to the hub's; ``label_names`` gives the hub's
    label order by name when it differs from the registry's (the source then
    relabels to the registry order).
    """

    id: str
    config: str | None = None
    splits: tuple[tuple[str, str], ...] = (("train", "train"), ("test", "test"))
    label_names: tuple[str, ...] | None = None

    @property
    def local_name(self) -> str:
        """Where a local copy goes under the data root: ``hf/<owner>/<name>``."""
        return f"hf/{self.id}"


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
    hub: HubDataset | None = None  # the Hugging Face copy FusionBench uses
    layouts: tuple[str, ...] = ("torchvision",)  # layouts looked for, in this order (see sources.LAYOUTS)
    bundled: bool = False  # the data ships with a package: the data root is not needed

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def prompts(self, classname: str) -> list[str]:
        """Every template filled with ``classname``."""
        return [template.format(classname) for template in self.templates]


_TV = "pass download=True (torchvision downloads it)"
_HF = "or a Hugging Face copy: the HF cache of {id}, or save_to_disk/parquet files in <root>/hf/{id}"
_ALL = ("hf", "task_vectors", "torchvision")
_HF_TV = ("hf", "torchvision")


def _hub(id: str, **kwargs) -> HubDataset:
    return HubDataset(id, **kwargs)


def _get(text: str, hub: HubDataset | None) -> str:
    return text + ("; " + _HF.format(id=hub.id) if hub is not None else "")


def _info(name, classnames, templates, source, splits, test_fraction, how_to_get, *, hub=None, layouts=_HF_TV, **kw):
    return DatasetInfo(name, classnames, templates, source, splits, test_fraction, _get(how_to_get, hub),
                       hub=hub, layouts=layouts, **kw)


# FER2013 on the hub (clip-benchmark's webdataset, FusionBench's loader) labels classes alphabetically
_FER_HUB_ORDER = ("angry", "disgusted", "fearful", "happy", "neutral", "sad", "surprised")

_INFOS = [
    # TA8
    _info("sun397", C.SUN397, T.SUN397, "torchvision.datasets.SUN397", ("all",), 0.5,
          _TV + " or unpack SUN397.tar.gz from https://vision.princeton.edu/projects/2010/SUN/ into <root>/SUN397 "
          "(with Training_01.txt/Testing_01.txt for the published partition); or task vectors' <root>/sun397/{train,val}",
          hub=_hub("tanganke/sun397"), layouts=_ALL),
    _info("stanford_cars", C.STANFORD_CARS, T.STANFORD_CARS, "torchvision.datasets.StanfordCars", ("train", "test"), None,
          "the original download is gone (torchvision cannot download it); place cars_train/, cars_test/, devkit/ and "
          "cars_test_annos_withlabels.mat under <root>/stanford_cars (torchvision's and task vectors' layout)",
          hub=_hub("tanganke/stanford_cars")),
    _info("resisc45", C.RESISC45, T.RESISC45, "folder NWPU-RESISC45/<class>/<image>.jpg", ("all",), 0.2,
          "download NWPU-RESISC45 (https://www.tensorflow.org/datasets/catalog/resisc45) and unpack it to "
          "<root>/resisc45/NWPU-RESISC45; the resisc45-{train,val,test}.txt split files (task vectors') go next to it",
          folder_names=tuple(c.replace(" ", "_") for c in C.RESISC45), hub=_hub("tanganke/resisc45"),
          layouts=("hf", "task_vectors")),
    _info("eurosat", C.EUROSAT, T.EUROSAT, "torchvision.datasets.EuroSAT", ("all",), 0.1,
          _TV + " (then the test split is carved, not the published one); or task vectors' "
          "<root>/EuroSAT_splits/{train,val,test}/<Class>",
          folder_names=("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                        "PermanentCrop", "Residential", "River", "SeaLake"),
          hub=_hub("tanganke/eurosat"), layouts=_ALL),
    _info("svhn", C.MNIST, T.MNIST, "torchvision.datasets.SVHN", ("train", "test"), None,
          _TV + "; task vectors keep the .mat files in <root>/svhn",
          hub=_hub("ufldl-stanford/svhn", config="cropped_digits"), layouts=_ALL),
    _info("gtsrb", C.GTSRB, T.GTSRB, "torchvision.datasets.GTSRB", ("train", "test"), None, _TV,
          hub=_hub("tanganke/gtsrb")),
    _info("mnist", C.MNIST, T.MNIST, "torchvision.datasets.MNIST (IDX files)", ("train", "test"), None, _TV,
          hub=_hub("ylecun/mnist")),
    _info("dtd", C.DTD, T.DTD, "torchvision.datasets.DTD (partition 1: train1+val1 train, test1 tests)",
          ("train", "test"), None, _TV + "; or task vectors' <root>/dtd/{train,val}/<class>",
          hub=_hub("tanganke/dtd"), layouts=_ALL),
    # TALL14 additions
    _info("flowers102", C.FLOWERS102, T.FLOWERS102, "torchvision.datasets.Flowers102", ("train", "val", "test"), None,
          _TV, hub=_hub("dpdl-benchmark/oxford_flowers102")),
    _info("pcam", C.PCAM, T.PCAM, "torchvision.datasets.PCAM", ("train", "val", "test"), None,
          _TV + "; the .h5 files need h5py: pip install 'cl_merge[pcam]'", hub=_hub("1aurent/PatchCamelyon")),
    _info("fer2013", C.FER2013, T.FER2013, "torchvision.datasets.FER2013", ("train", "test"), None,
          "download fer2013.csv (or icml_face_data.csv) from "
          "https://www.kaggle.com/c/challenges-in-representation-learning-facial-expression-recognition-challenge "
          "into <root>/fer2013 (torchvision cannot download it)",
          hub=_hub("clip-benchmark/wds_fer2013", label_names=_FER_HUB_ORDER)),
    _info("oxford_pets", C.OXFORD_PETS, T.OXFORD_PETS, "torchvision.datasets.OxfordIIITPet", ("train", "test"), None,
          _TV, hub=_hub("timm/oxford-iiit-pet")),
    _info("stl10", C.STL10, T.STL10, "torchvision.datasets.STL10", ("train", "test"), None, _TV,
          hub=_hub("tanganke/stl10")),
    _info("cifar100", C.CIFAR100, T.CIFAR, "torchvision.datasets.CIFAR100 (python batches)", ("train", "test"), None,
          _TV, hub=_hub("tanganke/cifar100")),
    # TALL20 additions
    _info("cifar10", C.CIFAR10, T.CIFAR, "torchvision.datasets.CIFAR10 (python batches)", ("train", "test"), None, _TV,
          hub=_hub("tanganke/cifar10")),
    _info("food101", C.FOOD101, T.FOOD101, "torchvision.datasets.Food101", ("train", "test"), None, _TV,
          hub=_hub("ethz/food101", splits=(("train", "train"), ("test", "validation")))),
    _info("fashion_mnist", C.FASHION_MNIST, T.FASHION_MNIST,
          "IDX files: <root>/FashionMNIST/raw or Debian's dataset-fashion-mnist", ("train", "test"), None,
          "apt-get install dataset-fashion-mnist (files in /usr/share/datasets/fashion-mnist) or " + _TV,
          hub=_hub("zalando-datasets/fashion_mnist")),
    _info("emnist_letters", C.EMNIST_LETTERS, T.EMNIST_LETTERS, "torchvision.datasets.EMNIST(split='letters')",
          ("train", "test"), None, _TV, hub=_hub("tanganke/emnist_letters")),
    _info("kmnist", C.KMNIST, T.KMNIST, "torchvision.datasets.KMNIST (IDX files)", ("train", "test"), None, _TV,
          hub=_hub("tanganke/kmnist")),
    _info("rendered_sst2", C.RENDERED_SST2, T.RENDERED_SST2, "torchvision.datasets.RenderedSST2",
          ("train", "val", "test"), None, _TV, hub=_hub("nateraw/rendered-sst2")),
    # class-incremental
    _info("imagenet_r", tuple(n for _, n in C.IMAGENET_R), T.IMAGENET, "folder imagenet-r/<wnid>/<image>.jpg",
          ("all",), 0.2,
          "download https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar and unpack it into <root>",
          folder_names=tuple(w for w, _ in C.IMAGENET_R), layouts=("folder",)),
    # available offline
    _info("animal_mnist", C.ANIMAL_MNIST, T.ANIMAL_MNIST, "PyPI package animal-mnist 0.4 (gzipped numpy pickles)",
          ("all",), 0.2, "pip install --no-deps animal-mnist==0.4 (or put its .gz files in <root>/animal_mnist)",
          layouts=("package",)),
    _info("digits", C.DIGITS, T.DIGITS, "sklearn.datasets.load_digits (8x8, bundled with scikit-learn)",
          ("all",), 0.2, "pip install scikit-learn", layouts=("package",), bundled=True),
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
