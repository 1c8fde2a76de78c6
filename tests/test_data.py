"""Tests for cl_merge.data: registry, offline sources, torchvision layouts, tasks, sampling."""

import gzip
import pickle
from pathlib import Path

import cl_merge  # noqa: F401  (installs the torchvision shim first)
import numpy as np
import pytest
import torch
from PIL import Image

from cl_merge.data import (
    DATA_ROOT_ENV,
    TA8,
    TALL14,
    TALL20,
    TaskSpec,
    available_datasets,
    cache_tensors,
    check_class_splits,
    get_dataset_info,
    get_variant,
    k_shot_indices,
    load_source,
    load_task,
    resolve_data_root,
    sample_calibration,
    split_classes,
    stratified_split,
    with_transform,
)
from cl_merge.data.sources import DEBIAN_FASHION_MNIST
from cl_merge.errors import ConfigError, DataError, UnknownNameError

EXPECTED_CLASSES = {
    "sun397": 397, "stanford_cars": 196, "resisc45": 45, "eurosat": 10, "svhn": 10, "gtsrb": 43, "mnist": 10,
    "dtd": 47, "flowers102": 102, "pcam": 2, "fer2013": 7, "oxford_pets": 37, "stl10": 10, "cifar100": 100,
    "cifar10": 10, "food101": 101, "fashion_mnist": 10, "emnist_letters": 26, "kmnist": 10, "rendered_sst2": 2,
    "imagenet_r": 200, "animal_mnist": 10, "digits": 10,
}


# ------------------------------------------------------------------ helpers writing torchvision layouts
def write_idx(path: Path, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def fake_mnist(root: Path, folder: str, *, gz: bool, n_train=40, n_test=20, prefix=("train", "t10k"), stem=None):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    arrays = {}
    for split, n in zip(prefix, (n_train, n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        base = stem(split) if stem else f"{split}-%s-idx%d-ubyte"
        suffix = ".gz" if gz else ""
        write_idx(raw / ((base % ("images", 3)) + suffix), images)
        write_idx(raw / ((base % ("labels", 1)) + suffix), labels)
        arrays[split] = (images, labels)
    return arrays


# ------------------------------------------------------------------ registry
def test_registry_class_counts_and_templates():
    assert set(available_datasets()) == set(EXPECTED_CLASSES)
    for name, count in EXPECTED_CLASSES.items():
        info = get_dataset_info(name)
        assert info.num_classes == count, name
        assert len(set(info.classnames)) == count, f"{name} has duplicate class names"
        assert info.templates, name
        for template in info.templates:
            assert template.count("{}") == 1, (name, template)
            assert template.format("zebra").count("zebra") == 1
        assert info.prompts(info.classnames[0])[0] == info.templates[0].format(info.classnames[0])
    assert len(TA8) == 8 and len(TALL14) == 14 and len(TALL20) == 20 and len(set(TALL20)) == 20
    assert set(TALL20) <= set(available_datasets())


def test_registry_known_names_in_label_order():
    assert get_dataset_info("cifar10").classnames[:3] == ("airplane", "automobile", "bird")
    assert get_dataset_info("mnist").templates == ('a photo of the number: "{}".',)
    # EuroSAT follows torchvision's sorted folders: AnnualCrop, Forest, HerbaceousVegetation, ...
    assert get_dataset_info("eurosat").classnames[:3] == ("annual crop land", "forest", "brushland or shrubland")
    assert get_dataset_info("fer2013").classnames == ("angry", "disgusted", "fearful", "happy", "sad", "surprised", "neutral")
    imr = get_dataset_info("imagenet_r")
    assert imr.folder_names[1] == "n01484850" and imr.classnames[1] == "great white shark"
    assert list(imr.folder_names) == sorted(imr.folder_names)


def test_unknown_dataset_name_lists_close_matches():
    with pytest.raises(UnknownNameError, match=r"did you mean: cifar100") as err:
        get_dataset_info("cifar1000")
    assert "\n" not in str(err.value)
    with pytest.raises(UnknownNameError, match="did you mean"):
        load_task(TaskSpec("fashion_mnst"))


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "env"))
    assert resolve_data_root(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_root() == tmp_path / "env"
    monkeypatch.delenv(DATA_ROOT_ENV)
    assert resolve_data_root() == Path("~/.cache/cl_merge/data").expanduser()


# ------------------------------------------------------------------ real offline data
@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian_files(tmp_path):
    task = load_task(TaskSpec("fashion_mnist"), root=tmp_path, seed=0)
    assert len(task.train) + len(task.val) == 60000 and len(task.test) == 10000
    assert len(task.val) == 6000
    image, label = task.test[0]
    assert image.mode == "RGB" and image.size == (28, 28)
    assert label == 9  # the first Fashion-MNIST test image is an ankle boot
    assert np.bincount(task.test.labels).tolist() == [1000] * 10
    assert task.classnames[9] == "Ankle boot"  # FusionBench's name


def test_animal_mnist_from_package():
    pytest.importorskip("animal_mnist")
    splits = load_source("animal_mnist", Path("/nonexistent"))
    assert len(splits["train"]) == 8000 and len(splits["test"]) == 2000
    assert np.bincount(splits["test"].labels).tolist() == [200] * 10  # stratified 20% test
    assert set(splits["train"].indices).isdisjoint(splits["test"].indices)
    image, label = splits["test"][0]
    assert image.size == (28, 28) and image.mode == "RGB" and 0 <= label < 10
    again = load_source("animal_mnist", Path("/nonexistent"))
    assert np.array_equal(again["test"].indices, splits["test"].indices)  # fixed test split


def test_digits_from_sklearn():
    pytest.importorskip("sklearn")
    task = load_task(TaskSpec("digits", val_fraction=0.1), seed=3)
    assert len(task.train) + len(task.val) + len(task.test) == 1797
    image, label = task.train[0]
    assert image.size == (8, 8) and image.mode == "RGB"
    assert max(np.asarray(task.test[i][0]).max() for i in range(20)) == 255  # 16 scaled to 255


# ------------------------------------------------------------------ torchvision layouts written by the test
def test_mnist_torchvision_layout_plain_idx(tmp_path):
    arrays = fake_mnist(tmp_path, "MNIST", gz=False)
    task = load_task(TaskSpec("mnist", val_fraction=0.0), root=tmp_path)
    assert len(task.train) == 40 and len(task.val) == 0 and len(task.test) == 20
    image, label = task.test[3]
    assert label == 3
    assert np.array_equal(np.asarray(image)[..., 0], arrays["t10k"][0][3])


def test_kmnist_gzipped_idx_and_fashion_layout(tmp_path):
    fake_mnist(tmp_path, "KMNIST", gz=True)
    assert len(load_source("kmnist", tmp_path)["train"]) == 40
    fake_mnist(tmp_path, "FashionMNIST", gz=False, n_train=30)
    assert len(load_source("fashion_mnist", tmp_path)["train"]) == 30  # root wins over the Debian files


def test_emnist_letters_labels_shifted_and_images_transposed(tmp_path):
    raw = tmp_path / "EMNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.zeros((26, 28, 28), dtype=np.uint8)
    images[:, 0, 5] = 255  # stored transposed: the pixel belongs at row 5, column 0
    for split in ("train", "test"):
        write_idx(raw / f"emnist-letters-{split}-images-idx3-ubyte", images)
        write_idx(raw / f"emnist-letters-{split}-labels-idx1-ubyte", np.arange(1, 27, dtype=np.uint8))
    splits = load_source("emnist_letters", tmp_path)
    assert splits["train"].labels.tolist() == list(range(26))
    pixels = np.asarray(splits["train"][0][0])[..., 0]
    assert pixels[5, 0] == 255 and pixels[0, 5] == 0


def test_cifar10_and_cifar100_python_batches(tmp_path):
    rng = np.random.default_rng(0)
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    first = None
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(10, 3072), dtype=np.uint8)
        first = data if first is None else first
        (base / name).write_bytes(pickle.dumps({b"data": data, b"labels": list(range(10))}))
    splits = load_source("cifar10", tmp_path)
    assert len(splits["train"]) == 50 and len(splits["test"]) == 10
    image, label = splits["train"][0]
    assert image.size == (32, 32) and label == 0
    assert np.array_equal(np.asarray(image), first[0].reshape(3, 32, 32).transpose(1, 2, 0))

    base100 = tmp_path / "cifar-100-python"
    base100.mkdir()
    for name in ("train", "test"):
        data = rng.integers(0, 256, size=(100, 3072), dtype=np.uint8)
        (base100 / name).write_bytes(pickle.dumps({"data": data, "fine_labels": list(range(100)), "coarse_labels": [0] * 100}))
    task = load_task(TaskSpec("cifar100", classes=list(range(10, 20)), val_fraction=0.0), root=tmp_path)
    assert task.name == "cifar100[10-19]"
    assert task.test.labels.tolist() == list(range(10)) and task.classnames[0] == "bowl"


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_batch_cannot_run_code(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (base / name).write_bytes(pickle.dumps({"data": _Evil(), "labels": [0]}))
    with pytest.raises(DataError, match="refusing to unpickle builtins.print"):
        load_source("cifar10", tmp_path)


def _write_resisc45(home: Path, per_class: int = 5) -> list[str]:
    folders = get_dataset_info("resisc45").folder_names
    for c, folder in enumerate(folders):
        (home / "NWPU-RESISC45" / folder).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (6, 4), (c, i, 0)).save(home / "NWPU-RESISC45" / folder / f"{folder}_{i + 1:03d}.png")
    return list(folders)


def test_resisc45_folder_layout_seeded_split(tmp_path):
    folders = _write_resisc45(tmp_path / "resisc45")
    task = load_task(TaskSpec("resisc45", classes=["sea ice", "airplane"]), root=tmp_path, seed=0)
    assert task.classnames == ["sea ice", "airplane"] and task.class_ids == [folders.index("sea_ice"), 0]
    assert len(task.test) == 2 and len(task.val) == 2 and len(task.train) == 6  # 5 per class: 1 test, 1 val, 3 train
    image, label = task.test[0]
    assert image.size == (6, 4) and image.getpixel((0, 0))[0] == task.class_ids[label]


def test_resisc45_standard_split_files(tmp_path):
    home = tmp_path / "resisc45"
    folders = _write_resisc45(home, per_class=3)
    for split, number in (("train", 1), ("val", 2), ("test", 3)):
        (home / f"resisc45-{split}.txt").write_text("".join(f"{f}_{number:03d}.png\n" for f in folders))
    splits = load_source("resisc45", tmp_path)
    assert {k: len(v) for k, v in splits.items()} == {"train": 45, "val": 45, "test": 45}
    assert Path(splits["test"].source.paths[splits["test"].indices[0]]).name == "airplane_003.png"


def test_missing_files_error_names_root_and_files(tmp_path):
    with pytest.raises(DataError) as err:
        load_task(TaskSpec("mnist"), root=tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "train-images-idx3-ubyte" in message and "download=True" in message
    assert "\n" not in message
    with pytest.raises(DataError, match=r"cifar-10-batches-py/data_batch_1.*download=True"):
        load_source("cifar10", tmp_path)
    with pytest.raises(DataError, match=r"imagenet-r/<wnid>"):
        load_source("imagenet_r", tmp_path)
    with pytest.raises(DataError, match=r"dtd/dtd/images"):
        load_source("dtd", tmp_path)


# ------------------------------------------------------------------ k-shot, subsets, splits
def test_k_shot_exact_counts_and_determinism():
    labels = np.repeat(np.arange(5), 20)
    a = k_shot_indices(labels, 4, seed=0)
    assert np.bincount(labels[a]).tolist() == [4] * 5
    assert np.array_equal(a, k_shot_indices(labels, 4, seed=0))
    assert not np.array_equal(a, k_shot_indices(labels, 4, seed=1))
    with pytest.raises(DataError, match=r"k_shot=21 .*class 0 \('a'\).* 20 examples"):
        k_shot_indices(labels, 21, seed=0, classnames=list("abcde"))
    with pytest.raises(ConfigError):
        k_shot_indices(labels, 0, seed=0)


def test_task_k_shot_and_too_large(tmp_path):
    task = load_task(TaskSpec("animal_mnist", k_shot=8), seed=5)
    assert np.bincount(task.train.labels).tolist() == [8] * 10
    again = load_task(TaskSpec("animal_mnist", k_shot=8), seed=5)
    assert np.array_equal(task.train.indices, again.train.indices)
    with pytest.raises(DataError, match=r"k_shot=5000 is larger than class \d+ \('\w+'\)"):
        load_task(TaskSpec("animal_mnist", k_shot=5000))


def test_class_subset_remap_and_errors():
    task = load_task(TaskSpec("animal_mnist", classes=["zebra", 0, "cat"], max_test=30), seed=0)
    assert task.classnames == ["zebra", "bear", "cat"] and task.class_ids == [9, 0, 2]
    assert set(task.test.labels.tolist()) == {0, 1, 2} and len(task.test) == 30
    assert np.bincount(task.test.labels).tolist() == [10, 10, 10]
    assert task.name == "animal_mnist[zebra,0,cat]"
    source = task.test.source
    for i in range(3):
        assert task.class_ids[task.test.labels[i]] == source.labels[task.test.indices[i]]
    with pytest.raises(ConfigError, match="did you mean: zebra"):
        load_task(TaskSpec("animal_mnist", classes=["zebrra"]))
    with pytest.raises(ConfigError, match="out of range"):
        load_task(TaskSpec("animal_mnist", classes=[10]))
    with pytest.raises(ConfigError, match="repeats"):
        load_task(TaskSpec("animal_mnist", classes=[1, 1]))


def test_splits_disjoint_and_seeded():
    a = load_task(TaskSpec("animal_mnist", max_train=500), seed=0)
    b = load_task(TaskSpec("animal_mnist", max_train=500), seed=0)
    c = load_task(TaskSpec("animal_mnist", max_train=500), seed=1)
    train, val, test = (set(s.source.indices[s.indices].tolist()) for s in (a.train, a.val, a.test))
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(a.train) == 500 and np.bincount(a.train.labels).tolist() == [50] * 10
    assert np.array_equal(a.val.indices, b.val.indices) and np.array_equal(a.train.indices, b.train.indices)
    assert not np.array_equal(a.val.indices, c.val.indices)
    assert np.array_equal(a.test.indices, c.test.indices)  # the carved test split does not move with the seed
    rest, held = stratified_split(np.repeat(np.arange(3), 10), 0.2, seed=0)
    assert len(held) == 6 and not set(rest) & set(held)


def test_split_classes():
    assert split_classes(10, 5) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert split_classes(100, 10)[3] == list(range(30, 40))
    shuffled = split_classes(100, 10, order_seed=1)
    assert shuffled == split_classes(100, 10, order_seed=1) and shuffled != split_classes(100, 10)
    assert sorted(c for g in shuffled for c in g) == list(range(100))
    assert [len(g) for g in split_classes(10, 3, require_equal=False)] == [4, 3, 3]
    with pytest.raises(ConfigError, match="equal"):
        split_classes(10, 3)
    with pytest.raises(ConfigError):
        split_classes(3, 5)
    with pytest.raises(ConfigError, match="appears in class splits 0 and 1"):
        check_class_splits([[0, 1], [1, 2]], 10)
    with pytest.raises(ConfigError, match="out of range"):
        check_class_splits([[0, 10]], 10)
    with pytest.raises(ConfigError, match="unequal"):
        check_class_splits([[0, 1], [2]], 10, require_equal=True)
    check_class_splits(split_classes(200, 20), 200, require_equal=True, require_cover=True)


# ------------------------------------------------------------------ variants, transforms, calibration
def test_variants_are_deterministic_involutions():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8))
    same = lambda a, b: np.array_equal(np.asarray(a), np.asarray(b))  # noqa: E731
    invert = get_variant("invert")
    assert same(invert(invert(image)), image) and not same(invert(image), image)
    rot = get_variant("rotate90")
    assert same(rot(rot(rot(rot(image)))), image) and rot(image).size == (5, 7)
    assert same(get_variant("rotate180")(image), rot(rot(image)))
    assert same(get_variant("rotate270")(rot(image)), image)
    for name in ("hflip", "vflip", "transpose"):
        assert same(get_variant(name)(get_variant(name)(image)), image)
    assert same(get_variant("blur")(image), get_variant("blur")(image))
    with pytest.raises(UnknownNameError, match="did you mean: rotate90"):
        get_variant("rotate9")


def test_task_variant_applies_to_images():
    plain = load_task(TaskSpec("digits", max_test=5), seed=0)
    inverted = load_task(TaskSpec("digits", variant="invert", max_test=5), seed=0)
    assert inverted.name == "digits+invert"
    assert np.array_equal(255 - np.asarray(plain.test[0][0]), np.asarray(inverted.test[0][0]))


def test_with_transform_and_cache_tensors():
    task = load_task(TaskSpec("digits", max_test=20), seed=0)
    to_tensor = lambda img: torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255  # noqa: E731
    wrapped = with_transform(task.test, to_tensor)
    x, y = wrapped[3]
    assert x.shape == (3, 8, 8) and y == task.test.labels[3]
    cached = cache_tensors(task.test, to_tensor)
    assert cached.inputs.shape == (20, 3, 8, 8) and len(cached) == 20
    assert torch.equal(cached[3][0], x) and cached[3][1] == y
    batch = next(iter(torch.utils.data.DataLoader(cached, batch_size=8)))
    assert batch[0].shape == (8, 3, 8, 8)


def test_sample_calibration():
    task = load_task(TaskSpec("animal_mnist"), seed=0)
    subset = sample_calibration(task.train, n_per_class=3, seed=0)
    assert np.bincount(subset.labels).tolist() == [3] * 10
    again = sample_calibration(task.train, n_per_class=3, seed=0)
    assert np.array_equal(subset.indices, again.indices)
    assert len(sample_calibration(task.train, n=25, seed=0)) == 25
    with pytest.raises(ConfigError):
        sample_calibration(task.train, n=5, n_per_class=1)
