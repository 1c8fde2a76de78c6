"""Find, load and validate scenario files.

``load_scenario("ta8_task_arithmetic")`` looks in ``$CL_MERGE_SCENARIOS``
(``os.pathsep``-separated folders) and then in the repository's
``scenarios/`` folder; a path to a YAML file works too. Errors name the file
and the field: ``scenarios/x.yaml: stages[2].dataset: unknown dataset
'cifar1000' (did you mean: cifar100?)``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Sequence

from cl_merge.config import apply_overrides, from_dict, load_yaml
from cl_merge.errors import ClMergeError, ConfigError, HyperparameterError, UnknownNameError, close_matches
from cl_merge.scenario.orders import split_stages
from cl_merge.scenario.schema import STAGE_SEED_STRIDE, BaselinesSpec, CalibrationSpec, Scenario, SplitSpec, StageSpec

ENV_VAR = "CL_MERGE_SCENARIOS"
SUFFIXES = (".yaml", ".yml")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_SPLIT_KEYS = ("dataset", "num_tasks", "class_order_seed", "class_order", "num_classes")


# ----------------------------------------------------------------- finding files
def scenario_dirs() -> list[Path]:
    """Folders searched for scenario names, in order: ``$CL_MERGE_SCENARIOS``, then the repo's ``scenarios/``."""
    import cl_merge

    dirs = [Path(p) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    dirs.append(Path(cl_merge.__file__).resolve().parent.parent / "scenarios")
    return dirs


def list_scenarios() -> list[str]:
    """Names of the scenario files found in :func:`scenario_dirs` (first folder wins)."""
    names: dict[str, Path] = {}
    for folder in scenario_dirs():
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                if path.suffix in SUFFIXES and path.is_file():
                    names.setdefault(path.stem, path)
    return sorted(names)


def find_scenario(name_or_path: str | os.PathLike) -> Path:
    text = str(name_or_path)
    path = Path(text)
    if path.is_file():
        return path
    if path.suffix in SUFFIXES or os.sep in text:
        raise UnknownNameError(f"scenario file not found: {text}")
    for folder in scenario_dirs():
        for suffix in SUFFIXES:
            candidate = folder / f"{text}{suffix}"
            if candidate.is_file():
                return candidate
    available = list_scenarios()
    raise UnknownNameError(
        f"unknown scenario {text!r}{close_matches(text, available)};"
        f" available: {', '.join(available) or 'none'} (searched {', '.join(map(str, scenario_dirs()))})"
    )


def _display(path: Path) -> str:
    """Short path for messages: relative to the cwd or to the repo, else as is."""
    resolved = path.resolve()
    for base in (Path.cwd(), *(d.parent for d in scenario_dirs())):
        try:
            return str(resolved.relative_to(base.resolve()))
        except ValueError:
            continue
    return str(path)


# ----------------------------------------------------------------- registries (optional)
class _DatasetRegistry:
    """Adapter over ``cl_merge.data`` (written separately): dataset names,
    class counts, variant names. Absent pieces make checks skip, not fail."""

    def __init__(self, names, info_fn, variants_fn):
        self._names = sorted(names)
        self._info_fn = info_fn
        self._variants_fn = variants_fn

    def dataset_names(self) -> list[str]:
        return self._names

    def num_classes(self, dataset: str) -> int | None:
        if self._info_fn is None or dataset not in self._names:
            return None
        info = self._info_fn(dataset)
        value = info.get("num_classes") if isinstance(info, dict) else getattr(info, "num_classes", None)
        if isinstance(value, int):
            return value
        for attr in ("classnames", "class_names", "classes"):
            value = info.get(attr) if isinstance(info, dict) else getattr(info, attr, None)
            if isinstance(value, (list, tuple)):
                return len(value)
        return None

    def variant_names(self) -> list[str] | None:
        return list(self._variants_fn()) if self._variants_fn is not None else None


def _first_callable(modules, names):
    for module in modules:
        for name in names:
            fn = getattr(module, name, None)
            if callable(fn):
                return fn
    return None


def _dataset_registry() -> _DatasetRegistry | None:
    """The dataset registry when ``cl_merge.data`` offers one; None while it does not."""
    import importlib

    modules = []
    for module_name in ("cl_merge.data", "cl_merge.data.registry", "cl_merge.data.variants"):
        try:
            modules.append(importlib.import_module(module_name))
        except ImportError:
            continue
    names_fn = _first_callable(modules, ("dataset_names", "available_datasets"))
    if names_fn is None:
        return None
    return _DatasetRegistry(names_fn(), _first_callable(modules, ("get_dataset_info",)),
                            _first_callable(modules, ("variant_names", "available_variants")))


def _merging_registry():
    try:
        from cl_merge import merging
    except ImportError:
        return None
    return merging if callable(getattr(merging, "available_methods", None)) else None


# ----------------------------------------------------------------- raw-dict normalisation
def _normalise(raw: dict[str, Any], where: str, default_name: str) -> dict[str, Any]:
    """Accept the YAML's shorthands and turn them into the schema's one form."""
    data = dict(raw)
    data.setdefault("name", default_name)
    if "tasks" in data:
        if "stages" in data:
            raise ConfigError(f"{where}: give either 'stages' or 'tasks', not both")
        data["stages"] = data.pop("tasks")
    top_split = {k: data.pop(k) for k in _SPLIT_KEYS if k in data}
    if top_split:
        if "split" in data:
            raise ConfigError(f"{where}: class-split keys {', '.join(top_split)} given beside a 'split' section")
        data["split"] = top_split
    if "split" in data and "stages" in data:
        raise ConfigError(f"{where}: give either a class split (dataset/num_tasks) or 'stages', not both")
    if isinstance(data.get("stages"), list):
        data["stages"] = [{"dataset": s} if isinstance(s, str) else s for s in data["stages"]]
    if "merge" in data:
        if "methods" in data:
            raise ConfigError(f"{where}: give either 'merge' or 'methods', not both")
        merge = data.pop("merge")
        data["methods"] = merge if isinstance(merge, list) else [merge]
    if isinstance(data.get("methods"), list):
        data["methods"] = [{"method": m} if isinstance(m, str) else m for m in data["methods"]]
    baselines = data.get("baselines")
    if isinstance(baselines, list):
        known = [f.name for f in dataclasses.fields(BaselinesSpec)]
        for i, item in enumerate(baselines):
            if item not in known:
                raise ConfigError(
                    f"{where}: baselines[{i}]: unknown baseline {item!r}{close_matches(str(item), known)}"
                    f" (valid: {', '.join(known)})"
                )
        data["baselines"] = {k: k in baselines for k in known}
    if "orders" in data and "order" not in data and isinstance(data["orders"], int) and data["orders"] > 1:
        data["order"] = "random"
    return data


# ----------------------------------------------------------------- validation
def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _resolve_stages(sc: Scenario, where: str, registry) -> None:
    if sc.split is not None:
        split: SplitSpec = sc.split
        _check(split.num_tasks >= 1, f"{where}: split.num_tasks: must be >= 1, got {split.num_tasks}")
        num_classes = split.num_classes
        if registry is not None and split.dataset in registry.dataset_names():
            known = registry.num_classes(split.dataset)
            _check(num_classes is None or known is None or num_classes == known,
                   f"{where}: split.num_classes: {num_classes} but dataset {split.dataset!r} has {known} classes")
            num_classes = num_classes or known
        _check(num_classes is not None,
               f"{where}: split.num_classes: needed to split {split.dataset!r} (the dataset registry does not know it)")
        _check(split.num_tasks <= num_classes,
               f"{where}: split.num_tasks: {split.num_tasks} tasks but {split.dataset!r} has only {num_classes} classes")
        split.num_classes = num_classes
        if split.class_order is not None:
            _check(split.class_order_seed is None,
                   f"{where}: split.class_order: give either class_order or class_order_seed, not both")
            _check(sorted(split.class_order) == list(range(num_classes)),
                   f"{where}: split.class_order: must list every class 0..{num_classes - 1} once")
        sc.stages = split_stages(split.dataset, num_classes, split.num_tasks, split.class_order_seed, split.variant,
                                 split.class_order)
    _check(len(sc.stages) > 0, f"{where}: stages: empty stage list (give at least one stage)")


def _validate_stage(sc: Scenario, i: int, stage: StageSpec, where: str, registry, variants) -> None:
    at = f"{where}: stages[{i}]"
    custom = isinstance(stage.dataset, dict)
    if custom:
        from cl_merge.data.custom import parse_custom

        stage.dataset = parse_custom(stage.dataset, f"{at}.dataset")
    elif registry is not None:
        names = list(registry.dataset_names())
        if stage.dataset not in names:
            raise ConfigError(
                f"{at}.dataset: unknown dataset {stage.dataset!r}{close_matches(stage.dataset, names)}"
            )
    if stage.layout is not None:
        _check(not custom, f"{at}.layout: only for registry datasets (a folder/hf dataset has one layout)")
        if registry is not None:
            from cl_merge.data.sources import layout_names

            valid = layout_names(stage.dataset)
            _check(stage.layout in valid, f"{at}.layout: {stage.dataset!r} has no layout {stage.layout!r}"
                                          f" (valid: {', '.join(valid)})")
    if stage.variant is not None and variants is not None and stage.variant not in variants:
        raise ConfigError(f"{at}.variant: unknown variant {stage.variant!r}{close_matches(stage.variant, variants)}"
                          f" (valid: {', '.join(variants)})")
    if stage.k_shot is None and sc.k_shot is not None and stage.checkpoint is None:
        stage.k_shot = sc.k_shot
    if stage.k_shot is not None:
        _check(stage.k_shot >= 1, f"{at}.k_shot: must be >= 1, got {stage.k_shot}")
    if sc.setting == "few_shot" and stage.checkpoint is None:
        _check(stage.k_shot is not None, f"{at}.k_shot: setting few_shot needs k_shot (here or at top level)")
    if stage.classes is not None:
        _check(len(stage.classes) > 0, f"{at}.classes: empty class subset")
        dup = sorted({c for c in stage.classes if stage.classes.count(c) > 1})
        _check(not dup, f"{at}.classes: class {dup[0] if dup else ''} listed twice")
        _check(all(c >= 0 for c in stage.classes), f"{at}.classes: class indices must be >= 0")
        if custom:
            names = stage.dataset.get("class_names")
            num_classes = len(names) if names is not None else None
        else:
            num_classes = registry.num_classes(stage.dataset) if registry is not None else None
        if sc.split is not None and sc.split.dataset == stage.dataset:
            num_classes = sc.split.num_classes
        if num_classes is not None:
            bad = [c for c in stage.classes if c >= num_classes]
            _check(not bad, f"{at}.classes: class {bad[0] if bad else ''} out of range"
                            f" ({stage.dataset!r} has classes 0..{num_classes - 1})")
    if stage.checkpoint is not None:
        _check(stage.checkpoint.strip() != "", f"{at}.checkpoint: empty path")
    if stage.name is None:
        base = _dataset_label(stage.dataset)
        stage.name = base if stage.variant is None else f"{base}_{stage.variant}"
        if stage.classes is not None:  # class splits of one dataset: numbered like the split shorthand
            earlier = sum(1 for s in sc.stages[:i] if s.classes is not None and s.dataset == stage.dataset
                          and s.variant == stage.variant)  # dicts compare by value
            stage.name = f"{stage.name}_t{earlier:02d}"
    _check(bool(_SAFE_NAME.match(stage.name)),
           f"{at}.name: {stage.name!r} must be letters, digits and _ . + - (it names files)")


def _dataset_key(dataset) -> str:
    """A hashable identity of a stage's dataset (a name, or a custom mapping)."""
    from cl_merge.data.custom import custom_key

    return custom_key(dataset)


def _dataset_label(dataset) -> str:
    """The default stage name: the registry name, or a custom dataset's folder / hub name."""
    if isinstance(dataset, dict):
        from cl_merge.data.custom import custom_name

        return custom_name(dataset)
    return dataset


def _validate_cross_stage(sc: Scenario, where: str, registry) -> None:
    seen_names: dict[str, int] = {}
    for i, stage in enumerate(sc.stages):
        if stage.name in seen_names:
            raise ConfigError(
                f"{where}: stages[{i}].name: {stage.name!r} already used by stages[{seen_names[stage.name]}]"
                " (give the stages distinct 'name's)"
            )
        seen_names[stage.name] = i
    # class splits of one dataset (and variant) must not overlap
    owner: dict[tuple[str, str | None, int], int] = {}
    whole: dict[tuple[str, str | None], int] = {}
    for i, stage in enumerate(sc.stages):
        key = (_dataset_key(stage.dataset), stage.variant)
        if stage.classes is None:
            if sc.setting == "class_incremental":
                whole[key] = i
            continue
        if sc.setting in ("class_incremental", "task_incremental", "few_shot"):
            for c in stage.classes:
                if (*key, c) in owner:
                    raise ConfigError(
                        f"{where}: stages[{i}].classes: class {c} of {stage.dataset!r} is also in"
                        f" stages[{owner[(*key, c)]}] (class splits must not overlap)"
                    )
                owner[(*key, c)] = i
    if sc.setting == "class_incremental":
        for i, stage in enumerate(sc.stages):
            key = (_dataset_key(stage.dataset), stage.variant)
            if stage.classes is not None and key in whole:
                raise ConfigError(f"{where}: stages[{whole[key]}].classes: {stage.dataset!r} is used whole and"
                                  f" split in stages[{i}] (class splits must not overlap)")
    if sc.setting == "domain_incremental" and len(sc.stages) > 1:
        first = sc.stages[0]
        for i, stage in enumerate(sc.stages[1:], start=1):
            if stage.classes is not None or first.classes is not None:
                _check(sorted(stage.classes or []) == sorted(first.classes or []),
                       f"{where}: stages[{i}].classes: domain_incremental stages must share one label set")
            elif stage.dataset != first.dataset and registry is not None \
                    and not isinstance(stage.dataset, dict) and not isinstance(first.dataset, dict):
                a, b = registry.num_classes(first.dataset), registry.num_classes(stage.dataset)
                _check(a is None or b is None or a == b,
                       f"{where}: stages[{i}].dataset: {stage.dataset!r} has {b} classes, {first.dataset!r} {a};"
                       " domain_incremental stages must share one label set")


def _validate_methods(sc: Scenario, where: str) -> None:
    merging = _merging_registry()
    labels: dict[str, int] = {}
    for i, spec in enumerate(sc.methods):
        at = f"{where}: merge[{i}]" if len(sc.methods) > 1 else f"{where}: merge"
        if merging is not None:
            names = merging.available_methods()
            if spec.method not in names:
                raise ConfigError(f"{at}.method: unknown merging method {spec.method!r}"
                                  f"{close_matches(spec.method, names)} (valid: {', '.join(names)})")
            try:
                merging.get_method(spec.method, **spec.hyperparameters)
            except ClMergeError as exc:
                raise ConfigError(f"{at}.hyperparameters: {exc}") from None
            if spec.scaling_grid is not None:
                fields = merging.method_class(spec.method).hparam_names()
                _check("scaling" in fields, f"{at}.scaling_grid: {spec.method!r} has no 'scaling' hyperparameter")
        if spec.scaling_grid is not None:
            _check(len(spec.scaling_grid) > 0, f"{at}.scaling_grid: empty grid")
            _check("scaling" not in spec.hyperparameters,
                   f"{at}.scaling_grid: give either hyperparameters.scaling or scaling_grid, not both")
        label = spec.name or spec.method
        _check(bool(_SAFE_NAME.match(label)), f"{at}.name: {label!r} must be letters, digits and _ . + -")
        if label in labels:
            raise ConfigError(f"{at}.name: {label!r} already used by merge[{labels[label]}] (give a distinct 'name')")
        labels[label] = i


def _validate_seeds(sc: Scenario, where: str) -> None:
    from cl_merge.lit.config import MAX_SEED

    # every stage's fine-tune seed (seed * stride + stage) must be a valid numpy / Lightning seed
    top = (MAX_SEED - len(sc.stages)) // STAGE_SEED_STRIDE
    _check(0 <= sc.seed <= top, f"{where}: seed: must be in 0..{top}, got {sc.seed}")
    if sc.calibration is not None and sc.calibration.seed is not None:
        _check(0 <= sc.calibration.seed <= MAX_SEED,
               f"{where}: calibration.seed: must be in 0..{MAX_SEED}, got {sc.calibration.seed}")
def _validate_strategies(sc: Scenario, where: str) -> None:
    """Each method must be able to run in this scenario: what it needs of the
    data (a calibration section, labels, the test split) and how many models
    it merges at most. Refused here, with the reason, not at stage 5."""
    merging = _merging_registry()
    if merging is None:
        return
    from cl_merge.merging import build_strategy

    num_tasks = len(sc.stages)
    cal = sc.calibration
    test_time = [spec.method for spec in sc.methods
                 if build_strategy(merging.get_method(spec.method, **spec.hyperparameters)).data_split == "test"]
    if cal is not None and cal.split == "test" and not test_time:
        raise ConfigError(f"{where}: calibration.split: test (unlabeled test inputs) is only for test-time methods,"
                          " and this scenario has none; use split: train or validation")
    for i, spec in enumerate(sc.methods):
        at = f"{where}: merge[{i}]" if len(sc.methods) > 1 else f"{where}: merge"
        method = merging.get_method(spec.method, **spec.hyperparameters)
        strategy = build_strategy(method)
        if method.max_models is not None and num_tasks > method.max_models:
            raise ConfigError(f"{at}.method: {spec.method!r} merges at most {method.max_models} models, but the scenario"
                              f" has {num_tasks} stages (every stage merges all tasks seen so far)")
        if "data" not in strategy.needs:
            continue
        if cal is None:
            raise ConfigError(f"{at}.method: {spec.method!r} needs calibration data: add a 'calibration:' section"
                              " (n_per_class, labeled, split) to the scenario")
        if cal.split == "test" and strategy.data_split != "test":
            raise ConfigError(f"{where}: calibration.split: test inputs are only for test-time methods, and"
                              f" {spec.method!r} calibrates on {strategy.data_split!r}; use split: train or validation")
        if strategy.needs_labels and not cal.labeled:
            raise ConfigError(f"{where}: calibration.labeled: {spec.method!r} needs labeled calibration data;"
                              " set labeled: true")


def _validate(sc: Scenario, where: str) -> Scenario:
    registry = _dataset_registry()
    if sc.split is not None and registry is not None:
        names = list(registry.dataset_names())
        if sc.split.dataset not in names:
            raise ConfigError(f"{where}: split.dataset: unknown dataset {sc.split.dataset!r}"
                              f"{close_matches(sc.split.dataset, names)}")
    _resolve_stages(sc, where, registry)
    variants = registry.variant_names() if registry is not None else None
    for i, stage in enumerate(sc.stages):
        _validate_stage(sc, i, stage, where, registry, variants)
    _validate_cross_stage(sc, where, registry)
    _validate_methods(sc, where)

    _check(bool(sc.model.name.strip()), f"{where}: model.name: empty")
    _check(sc.orders >= 1, f"{where}: orders: must be >= 1, got {sc.orders}")
    if sc.order == "fixed":
        _check(sc.orders == 1, f"{where}: orders: {sc.orders} orders need order: random (a fixed order is one order)")
    if sc.split is not None and sc.order == "random":
        for key in ("class_order_seed", "class_order"):
            _check(getattr(sc.split, key) is None,
                   f"{where}: split.{key}: with orders > 1 the class orders come from order_seed; remove it")
    if sc.setting == "multi_task":
        _check(sc.init == "pretrained", f"{where}: init: multi_task fine-tunes every task from θ0; use init: pretrained")
        _check(sc.orders == 1, f"{where}: orders: multi_task merges all tasks at once; orders must be 1")
    _check(sc.eval.batch_size >= 1, f"{where}: eval.batch_size: must be >= 1")
    _check(sc.eval.max_test is None or sc.eval.max_test >= 1, f"{where}: eval.max_test: must be >= 1")
    _check(sc.train.max_train is None or sc.train.max_train >= 1,
           f"{where}: train.max_train: must be >= 1, got {sc.train.max_train}")
    _validate_seeds(sc, where)
    # the fine-tuning recipe is validated by the TrainConfig the runner will build (one validation)
    try:
        sc.train.to_train_config(seed=sc.seed)
    except HyperparameterError as exc:
        raise ConfigError(f"{where}: train: {exc}") from None
    if sc.calibration is not None:
        cal = sc.calibration
        _check(cal.n_per_class >= 1, f"{where}: calibration.n_per_class: must be >= 1")
        _check(cal.batch_size is None or cal.batch_size >= 1, f"{where}: calibration.batch_size: must be >= 1")
        # unlabeled test inputs are the one exception: test-time methods (checked per method)
        _check(cal.split == "test" or cal.split != sc.eval.split,
               f"{where}: calibration.split: {cal.split!r} is the evaluation split; calibrate on another")
        _check(not (cal.split == "test" and cal.labeled),
               f"{where}: calibration.labeled: test labels are never given to a merge; use labeled: false with split: test")
    _validate_strategies(sc, where)
    if sc.k_shot is not None:
        _check(sc.k_shot >= 1, f"{where}: k_shot: must be >= 1, got {sc.k_shot}")
    return sc


# ----------------------------------------------------------------- entry points
def scenario_from_dict(raw: dict[str, Any], where: str = "scenario", name: str = "scenario",
                       source: Path | None = None) -> Scenario:
    """Validate a plain dict (already loaded YAML) into a :class:`Scenario`."""
    data = _normalise(raw, where, name)
    # Optional sections are validated on their own: through an Optional[...]
    # type, from_dict would report only "expected SplitSpec", not the field.
    optional_sections = {key: data.pop(key) for key in ("split", "calibration") if data.get(key) is not None}
    try:
        sc = from_dict(Scenario, data, where=where)
        sc.split = from_dict(SplitSpec, optional_sections["split"], f"{where}.split") \
            if "split" in optional_sections else None
        sc.calibration = from_dict(CalibrationSpec, optional_sections["calibration"], f"{where}.calibration") \
            if "calibration" in optional_sections else None
    except ConfigError as exc:
        # from_dict joins top-level fields with '.', which reads badly after a file name
        message = str(exc)
        if message.startswith(f"{where}."):
            message = f"{where}: {message[len(where) + 1:]}"
        raise ConfigError(message) from None
    sc = _validate(sc, where)
    sc.source = source  # not a dataclass field: kept out of to_dict() and fingerprint()
    return sc


def load_scenario(name_or_path: str | os.PathLike, overrides: Sequence[str] = ()) -> Scenario:
    """Load ``scenarios/<name>.yaml`` (or a path), apply ``key.sub=value``
    overrides, validate, and expand class splits."""
    path = find_scenario(name_or_path)
    where = _display(path)
    raw = load_yaml(path)
    if overrides:
        try:
            raw = apply_overrides(raw, list(overrides))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return scenario_from_dict(raw, where=where, name=path.stem, source=path)


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".json")


def checkpoint_path(scenario: Scenario, stage: StageSpec) -> Path | str | None:
    """A stage's checkpoint: a path (relative paths are relative to the
    scenario file's folder), or, for model family ``hf_clip``, a Hugging Face
    hub id (``org/name`` that is no local path), returned as the string."""
    if stage.checkpoint is None:
        return None
    text = stage.checkpoint
    path = Path(os.path.expandvars(os.path.expanduser(text)))
    source = getattr(scenario, "source", None)
    if not path.is_absolute() and source is not None:
        path = Path(source).parent / path
    if (scenario.model.family == "hf_clip" and not path.exists() and _HUB_ID.match(text)
            and not text.endswith(_CHECKPOINT_SUFFIXES)):
        return text
    return path
