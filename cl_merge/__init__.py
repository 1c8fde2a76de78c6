"""cl_merge: continual and multi-task learning by merging task vectors.

The public entry points most users need:

>>> import cl_merge
>>> merged = cl_merge.merge(pretrained, [ft_a, ft_b], method="ties", density=0.2, scaling=0.3)
>>> tv = cl_merge.TaskVector.from_state_dicts(pretrained, ft_a)
"""

from cl_merge import _torchvision_compat  # noqa: F401  (must run before torchvision is imported)
from cl_merge.core.task_vector import TaskVector
from cl_merge.errors import (
    CheckpointError,
    ClMergeError,
    ConfigError,
    DataError,
    HyperparameterError,
    MergeInputError,
    UnknownNameError,
)
from cl_merge.merging import available_methods, get_method, merge

__version__ = "0.1.0"

__all__ = [
    "TaskVector",
    "merge",
    "get_method",
    "available_methods",
    "ClMergeError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "HyperparameterError",
    "MergeInputError",
    "UnknownNameError",
]
