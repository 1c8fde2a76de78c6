"""Dataset layouts built from small fake copies the tests write: Hugging Face
copies (save_to_disk and parquet), task vectors' folders, torchvision's; the
user's own image folder / HF dataset as a task; label / class-name alignment;
the bad inputs of issue 8."""

from pathlib import Path

import cl_merge  # noqa: F401  (torchvision compatibility shim first)
import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from cl_merge.data import (
    TaskSpec,
    get_dataset_info,
    layout_names,
    load_source,
    load_task,
    open_source,
)
from cl_merge.data import classnames as C
from cl_merge.errors import ConfigError, DataError

RNG = np.random.default_rng(0)


def _jpg(path: Path, value: int = 0, size: int = 6) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value % 256, 7, 9)).save(path)


def _hf_copy(path: Path, splits: dict[str, tuple[list[int], list[str] | None]], *, image="image", label="label"):
    """A DatasetDict written with save_to_disk: ``{split: (labels, ClassLabel names or None)}``."""
    out = {}
    for split, (labels, names) in splits.items():
        features = datasets.Features({image: datasets.Image(),
                                      label: datasets.ClassLabel(names=names) if names else datasets.Value("int64")})
        images = [Image.new("RGB", (5, 5), (int(y) * 30 % 256, 0, 0)) for y in labels]
        out[split] = datasets.Dataset.from_dict({image: images, label: list(labels)}, features=features)
    datasets.DatasetDict(out).save_to_disk(str(path))


# --------------------------------------------------------------------- layouts of registry datasets
def test_every_tall20_dataset_lists_its_layouts():
    from cl_merge.data import TALL20

    for name in TALL20 + ("imagenet_r",):
        info = get_dataset_info(name)
        assert layout_names(name), name
        if name != "imagenet_r":
            assert info.hub is not None and "hf" in layout_names(name), name
    assert layout_names("sun397") == ["hf", "task_vectors", "torchvision"]
    assert get_dataset_info("svhn").hub.config == "cropped_digits"
    assert dict(get_dataset_info("food101").hub.splits)["test"] == "validation"


def test_hf_save_to_disk_copy_of_a_registry_dataset(tmp_path):
    _hf_copy(tmp_path / "hf/tanganke/eurosat", {"train": ([0, 1, 9, 9, 3], None), "test": ([2, 9], None)})
    task = load_task(TaskSpec("eurosat"), root=tmp_path, seed=0)
    assert task.layout == "hf" and "FusionBench" in task.protocol
    assert sorted(task.test.labels.tolist()) == [2, 9]
    assert task.classnames[9] == "lake or sea"
    image, label = task.test[0]
    assert image.mode == "RGB" and image.size == (5, 5) and label == 2


def test_hf_hub_label_order_is_mapped_to_the_registry_order(tmp_path):
    # FER2013 on the hub labels classes alphabetically (neutral = 4); the registry follows torchvision (neutral = 6)
    _hf_copy(tmp_path / "hf/clip-benchmark/wds_fer2013",
             {"train": ([4, 0, 5, 6], None), "test": ([4, 6], None)}, image="jpg", label="cls")
    task = load_task(TaskSpec("fer2013", val_fraction=0.0), root=tmp_path)
    names = [task.classnames[y] for y in task.test.labels]
    assert sorted(names) == ["neutral", "surprised"]
    assert sorted(task.classnames[y] for y in task.train.labels) == ["angry", "neutral", "sad", "surprised"]


def test_hf_parquet_copy_and_hf_layout_chosen_by_name(tmp_path):
    folder = tmp_path / "hf/ylecun/mnist"
    folder.mkdir(parents=True)
    for split, labels in (("train", [1, 2, 3, 1]), ("test", [7, 0])):
        ds = datasets.Dataset.from_dict({"image": [Image.new("L", (4, 4)) for _ in labels], "label": labels},
                                        features=datasets.Features({"image": datasets.Image(),
                                                                    "label": datasets.Value("int64")}))
        ds.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    splits, layout = open_source("mnist", tmp_path, layout="hf")
    assert layout.name == "hf" and splits["test"].labels.tolist() == [7, 0]
    with pytest.raises(DataError, match=r"layout 'torchvision' not found.*MNIST/raw/train-images-idx3-ubyte"):
        load_source("mnist", tmp_path, layout="torchvision")
    with pytest.raises(DataError, match=r"unknown layout 'kaggle'.*hf, torchvision"):
        load_source("mnist", tmp_path, layout="kaggle")


def test_task_vectors_sun397_folders_map_to_class_names(tmp_path):
    for split, n in (("train", 2), ("val", 1)):
        for folder in ("a_abbey", "y_youth_hostel", "a_airplane_cabin"):
            for k in range(n):
                _jpg(tmp_path / "sun397" / split / folder / f"{k}.jpg", k)
    task = load_task(TaskSpec("sun397", val_fraction=0.0), root=tmp_path)
    assert task.layout == "task_vectors"
    assert len(task.train) == 6 and len(task.test) == 3  # test = their val folder
    names = {task.classnames[y] for y in task.test.labels}
    assert names == {"abbey", "youth hostel", "airplane cabin"}
    assert C.SUN397.index("youth hostel") in task.test.labels


def test_task_vectors_eurosat_splits_and_unknown_folder(tmp_path):
    for split in ("train", "val", "test"):
        for folder in ("AnnualCrop", "SeaLake"):
            _jpg(tmp_path / "EuroSAT_splits" / split / folder / "x.jpg")
    task = load_task(TaskSpec("eurosat"), root=tmp_path)
    assert task.layout == "task_vectors" and len(task.val) == 2 and len(task.test) == 2
    assert sorted(task.classnames[y] for y in task.test.labels) == ["annual crop land", "lake or sea"]
    _jpg(tmp_path / "EuroSAT_splits" / "train" / "Moon" / "x.jpg")
    with pytest.raises(DataError, match=r"match no eurosat class: Moon"):
        load_task(TaskSpec("eurosat"), root=tmp_path)


def test_dtd_task_vectors_layout_and_torchvision_partition_trains_on_train1_plus_val1(tmp_path):
    tv_root, vec_root = tmp_path / "tv", tmp_path / "vec"
    listing = {"train1": [], "val1": [], "test1": []}
    for c, name in enumerate(C.DTD):  # torchvision's DTD labels by the classes its split files mention
        for part in listing:
            rel = f"{name}/{name}_{part}.jpg"
            _jpg(tv_root / "dtd/dtd/images" / rel, c)
            listing[part].append(rel)
    (tv_root / "dtd/dtd/labels").mkdir(parents=True)
    for part, lines in listing.items():
        (tv_root / "dtd/dtd/labels" / f"{part}.txt").write_text("\n".join(lines) + "\n")
    splits, layout = open_source("dtd", tv_root)
    assert layout.name == "torchvision"
    assert len(splits["train"]) == 2 * 47 and len(splits["test"]) == 47 and "val" not in splits
    assert np.bincount(splits["train"].labels).tolist() == [2] * 47
    first = splits["test"].paths[int(np.flatnonzero(splits["test"].labels == 46)[0])]
    assert f"/{C.DTD[46]}/" in first  # label 46 is the last class, by name
    for split in ("train", "val"):
        _jpg(vec_root / "dtd" / split / "zigzagged" / "z.jpg")
        _jpg(vec_root / "dtd" / split / "banded" / "b.jpg")
    splits, layout = open_source("dtd", vec_root)
    assert layout.name == "task_vectors" and sorted(splits["test"].labels.tolist()) == [0, 46]


def test_svhn_task_vectors_folder_and_label_ten_is_zero(tmp_path):
    from scipy.io import savemat

    for split, ys in (("train", [10, 1, 5]), ("test", [10, 9])):
        x = RNG.integers(0, 256, size=(32, 32, 3, len(ys)), dtype=np.uint8)
        (tmp_path / "svhn").mkdir(exist_ok=True)
        savemat(str(tmp_path / "svhn" / f"{split}_32x32.mat"), {"X": x, "y": np.asarray(ys).reshape(-1, 1)})
    splits, layout = open_source("svhn", tmp_path)
    assert layout.name == "task_vectors" and splits["test"].labels.tolist() == [0, 9]
    assert splits["train"][0][0].size == (32, 32)


def test_sun397_partition_with_sun397_in_the_root_path(tmp_path):
    root = tmp_path / "my_SUN397_copy"  # the old lookup split paths at the first "SUN397"
    base = root / "SUN397"
    lines = [f"/{n[0]}/{n.replace(' ', '_')}" for n in C.SUN397]
    base.mkdir(parents=True)
    (base / "ClassName.txt").write_text("\n".join(lines) + "\n")
    train, test = [], []
    for c in (0, 396):
        for k in range(2):
            rel = f"{lines[c]}/sun_{c}_{k}.jpg"
            _jpg(base / rel.lstrip("/"), c)
            (train if k == 0 else test).append(rel)
    (base / "Training_01.txt").write_text("\n".join(train))
    (base / "Testing_01.txt").write_text("\n".join(test))
    splits, layout = open_source("sun397", root, layout="torchvision")
    assert len(splits["train"]) == 2 and len(splits["test"]) == 2
    assert sorted(splits["test"].labels.tolist()) == [0, 396]


def test_oxford_pets_labels_match_class_names(tmp_path):
    base = tmp_path / "oxford-iiit-pet"
    rows = [("Abyssinian_1", 1, 1, 1), ("american_bulldog_3", 2, 2, 1), ("Bengal_2", 6, 1, 2),
            ("yorkshire_terrier_9", 37, 2, 25), ("Sphynx_4", 34, 1, 12)]
    (base / "annotations").mkdir(parents=True)
    for name, *_ in rows:
        _jpg(base / "images" / f"{name}.jpg")
    text = "\n".join(" ".join(map(str, r)) for r in rows) + "\n"
    (base / "annotations" / "trainval.txt").write_text(text)
    (base / "annotations" / "test.txt").write_text(text)
    task = load_task(TaskSpec("oxford_pets", val_fraction=0.0), root=tmp_path)
    for path, label in zip(task.test.source.paths, task.test.source.labels):
        breed = Path(path).stem.rsplit("_", 1)[0].lower()
        assert task.classnames[label] == breed  # the head's name for the label is the file's breed


def test_fer2013_csv_without_download_keyword(tmp_path):
    folder = tmp_path / "fer2013"
    folder.mkdir()
    pixels = " ".join(["7"] * 48 * 48)
    rows = [(0, "Training"), (6, "Training"), (3, "PublicTest"), (6, "PrivateTest")]
    (folder / "fer2013.csv").write_text("emotion,pixels,Usage\n" + "".join(f"{e},{pixels},{u}\n" for e, u in rows))
    splits = load_source("fer2013", tmp_path, download=True)  # torchvision's FER2013 has no download keyword
    assert splits["train"].labels.tolist() == [0, 6] and splits["test"].labels.tolist() == [3, 6]
    assert get_dataset_info("fer2013").classnames[6] == "neutral"
    assert splits["test"][0][0].size == (48, 48)


def test_stanford_cars_download_flag_with_data_present_is_no_raw_valueerror(tmp_path):
    from scipy.io import savemat

    base = tmp_path / "stanford_cars"
    (base / "devkit").mkdir(parents=True)

    def annotations(rows):
        table = np.zeros((len(rows),), dtype=[("fname", "O"), ("class", "O")])
        for i, row in enumerate(rows):
            table[i] = row
        return table

    train, test = [("1.jpg", 1), ("2.jpg", 196)], [("3.jpg", 5), ("4.jpg", 1)]
    for folder, rows in (("cars_train", train), ("cars_test", test)):
        for name, _ in rows:
            _jpg(base / folder / name)
    savemat(str(base / "devkit/cars_train_annos.mat"), {"annotations": annotations(train)})
    savemat(str(base / "cars_test_annos_withlabels.mat"), {"annotations": annotations(test)})
    savemat(str(base / "devkit/cars_meta.mat"),
            {"class_names": np.array([f"car {i}" for i in range(196)], dtype=object)})
    splits, layout = open_source("stanford_cars", tmp_path, download=True)  # torchvision's download raises
    assert layout.name == "torchvision"
    assert splits["train"].labels.tolist() == [0, 195] and splits["test"].labels.tolist() == [4, 0]


def test_pcam_without_h5py_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "h5py" else real(name, *a))
    for n in ("train", "valid", "test"):
        for xy in "xy":
            (tmp_path / "pcam").mkdir(exist_ok=True)
            (tmp_path / "pcam" / f"camelyonpatch_level_2_split_{n}_{xy}.h5").write_bytes(b"")
    with pytest.raises(DataError, match=r"needs h5py.*pip install 'cl_merge\[pcam\]'"):
        load_source("pcam", tmp_path, layout="torchvision")


def test_published_names_and_templates():
    for name, index, expected in (("emnist_letters", 0, "A"), ("kmnist", 0, "お"), ("fashion_mnist", 0, "T - shirt / top"),
                                  ("flowers102", 59, "pink-yellow dahlia?"), ("cifar100", 1, "aquarium_fish"),
                                  ("oxford_pets", 1, "american_bulldog")):
        assert get_dataset_info(name).classnames[index] == expected, name
    assert get_dataset_info("emnist_letters").templates == ('a photo of the digit character: "{}".',)
    assert get_dataset_info("kmnist").templates == ("a photo of the character {}.",)


def test_no_layout_found_lists_each_layout_and_what_is_missing(tmp_path):
    with pytest.raises(DataError) as err:
        load_source("eurosat", tmp_path)
    message = str(err.value)
    assert "\n" not in message
    for part in ("hf (missing hf/tanganke/eurosat", "task_vectors (missing EuroSAT_splits/train",
                 "torchvision (missing eurosat/2750"):
        assert part in message


# --------------------------------------------------------------------- the user's own data
def _folder_task(root: Path, classes=("cat", "sea_lion"), splits=("train", "test")):
    for split in splits:
        for c, name in enumerate(classes):
            for k in range(3):
                _jpg(root / split / name / f"{k}.png", 40 * c + k)
    return root


def test_user_image_folder_task(tmp_path):
    folder = _folder_task(tmp_path / "pets", splits=("train", "val", "test"))
    task = load_task(TaskSpec({"folder": str(folder)}), seed=0)
    assert task.name == "pets" and task.classnames == ["cat", "sea lion"]
    assert len(task.train) == 6 and len(task.val) == 6 and len(task.test) == 6
    assert task.test[5][1] == 1 and task.layout == "folder"
    named = load_task(TaskSpec({"folder": "pets", "class_names": ["kitty", "seal"], "templates": ["art of {}"]}),
                      root=tmp_path)  # relative to the data root
    assert named.classnames == ["kitty", "seal"] and named.templates == ["art of {}"]


def test_user_folder_bad_layouts(tmp_path):
    only_train = _folder_task(tmp_path / "a", splits=("train",))
    with pytest.raises(DataError, match=r"layout not recognised: looked for train/<class>/<image>, test/<class>/"
                                        r"<image>.*missing: test/<class>/"):
        load_task(TaskSpec({"folder": str(only_train)}))
    folder = _folder_task(tmp_path / "b")
    with pytest.raises(DataError, match="class_names lists 3 names but train/ has 2 class folders"):
        load_task(TaskSpec({"folder": str(folder), "class_names": ["x", "y", "z"]}))
    _jpg(folder / "test" / "dog" / "0.png")
    with pytest.raises(DataError, match="test/dog is not a class of train/"):
        load_task(TaskSpec({"folder": str(folder)}))
    with pytest.raises(ConfigError, match="image_column: only for 'hf' datasets"):
        load_task(TaskSpec({"folder": str(folder), "image_column": "x"}))
    with pytest.raises(ConfigError, match="exactly one of 'folder'"):
        load_task(TaskSpec({"folder": "a", "hf": "b"}))


def test_user_hf_task_class_label_names_and_bad_input(tmp_path):
    path = tmp_path / "birds"
    _hf_copy(path, {"train": ([0, 1, 2, 1, 0, 2], ["robin", "owl", "crow"]), "test": ([2, 0], ["robin", "owl", "crow"])})
    task = load_task(TaskSpec({"hf": str(path)}), seed=0)
    assert task.classnames == ["robin", "owl", "crow"] and task.test.labels.tolist() == [2, 0]
    with pytest.raises(DataError, match=r"no image column 'picture' \(columns: image, label\)"):
        load_task(TaskSpec({"hf": str(path), "image_column": "picture"}))
    with pytest.raises(DataError, match=r"class_names lists 2 names but column 'label' has 3 classes"):
        load_task(TaskSpec({"hf": str(path), "class_names": ["a", "b"]}))
    plain = tmp_path / "plain"
    _hf_copy(plain, {"train": ([0, 1, 2], None), "test": ([0, 3], None)}, image="img", label="y")
    with pytest.raises(DataError, match=r"'y' is not a ClassLabel; give class_names"):
        load_task(TaskSpec({"hf": str(plain), "image_column": "img", "label_column": "y"}))
    with pytest.raises(DataError, match=r"label 3 is outside the class list"):
        load_task(TaskSpec({"hf": str(plain), "image_column": "img", "label_column": "y",
                            "class_names": ["a", "b", "c"]}))


def test_user_tasks_stream_through_the_datamodule(tmp_path):
    from cl_merge.lit.datamodule import TaskDataModule
    from torchvision import transforms

    folder = _folder_task(tmp_path / "pets")
    task = load_task(TaskSpec({"folder": str(folder)}), seed=0)
    to_tensor = transforms.Compose([transforms.Resize((8, 8)), transforms.ToTensor()])
    dm = TaskDataModule(task, train_transform=to_tensor, eval_transform=to_tensor, batch_size=2, num_workers=2,
                        prefetch_factor=1)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 8, 8) and labels.dtype == torch.long
    seen = torch.cat([y for _, y in dm.test_dataloader()])
    assert seen.tolist() == task.test.labels.tolist()


def test_scenario_accepts_a_user_dataset_mapping(tmp_path):
    from cl_merge.scenario import load_scenario

    folder = _folder_task(tmp_path / "my_pets")
    text = (f"name: mine\nsetting: task_incremental\nmodel: {{family: clip, name: clmerge-tiny-clip}}\n"
            f"stages:\n  - dataset: {{folder: {folder}}}\n  - dataset: {{hf: {tmp_path}/x, class_names: [a, b]}}\n"
            f"    classes: [1]\n  - dataset: digits\n    layout: package\nmerge: task_arithmetic\n")
    (tmp_path / "s.yaml").write_text(text)
    sc = load_scenario(tmp_path / "s.yaml")
    assert [s.name for s in sc.stages] == ["my_pets", "x_t00", "digits"]
    bad = text.replace("class_names: [a, b]", "class_names: [a, b], colour: red")
    (tmp_path / "bad.yaml").write_text(bad)
    with pytest.raises(ConfigError, match=r"stages\[1\]\.dataset: unknown key 'colour'"):
        load_scenario(tmp_path / "bad.yaml")
    (tmp_path / "bad2.yaml").write_text(text.replace("classes: [1]", "classes: [2]"))
    with pytest.raises(ConfigError, match=r"stages\[1\]\.classes: class 2 out of range"):
        load_scenario(tmp_path / "bad2.yaml")
    (tmp_path / "bad3.yaml").write_text(text.replace("layout: package", "layout: hf"))
    with pytest.raises(ConfigError, match=r"stages\[2\]\.layout: 'digits' has no layout 'hf'"):
        load_scenario(tmp_path / "bad3.yaml")


def test_user_folder_and_hf_tasks_through_cl_merge_run(tmp_path, monkeypatch):
    import json

    import yaml

    from cl_merge.cli import main

    monkeypatch.setenv("CL_MERGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    folder = _folder_task(tmp_path / "data" / "shapes")
    _hf_copy(tmp_path / "data" / "dots", {"train": ([0, 1] * 6, ["dot", "ring"]), "test": ([0, 1] * 2, ["dot", "ring"])})
    scenario = {
        "setting": "task_incremental", "model": {"family": "clip", "name": "clmerge-tiny-clip", "pretrained": None},
        "stages": [{"dataset": {"folder": "shapes"}}, {"dataset": {"hf": "dots"}}],
        "merge": "task_arithmetic", "baselines": {"zero_shot": True, "individual": False},
        "train": {"lr": 1.0e-3, "max_steps": 2, "batch_size": 4, "warmup_steps": 1}, "eval": {"batch_size": 8},
    }
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(scenario))
    rc = main(["run", str(tmp_path / "mine.yaml"), "--out", str(tmp_path / "run"), "--data-root",
               str(tmp_path / "data"), "--no-progress", "--wandb", "disabled"])
    assert rc in (0, None)
    body = json.loads((tmp_path / "run" / "metrics.json").read_text())
    per_task = {r["name"]: r["per_task"] for r in body["results"]}
    assert folder.name == "shapes" and set(per_task["zero_shot"]) >= {"shapes", "dots"}
