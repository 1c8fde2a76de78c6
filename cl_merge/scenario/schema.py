"""Typed scenario schema: what a ``scenarios/*.yaml`` file may say.

Every field here is validated by :func:`cl_merge.config.from_dict`; the
cross-field rules (class splits, settings, orders) live in
:mod:`cl_merge.scenario.loader`. ``docs/scenarios.md`` documents the YAML.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from cl_merge.config import to_dict

Setting = Literal["task_incremental", "class_incremental", "domain_incremental", "multi_task", "few_shot"]
Init = Literal["pretrained", "previous_finetuned", "previous_merged"]


@dataclass
class ModelSpec:
    """Which pretrained model every stage starts from (θ0)."""

    family: Literal["clip", "hf_clip", "vit"]
    name: str
    pretrained: str | None = None  # open_clip pretrained tag / timm pretrained_cfg; None = random init


@dataclass
class StageSpec:
    """One stage of the sequence: a task to fine-tune on (or a checkpoint to bring)."""

    # a registry name, or the user's own data: {folder: PATH} / {hf: ID_OR_PATH, image_column, label_column,
    # class_names, templates} (cl_merge.data.custom)
    dataset: str | dict[str, Any]
    name: str | None = None  # unique label; filled from dataset/variant when omitted
    classes: list[int] | None = None  # subset of the dataset's class indices (class splits)
    variant: str | None = None  # input transformation, e.g. rotate90, invert (domain-incremental)
    k_shot: int | None = None  # labelled examples per class for training (few-shot)
    checkpoint: str | None = None  # already fine-tuned weights: no training at this stage
    layout: str | None = None  # on-disk layout of a registry dataset: hf, task_vectors, torchvision (None: first found)


@dataclass
class SplitSpec:
    """Class-incremental shorthand: ``dataset`` cut into ``num_tasks`` contiguous class splits."""

    dataset: str
    num_tasks: int
    class_order_seed: int | None = None  # None: classes 0..C-1 in order; int: seeded permutation first
    class_order: list[int] | None = None  # a fixed class order (a permutation of 0..C-1), cut into the splits
    num_classes: int | None = None  # only needed when the dataset registry does not know the dataset
    variant: str | None = None


@dataclass
class MergeSpec:
    """A merging strategy and its hyperparameters (names as in ``cl_merge.merging``)."""

    method: str
    name: str | None = None  # row label in tables; defaults to ``method``
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    scaling_grid: list[float] | None = None  # candidate ``scaling`` values, chosen on the validation split


@dataclass
class BaselinesSpec:
    zero_shot: bool = True  # θ0 on every task (also the FWT reference b_i)
    individual: bool = True  # each task's own fine-tuned model (normalized-accuracy denominator)
    sequential_finetune: bool = False  # fine-tune stage after stage with no merging
    task_arithmetic: bool = False  # plain task arithmetic next to the methods under study


def _train_default(name: str):
    """The fine-tuning preset's value of ``name`` (``TrainConfig``'s default):
    the recipe's numbers live in one place."""
    from cl_merge.lit.config import TrainConfig

    return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == name)


# a fine-tune's seed is scenario.seed * STAGE_SEED_STRIDE + stage index
STAGE_SEED_STRIDE = 1000


@dataclass
class TrainSpec:
    """The fine-tuning recipe of every stage. Each field is the
    ``cl_merge.lit.TrainConfig`` field of the same name (same defaults, same
    validation); ``grad_clip: null`` turns clipping off. ``warmup_steps:
    null`` means min(500, max_steps // 10). ``accelerator`` is overridden by
    ``cl-merge run --accelerator`` when that is not ``auto``."""

    max_steps: int = _train_default("max_steps")
    lr: float = _train_default("lr")
    batch_size: int = _train_default("batch_size")
    weight_decay: float = _train_default("weight_decay")
    warmup_steps: int | None = None
    optimizer: Literal["adam", "adamw", "sgd"] = _train_default("optimizer")
    momentum: float = _train_default("momentum")  # sgd only
    scheduler: Literal["cosine", "constant", "linear"] = _train_default("scheduler")
    grad_clip: float | None = _train_default("grad_clip")
    label_smoothing: float = _train_default("label_smoothing")
    accelerator: str = _train_default("accelerator")
    devices: int | str | list[int] = _train_default("devices")
    strategy: str = _train_default("strategy")
    precision: str | int = _train_default("precision")
    num_workers: int = _train_default("num_workers")
    max_train: int | None = None  # cap on training examples per task (quick runs); not a TrainConfig field

    def resolved_warmup_steps(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(500, self.max_steps // 10)

    def to_train_config(self, seed: int, accelerator: str | None = None):
        """The ``TrainConfig`` every stage of the scenario fine-tunes with: the
        one mapping of the ``train`` section (the loader builds it at load time,
        so a bad value fails there; the runner builds the same). Raises
        ``HyperparameterError`` naming the field."""
        from cl_merge.lit.config import TrainConfig

        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "max_train"}
        values["warmup_steps"] = self.resolved_warmup_steps()
        if accelerator not in (None, "auto"):
            values["accelerator"] = accelerator
        # the runner caches preprocessed tensors, validates on val only, and prints its own progress
        return TrainConfig(**values, cache_tensors=True, eval_splits=["val"], progress_bar=False, seed=seed)


@dataclass
class EvalSpec:
    batch_size: int = 128
    max_test: int | None = None  # cap on test examples per task
    forward_transfer: bool = False  # also evaluate tasks not seen yet (fills the upper triangle)
    task_aware: bool = True  # class-incremental: report task-aware accuracy beside the union head
    split: Literal["test", "validation"] = "test"


@dataclass
class CalibrationSpec:
    """Data for data-based merging (Fisher, RegMean, AdaMerging, ...): ``n_per_class``
    examples of every class of each task, drawn with ``seed``, through the model's
    evaluation preprocess, in batches of ``batch_size``. ``split: test`` (unlabeled
    test inputs) is only for test-time methods and marks the run transductive."""

    n_per_class: int
    labeled: bool = False
    split: Literal["train", "validation", "test"] = "train"
    seed: int | None = None  # None: the scenario seed
    batch_size: int | None = None  # None: eval.batch_size


@dataclass
class KeepSpec:
    """Which artifacts stay on disk. Resume needs only the latest strategy state
    per method; ``all`` keeps one file per stage (merged models for analysis)."""

    merged: Literal["last", "all"] = "last"
    states: Literal["last", "all"] = "last"


@dataclass
class Scenario:
    """A validated scenario. ``stages`` is fully expanded (class splits resolved)."""

    name: str
    setting: Setting
    model: ModelSpec
    stages: list[StageSpec] = field(default_factory=list)  # or filled from ``split``
    description: str = ""
    split: SplitSpec | None = None
    order: Literal["fixed", "random"] = "fixed"
    orders: int = 1
    order_seed: int = 0
    init: Init = "pretrained"
    methods: list[MergeSpec] = field(default_factory=list)
    baselines: BaselinesSpec = field(default_factory=BaselinesSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    calibration: CalibrationSpec | None = None
    keep: KeepSpec = field(default_factory=KeepSpec)
    k_shot: int | None = None  # default k for few-shot stages
    seed: int = 0

    def stage_seed(self, stage_index: int) -> int:
        """The seed of stage ``stage_index``'s fine-tune."""
        return self.seed * STAGE_SEED_STRIDE + stage_index

    @property
    def task_names(self) -> list[str]:
        return [stage.name for stage in self.stages]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def method_names(self) -> list[str]:
        return [m.name or m.method for m in self.methods]

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def fingerprint(self) -> str:
        """Stable hash of the resolved config (name and description excluded):
        a run folder written under one fingerprint is not resumed under another."""
        from cl_merge.lit.config import COSMETIC_FIELDS

        body = self.to_dict()
        body.pop("name", None)
        body.pop("description", None)
        for key in COSMETIC_FIELDS:  # how a run looks (num_workers), not what it computes
            body["train"].pop(key, None)
        body.pop("keep", None)  # what stays on disk does not change any number
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def expand_orders(self) -> list[list[StageSpec]]:
        """The stage sequences to run: ``[stages]`` for a fixed order, else
        ``orders`` seeded permutations (see :func:`cl_merge.scenario.orders.expand_orders`)."""
        from cl_merge.scenario.orders import expand_orders

        return expand_orders(self)
