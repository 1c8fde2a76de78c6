"""Shared by the accuracy benchmarks: open a finished run folder's first
order through the runner (fine-tunes are found done, not redone) and cut
calibration tensors from a task's splits."""

from __future__ import annotations

import torch


def open_order_run(scenario, options):
    """The runner's view of order 0 of a run folder: (order_run, stages).
    ``order_run.task_vector("independent", t)``, ``order_run.pool`` (heads,
    streamed accuracy) and the θ0 it merges from (``order_run.theta0``)."""
    from cl_merge.runner.run import _order_run, _quiet_lightning, _setup

    _quiet_lightning()
    setup = _setup(scenario, options, lock=False)
    stages = scenario.expand_orders()[0]
    return _order_run(scenario, stages, setup.top, setup, options), stages


def split_tensors(order_run, stage, split: str, examples: int | None = None, *, seed: int | None = None):
    """(inputs, labels) of a task's split through the model's evaluation
    preprocess: the first ``examples`` of a seeded permutation (``seed``),
    or of the split in order (``seed=None``)."""
    from cl_merge.data import cache_tensors

    data = getattr(order_run.pool.task(stage), split)
    positions = torch.arange(len(data))
    if seed is not None:
        positions = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    if examples is not None:
        positions = positions[:examples]
    cached = cache_tensors(data.subset(positions.numpy()), order_run.model.preprocess(train=False))
    return cached.inputs, torch.as_tensor(cached.labels)


def batches_of(tensor: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [tensor[i:i + size] for i in range(0, len(tensor), size)]
