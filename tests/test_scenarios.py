"""Scenario files: every shipped YAML loads; each kind of mistake is reported
with the file and the field; orders are reproducible."""

import textwrap
from pathlib import Path

import pytest

import cl_merge  # noqa: F401
from cl_merge.errors import ConfigError, UnknownNameError
from cl_merge.scenario import (
    checkpoint_path,
    contiguous_class_splits,
    list_scenarios,
    load_scenario,
    scenario_dirs,
    seeded_permutation,
)

SHIPPED = sorted(p.stem for p in (Path(cl_merge.__file__).parent.parent / "scenarios").glob("*.yaml"))

BASE = """\
setting: task_incremental
model: {family: clip, name: clmerge-tiny-clip, pretrained: clmerge-offline}
"""


def write(tmp_path, body, name="x.yaml", base=BASE):
    path = tmp_path / name
    path.write_text(base + textwrap.dedent(body))
    return path


def error_of(path, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_scenario(path, overrides)
    return str(info.value)


# ----------------------------------------------------------------- shipped files
def test_shipped_scenarios_are_listed():
    assert len(SHIPPED) >= 10
    assert set(SHIPPED) <= set(list_scenarios())
    assert "offline_default" in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_scenario_loads(name):
    sc = load_scenario(name)
    assert sc.name == name
    assert sc.stages and all(s.name for s in sc.stages)
    assert len(set(sc.task_names)) == len(sc.task_names)
    orders = sc.expand_orders()
    assert len(orders) == sc.orders
    assert len(sc.fingerprint()) == 16


def test_reproduction_configs_match_the_literature():
    ta8 = ["sun397", "stanford_cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
    assert load_scenario("clip_vitb32_ta8_continual").task_names == ta8
    tall20 = load_scenario("clip_vitb32_tall20_continual")
    assert len(tall20.stages) == 20 and tall20.orders == 10 and tall20.order == "random"
    assert len(load_scenario("clip_vitb32_tall14_continual").stages) == 14
    magmax = load_scenario("magmax_8tasks")
    assert magmax.task_names == ["stanford_cars", "mnist", "eurosat", "svhn", "resisc45", "sun397", "dtd", "gtsrb"]
    assert magmax.init == "previous_finetuned" and magmax.method_names() == ["magmax"]
    for n in (5, 10, 20):
        sc = load_scenario(f"cifar100_ci_{n}")
        assert sc.setting == "class_incremental" and len(sc.stages) == n
        assert sorted(c for s in sc.stages for c in s.classes) == list(range(100))
    assert [len(s.classes) for s in load_scenario("imagenet_r_ci_10").stages] == [20] * 10
    offline = load_scenario("offline_default")
    assert len(offline.stages) >= 6 and offline.model.name == "clmerge-tiny-clip"
    assert {"task_arithmetic", "ties", "magmax"} <= set(offline.method_names())


# ----------------------------------------------------------------- name resolution
def test_unknown_scenario_lists_available():
    with pytest.raises(UnknownNameError) as info:
        load_scenario("offline_defualt")
    message = str(info.value)
    assert "did you mean: offline_default" in message and "available:" in message


def test_env_var_folder_is_searched_first(tmp_path, monkeypatch):
    write(tmp_path, "stages: [digits]\n", name="mine.yaml")
    monkeypatch.setenv("CL_MERGE_SCENARIOS", str(tmp_path))
    assert scenario_dirs()[0] == tmp_path
    assert "mine" in list_scenarios()
    assert load_scenario("mine").task_names == ["digits"]


def test_path_and_overrides(tmp_path):
    path = write(tmp_path, "stages: [digits, fashion_mnist]\nmerge: task_arithmetic\n")
    sc = load_scenario(str(path), ["train.max_steps=5", "merge=ties", "eval.max_test=10"])
    assert sc.train.max_steps == 5 and sc.eval.max_test == 10 and sc.method_names() == ["ties"]
    assert "x.yaml" in error_of(path, ["train.max_steps"])


# ----------------------------------------------------------------- errors name file and field
@pytest.mark.parametrize(
    "body, expected",
    [
        ("stages: [digits, mnist, {dataset: cifar1000}]\n",
         "x.yaml: stages[2].dataset: unknown dataset 'cifar1000' (did you mean: cifar100"),
        ("stages: []\n", "x.yaml: stages: empty stage list"),
        ("stages: [digits]\norder_seed: 1.5\n", "x.yaml: order_seed: expected an integer, got 1.5"),
        ("stages: [digits]\norder_seed: abc\n", "x.yaml: order_seed: expected an integer"),
        ("stages: [{dataset: digits, k_shot: four}]\n", "x.yaml: stages[0].k_shot: expected an integer, got 'four'"),
        ("stages: [digits]\nseeed: 3\n", "x.yaml: unknown field 'seeed' (did you mean: seed"),
        ("stages: [digits]\ntrain: {lr: fast}\n", "x.yaml: train.lr: expected a number, got 'fast'"),
        ("stages: [digits]\ninit: previous\n", "x.yaml: init: must be one of"),
        ("stages: [{dataset: cifar100, classes: [0, 1, 2]}, {dataset: cifar100, classes: [2, 3]}]\n"
         "setting: class_incremental\n",
         "x.yaml: stages[1].classes: class 2 of 'cifar100' is also in stages[0]"),
        ("stages: [{dataset: cifar10, classes: [8, 9, 10]}]\n",
         "x.yaml: stages[0].classes: class 10 out of range ('cifar10' has classes 0..9)"),
        ("stages: [{dataset: cifar10, classes: [1, 1]}]\n", "x.yaml: stages[0].classes: class 1 listed twice"),
        ("stages: [digits, digits]\n", "x.yaml: stages[1].name: 'digits' already used by stages[0]"),
        ("stages: [{dataset: digits, variant: rotate45}]\n", "x.yaml: stages[0].variant: unknown variant 'rotate45'"),
        ("stages: [digits]\nmerge: {method: tiess}\n",
         "x.yaml: merge.method: unknown merging method 'tiess' (did you mean: ties"),
        ("stages: [digits]\nmerge: {method: ties, hyperparameters: {desnity: 0.2}}\n",
         "x.yaml: merge.hyperparameters: ties: unknown hyperparameter 'desnity'"),
        ("stages: [digits]\nmerge: [{method: magmax, scaling_grid: []}]\n", "x.yaml: merge.scaling_grid: empty grid"),
        ("stages: [digits]\nmerge: [task_arithmetic, task_arithmetic]\n",
         "x.yaml: merge[1].name: 'task_arithmetic' already used by merge[0]"),
        ("stages: [digits]\norders: 3\norder: fixed\n", "x.yaml: orders: 3 orders need order: random"),
        ("stages: [digits]\norders: 0\n", "x.yaml: orders: must be >= 1"),
        ("stages: [digits]\nsetting: multi_task\ninit: previous_merged\n", "x.yaml: init: multi_task"),
        ("stages: [digits]\nsetting: few_shot\n", "x.yaml: stages[0].k_shot: setting few_shot needs k_shot"),
        ("stages: [{dataset: digits, k_shot: 0}]\n", "x.yaml: stages[0].k_shot: must be >= 1"),
        ("stages: [digits]\ncalibration: {n_per_class: 4, split: test}\n",
         "x.yaml: calibration.split: test (unlabeled test inputs) is only for test-time methods"),
        ("stages: [digits]\ncalibration: {n_per_class: 4, split: validation}\neval: {split: validation}\n",
         "x.yaml: calibration.split: 'validation' is the evaluation split"),
        ("stages: [digits]\nmodel: {family: resnet, name: r50}\n", "x.yaml: model.family: must be one of"),
        ("stages: [digits]\nbaselines: [zero_shot, oracle]\n", "x.yaml: baselines[1]: unknown baseline 'oracle'"),
        ("stages: [{dataset: digits, name: 'my task'}]\n", "x.yaml: stages[0].name: 'my task' must be letters"),
        ("stages: [digits]\ntasks: [mnist]\n", "x.yaml: give either 'stages' or 'tasks'"),
        ("setting: domain_incremental\nstages: [cifar10, cifar100]\n",
         "x.yaml: stages[1].dataset: 'cifar100' has 100 classes"),
    ],
)
def test_bad_scenarios(tmp_path, body, expected):
    if "setting:" in body or "model:" in body:
        base = "" if "model:" in body else "model: {family: clip, name: m}\n"
        base = ("setting: task_incremental\n" if "setting:" not in body else "") + base
        path = write(tmp_path, body, base=base)
    else:
        path = write(tmp_path, body)
    assert expected in error_of(path)


def test_bad_class_split_shorthand(tmp_path):
    path = write(tmp_path, "setting: class_incremental\ndataset: cifar10\nnum_tasks: 11\n",
                 base="model: {family: vit, name: vit_tiny}\n")
    assert "x.yaml: split.num_tasks: 11 tasks but 'cifar10' has only 10 classes" in error_of(path)
    path = write(tmp_path, "setting: class_incremental\ndataset: cifar10\nnum_tasks: 2\nclass_order_seed: x\n",
                 base="model: {family: vit, name: vit_tiny}\n")
    assert "x.yaml: split.class_order_seed: expected an integer" in error_of(path)
    path = write(tmp_path, "setting: class_incremental\ndataset: cifar10\nnum_tasks: 2\nstages: [digits]\n",
                 base="model: {family: vit, name: vit_tiny}\n")
    assert "either a class split" in error_of(path)


def test_missing_required_and_bad_yaml(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("setting: task_incremental\nstages: [digits]\n")
    assert "x.yaml: missing required field 'model'" in error_of(path)
    path.write_text("stages: [digits\n")
    assert "invalid YAML" in error_of(path)


# ----------------------------------------------------------------- class splits and orders
def test_contiguous_class_splits():
    assert contiguous_class_splits(range(10), 5) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert contiguous_class_splits(range(7), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(ValueError):
        contiguous_class_splits(range(3), 4)


def test_class_order_seed_permutes_classes(tmp_path):
    body = "setting: class_incremental\ndataset: cifar100\nnum_tasks: 4\nclass_order_seed: 3\n"
    sc = load_scenario(write(tmp_path, body, base="model: {family: clip, name: m}\n"))
    flat = [c for s in sc.stages for c in s.classes]
    assert sorted(flat) == list(range(100)) and flat != list(range(100))
    assert sc.task_names == ["cifar100_t00", "cifar100_t01", "cifar100_t02", "cifar100_t03"]
    assert flat == seeded_permutation(100, "classes", 3)


def test_seeded_permutation_is_deterministic():
    a = seeded_permutation(20, "stages", 0, 1)
    assert a == seeded_permutation(20, "stages", 0, 1)
    assert sorted(a) == list(range(20))
    assert a != seeded_permutation(20, "stages", 0, 2)
    # pinned: an order must never change between versions (published runs refer to it)
    assert seeded_permutation(8, "stages", 0, 0) == seeded_permutation(8, "stages", "0", "0")


def test_expand_orders_reproducible(tmp_path):
    path = write(tmp_path, "stages: [digits, mnist, svhn, cifar10, stl10, fashion_mnist]\norders: 5\norder_seed: 11\n")
    first = [[s.name for s in order] for order in load_scenario(path).expand_orders()]
    again = [[s.name for s in order] for order in load_scenario(path).expand_orders()]
    assert first == again and len(first) == 5
    assert all(sorted(o) == sorted(first[0]) for o in first)
    assert len({tuple(o) for o in first}) > 1
    other = [[s.name for s in order] for order in load_scenario(path, ["order_seed=12"]).expand_orders()]
    assert other != first


def test_expand_orders_class_incremental_reshuffles_classes(tmp_path):
    body = "setting: class_incremental\ndataset: cifar10\nnum_tasks: 5\norders: 3\n"
    sc = load_scenario(write(tmp_path, body, base="model: {family: clip, name: m}\n"))
    orders = sc.expand_orders()
    assert len(orders) == 3
    for order in orders:
        assert sorted(c for s in order for c in s.classes) == list(range(10))
        assert [s.name for s in order] == [f"cifar10_t0{k}" for k in range(5)]
    assert orders[0][0].classes != orders[1][0].classes or orders[0][1].classes != orders[1][1].classes


def test_fixed_order_is_listed_order(tmp_path):
    sc = load_scenario(write(tmp_path, "stages: [mnist, digits]\n"))
    assert [[s.name for s in o] for o in sc.expand_orders()] == [["mnist", "digits"]]


def test_fingerprint_stable_and_sensitive(tmp_path):
    path = write(tmp_path, "stages: [digits, mnist]\ndescription: one\n")
    a = load_scenario(path).fingerprint()
    assert a == load_scenario(path).fingerprint()
    assert a == load_scenario(path, ["description=two"]).fingerprint()
    assert a != load_scenario(path, ["train.max_steps=7"]).fingerprint()
    assert a != load_scenario(path, ["seed=1"]).fingerprint()


def test_shorthands_and_checkpoint_paths(tmp_path):
    body = """\
    tasks:
      - digits
      - {dataset: fashion_mnist, variant: invert, checkpoint: ckpt/fm.safetensors}
    k_shot: 4
    baselines: [zero_shot, sequential_finetune]
    merge: {method: task_arithmetic, scaling_grid: [0.1, 0.5]}
    """
    sc = load_scenario(write(tmp_path, body))
    assert sc.task_names == ["digits", "fashion_mnist_invert"]
    assert sc.stages[0].k_shot == 4 and sc.stages[1].k_shot is None  # checkpoints are not trained
    assert sc.baselines.zero_shot and sc.baselines.sequential_finetune and not sc.baselines.individual
    assert sc.methods[0].scaling_grid == [0.1, 0.5]
    assert checkpoint_path(sc, sc.stages[1]) == tmp_path / "ckpt/fm.safetensors"
    assert checkpoint_path(sc, sc.stages[0]) is None
