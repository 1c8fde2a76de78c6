"""Declarative scenarios: ``scenarios/*.yaml`` loaded into typed, validated objects.

>>> from cl_merge.scenario import load_scenario
>>> sc = load_scenario("offline_default", overrides=["train.max_steps=8"])
>>> for order in sc.expand_orders(): ...
"""

from cl_merge.scenario.loader import (
    ENV_VAR,
    checkpoint_path,
    find_scenario,
    list_scenarios,
    load_scenario,
    scenario_dirs,
    scenario_from_dict,
)
from cl_merge.scenario.orders import contiguous_class_splits, seeded_permutation
from cl_merge.scenario.schema import (
    BaselinesSpec,
    CalibrationSpec,
    EvalSpec,
    MergeSpec,
    ModelSpec,
    Scenario,
    SplitSpec,
    StageSpec,
    TrainSpec,
)

__all__ = [
    "ENV_VAR",
    "BaselinesSpec",
    "CalibrationSpec",
    "EvalSpec",
    "MergeSpec",
    "ModelSpec",
    "Scenario",
    "SplitSpec",
    "StageSpec",
    "TrainSpec",
    "checkpoint_path",
    "contiguous_class_splits",
    "find_scenario",
    "list_scenarios",
    "load_scenario",
    "scenario_dirs",
    "scenario_from_dict",
    "seeded_permutation",
]
