"""Merging strategies: one registry, one small file per strategy family.

``merge(pretrained, finetuned, method=..., **hparams)`` is the stable entry
point. Adding a strategy: write its file (a ``MergeMethod`` dataclass with
``@register``) and import it below.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from cl_merge.core.state_dict import make_filter
from cl_merge.errors import HyperparameterError, MergeInputError
from cl_merge.merging.base import (
    MergeMethod,
    PerTaskMergeResult,
    TensorStream,
    as_model_list,
    builds_own_strategy,
    resolve_device,
    run_merge,
)
from cl_merge.merging.incremental import IncrementalMerger
from cl_merge.merging.context import MergeContext
from cl_merge.merging.lifecycle import (
    BatchStrategy,
    IncrementalStrategy,
    MergeStrategy,
    ScalingSearch,
    TaskInput,
    build_strategy,
    merge_with_strategy,
)
from cl_merge.merging.registry import available_methods, describe_methods, get_method, method_class, register

# one line per strategy file
from cl_merge.merging import task_arithmetic  # noqa: F401,E402
from cl_merge.merging import ties, dare, breadcrumbs, magmax, model_stock, slerp  # noqa: F401,E402
from cl_merge.merging import lines  # noqa: F401,E402
from cl_merge.merging import tall_masks, emr, tsv, iso  # noqa: F401,E402
from cl_merge.merging import opcm, dop, wudi, cofima  # noqa: F401,E402
from cl_merge.merging import fisher, regmean, adamerging, surgery  # noqa: F401,E402

Tensor = torch.Tensor


def merge(
    pretrained: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    method: str | MergeMethod = "task_arithmetic",
    *,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    check_finite: bool = True,
    model=None,
    data=None,
    device=None,
    **hparams,
):
    """Merge fine-tuned models that share the pretrained model ``pretrained``.

    ``finetuned`` is a list of state dicts with the same keys and shapes as
    ``pretrained``. Float entries selected by ``include``/``exclude`` globs
    (``re:`` prefix for regexes) are merged; the rest are copied from
    ``pretrained`` (integer/bool buffers must be equal everywhere). Returns a
    new state dict in the pretrained dtypes, or a ``PerTaskMergeResult`` for
    strategies with per-task parts (``tall_masks``, ``emr``).

    Data-based strategies (``fisher``, ``regmean``, ``adamerging``, ...) also
    take ``model``, an ``nn.Module`` whose state dict has the same keys (its
    values are not used), and ``data``, one sequence of batches per fine-tuned
    model; a batch is passed as ``model(b)`` (tensor), ``model(*b)``
    (tuple/list) or ``model(**b)`` (dict). Strategies with a running state
    of their own (``opcm``) absorb the models in list order.

    ``device`` (e.g. ``"cuda"``): run the arithmetic there, one entry at a
    time, results back on the CPU. Inputs may require grad: the merge runs
    under ``torch.no_grad()`` and returns plain tensors.
    """
    if isinstance(method, MergeMethod):
        if hparams:
            raise TypeError("pass hyperparameters either in the MergeMethod or as keywords, not both")
        strategy = method
    else:
        strategy = get_method(method, **hparams)
    key_filter = make_filter(include, exclude)
    if not builds_own_strategy(strategy):
        if model is not None or data is not None:
            given = "model" if model is not None else "data"
            raise MergeInputError(f"{strategy.name} is data-free: it takes no {given}= (only data-based methods do)")
        return run_merge(strategy, pretrained, finetuned, key_filter=key_filter, check=check_finite, device=device)
    finetuned = as_model_list(finetuned)
    lifecycle = build_strategy(strategy, key_filter=key_filter, device=device)
    context = None
    if model is not None or "model" in lifecycle.needs:
        context = MergeContext(module=model, device=resolve_device(device) or "cpu")
        context.check_keys(pretrained)
    return merge_with_strategy(lifecycle, pretrained, finetuned, context=context, data=data)


def incremental_merger(pretrained: Mapping[str, Tensor], method: str = "task_arithmetic", *,
                       include=None, exclude=None, device=None, **hparams) -> IncrementalMerger:
    """Running merge, one task vector at a time (``.update(tv)``, ``.current()``).
    ``device``: where each update runs (the state stays on the CPU)."""
    strategy = get_method(method, **hparams)
    if builds_own_strategy(strategy):
        lifecycle = build_strategy(strategy, key_filter=make_filter(include, exclude), device=device, continual=True)
        if not lifecycle.incremental:
            raise HyperparameterError(f"{strategy.name} has no incremental form; merge the task vectors in one batch")
        lifecycle.start(pretrained)
        return lifecycle
    return IncrementalMerger(strategy, pretrained, make_filter(include, exclude), device=device)


__all__ = [
    "merge",
    "incremental_merger",
    "available_methods",
    "describe_methods",
    "get_method",
    "method_class",
    "register",
    "MergeMethod",
    "PerTaskMergeResult",
    "TensorStream",
    "IncrementalMerger",
    "MergeContext",
    "MergeStrategy",
    "IncrementalStrategy",
    "BatchStrategy",
    "ScalingSearch",
    "TaskInput",
    "build_strategy",
]
