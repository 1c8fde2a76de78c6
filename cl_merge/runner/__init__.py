"""The stage runner: scenario -> fine-tune -> task vector -> merge -> evaluate."""

from cl_merge.runner.run import RunOptions, run_scenario

__all__ = ["RunOptions", "run_scenario"]
