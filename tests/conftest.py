"""Shared test helpers: runs of tiny scenarios in an isolated cache; the
data-free strategies."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def isolated_run_env(tmp_path, monkeypatch):
    """Head/weights cache under the test's tmp folder and wandb off, so tests
    never share (or pollute) the user's ~/.cache/cl_merge."""
    monkeypatch.setenv("CL_MERGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")


def run_quietly(scenario, out: Path, hook=None):
    """``run_scenario`` with no progress bars, no wandb and no log lines."""
    from cl_merge.runner import RunOptions, run_scenario

    options = RunOptions(out_dir=out, progress=False, wandb_mode="disabled", log=lambda msg: None)
    if hook is not None:
        options.hook = hook
    return run_scenario(scenario, options)


def data_free_methods() -> list[str]:
    """The registered strategies that merge from weights alone (no model or data)."""
    from cl_merge.merging import available_methods, build_strategy, get_method

    return [m for m in available_methods() if "model" not in build_strategy(get_method(m)).needs]
