"""Which kernels a tensor gets: the CPU's or an accelerator's."""

from __future__ import annotations

import torch


def host_kernels(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` gets the CPU's kernels: entry-wise merges in
    cache-sized chunks, the tasks' decompositions side by side on threads,
    scipy's LAPACK where it is the cheaper algorithm. Elsewhere (a GPU) an
    entry is one kernel call and torch's own linear algebra runs.

    Every strategy asks here and nowhere else, so that the tests can run
    the accelerator's branches on the CPU (by replacing this function) and
    compare them with the CPU's."""
    return tensor.device.type == "cpu"
