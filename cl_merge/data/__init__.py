"""Datasets for cl_merge: registry (class names, prompt templates), loaders,
task construction (class subsets, variants, k-shot, splits) and helpers.

>>> from cl_merge.data import TaskSpec, load_task
>>> task = load_task(TaskSpec("fashion_mnist", max_train=1000), seed=0)
>>> task.classnames[:2], task.templates[0]
(['T - shirt / top', 'Trouser'], 'a photo of a {}.')
"""

from cl_merge import _torchvision_compat  # noqa: F401  (must run before torchvision is imported)
from cl_merge.data.base import (
    ArrayImageDataset,
    CallableImageDataset,
    FileImageDataset,
    LabeledDataset,
    TaskSplit,
)
from cl_merge.data.registry import (
    DATA_ROOT_ENV,
    DEFAULT_DATA_ROOT,
    REGISTRY,
    TA8,
    TALL14,
    TALL20,
    DatasetInfo,
    HubDataset,
    available_datasets,
    get_dataset_info,
    resolve_data_root,
)
from cl_merge.data.sampling import (
    check_class_splits,
    k_shot_indices,
    sample_calibration,
    split_classes,
    stratified_split,
    stratified_subsample,
)
from cl_merge.data.custom import custom_key, custom_name, is_custom, open_custom, parse_custom
from cl_merge.data.sources import LAYOUTS, TEST_SPLIT_SEED, find_layout, layout_names, load_source, open_source
from cl_merge.data.task import TaskData, TaskSpec, load_task, resolve_classes
from cl_merge.data.transforms import TensorCacheDataset, TransformedDataset, cache_tensors, with_transform
from cl_merge.data.variants import VARIANTS, apply_variant, available_variants, get_variant

__all__ = [
    "ArrayImageDataset",
    "CallableImageDataset",
    "DATA_ROOT_ENV",
    "DEFAULT_DATA_ROOT",
    "DatasetInfo",
    "HubDataset",
    "LAYOUTS",
    "FileImageDataset",
    "LabeledDataset",
    "REGISTRY",
    "TA8",
    "TALL14",
    "TALL20",
    "TEST_SPLIT_SEED",
    "TaskData",
    "TaskSpec",
    "TaskSplit",
    "TensorCacheDataset",
    "TransformedDataset",
    "VARIANTS",
    "apply_variant",
    "available_datasets",
    "available_variants",
    "cache_tensors",
    "custom_key",
    "custom_name",
    "find_layout",
    "is_custom",
    "layout_names",
    "open_custom",
    "open_source",
    "parse_custom",
    "check_class_splits",
    "get_dataset_info",
    "get_variant",
    "k_shot_indices",
    "load_source",
    "load_task",
    "resolve_classes",
    "resolve_data_root",
    "sample_calibration",
    "split_classes",
    "stratified_split",
    "stratified_subsample",
    "with_transform",
]
