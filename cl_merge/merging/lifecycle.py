"""The one lifecycle the runner (and ``cl_merge.merge``) drives every strategy through.

    strategy = build_strategy(get_method("ties", density=0.2))   # built once
    strategy.start(theta0, context)                               # θ0 (+ what data-based methods need)
    for task in tasks:
        strategy.absorb(TaskInput(index, task_vector, batches=..., head=...))
        weights = strategy.current()                              # merged weights so far
    state = strategy.state_dict()                                 # resume: load_state_dict(state)

A ``MergeStrategy`` never sees files, Lightning or the runner: it gets θ0, one
task at a time (its task vector and whatever that task offers), and, when it
asks for them, a :class:`~cl_merge.merging.context.MergeContext` (a functional
forward of the model, the device). Data-free strategies stay pure tensor
functions (``MergeMethod``); :func:`build_strategy` wraps them:

- :class:`IncrementalStrategy` for strategies with an incremental form (state
  independent of the number of tasks, saved for resume);
- :class:`BatchStrategy` for the others (keeps references to the absorbed task
  vectors, which may be lazy readers of files on disk, and merges them all in
  one streamed pass; resume replays ``absorb`` with those references).

A method class that needs more than this (data, model-wide steps such as
OPCM's rescaling) implements ``create_strategy(...)`` and returns its own
``MergeStrategy``.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import torch

from cl_merge.core.state_dict import DictSource, KeyFilter
from cl_merge.errors import HyperparameterError, MergeInputError
from cl_merge.merging.base import MergeMethod, PerTaskMergeResult, run_merge
from cl_merge.merging.context import MergeContext

Tensor = torch.Tensor
Weights = Mapping[str, Tensor]


@dataclass
class TaskInput:
    """What one task offers a strategy.

    ``task_vector``: τ = θ_t − θ0 (a dict, a ``TaskVector``, or a lazy reader
    with ``get``/``keys``). ``batches``: calibration batches of this task
    (re-iterable; each one a tensor, a tuple/list or a dict, passed to the
    model as ``module(b)``, ``module(*b)`` or ``module(**b)``), ``None`` when the
    strategy asked for no data. ``labels``: labels aligned with ``batches``
    when labeled calibration data was asked for. ``head``: maps the module's
    output to this task's logits (identity when ``None``).
    """

    index: int
    task_vector: Any
    name: str = ""
    batches: Iterable[Any] | None = None
    labels: Sequence[Tensor] | None = None
    head: Callable[[Tensor], Tensor] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


class MergeStrategy(abc.ABC):
    """A strategy instance for one sequence of tasks."""

    #: memory independent of the number of absorbed tasks (continual-friendly)
    incremental: ClassVar[bool] = False
    #: what the strategy asks of the context: any of "model", "data"
    needs: ClassVar[frozenset[str]] = frozenset()
    #: "train" | "val" | "test": where calibration batches may come from
    #: ("test" = unlabeled test inputs: transductive, recorded as such)
    data_split: ClassVar[str] = "train"
    #: calibration batches must carry labels
    needs_labels: ClassVar[bool] = False
    #: resume replays ``absorb`` for the saved tasks (their task vectors and
    #: batches) and then, when ``state_dict()`` gave something, calls
    #: ``load_state_dict`` too (e.g. AdaMerging's learned coefficients)
    resume_replays_absorb: ClassVar[bool] = False

    def __init__(self, method: MergeMethod):
        self.method = method
        self.name = method.name
        self.pretrained: Weights | None = None
        self.context: MergeContext | None = None
        self.num_absorbed = 0

    # -- lifecycle
    def start(self, pretrained: Weights, context: MergeContext | None = None) -> None:
        if "model" in self.needs and (context is None or context.module is None):
            raise MergeInputError(f"{self.name} needs a model: pass model=<nn.Module with the same state-dict keys>")
        self.pretrained = pretrained
        self.context = context
        self.num_absorbed = 0
        self._start()

    def absorb(self, task: TaskInput) -> None:
        if self.pretrained is None:
            raise RuntimeError(f"{self.name}: start() before absorb()")
        if "data" in self.needs and task.batches is None:
            named = f" ({task.name})" if task.name else ""
            raise MergeInputError(f"{self.name} needs calibration data for task {task.index}{named}: "
                                  "pass data=[batches of task 0, ...]")
        self._absorb(task)
        self.num_absorbed += 1

    @abc.abstractmethod
    def current(self, **overrides) -> Weights | PerTaskMergeResult:
        """Merged weights of the absorbed tasks (θ0 before any). ``overrides``:
        hyperparameters that do not change the absorbed state (``scaling``),
        so a scaling search evaluates candidates from one state."""

    # -- resume
    def state_dict(self) -> dict[str, Tensor] | None:
        """Tensors that restore the strategy after the absorbed tasks, or
        ``None`` when restoring means replaying ``absorb`` (batch strategies,
        whose task vectors already live on disk)."""
        return None

    def load_state_dict(self, state: Mapping[str, Tensor], num_absorbed: int) -> None:
        raise NotImplementedError(f"{self.name} restores by replaying absorb()")

    # -- convenience for scripts (the incremental_merger contract)
    def update(self, task_vector: Weights) -> None:
        self.absorb(TaskInput(self.num_absorbed, task_vector))

    # -- hooks for subclasses
    def _start(self) -> None:
        pass

    @abc.abstractmethod
    def _absorb(self, task: TaskInput) -> None:
        ...

    def _method_with(self, overrides: Mapping[str, Any]) -> MergeMethod:
        if not overrides:
            return self.method
        unknown = [k for k in overrides if k not in self.method.hparam_names()]
        if unknown:
            raise HyperparameterError(f"{self.name}: unknown hyperparameter {unknown[0]!r}")
        return dataclasses.replace(self.method, **overrides)


class IncrementalStrategy(MergeStrategy):
    """A ``MergeMethod`` with an incremental form, through ``IncrementalMerger``."""

    incremental = True

    def __init__(self, method: MergeMethod, key_filter: KeyFilter | None = None, device=None):
        super().__init__(method)
        self.key_filter = key_filter
        self.device = device
        self.merger = None

    def _start(self) -> None:
        from cl_merge.merging.incremental import IncrementalMerger

        kwargs = {"device": self.device} if self.device is not None else {}
        self.merger = IncrementalMerger(self.method, self.pretrained, self.key_filter, **kwargs)

    def _absorb(self, task: TaskInput) -> None:
        self.merger.update(task.task_vector)

    def current(self, **overrides):
        if not overrides:
            return self.merger.current()
        original = self.merger.method
        self.merger.method = self._method_with(overrides)
        try:
            return self.merger.current()
        finally:
            self.merger.method = original

    def state_dict(self):
        return self.merger.state_dict()

    def load_state_dict(self, state, num_absorbed: int) -> None:
        self.merger.load_state_dict(state)
        if self.merger.num_seen != num_absorbed:
            raise MergeInputError(f"{self.name}: saved state holds {self.merger.num_seen} task(s), expected {num_absorbed}")
        self.num_absorbed = num_absorbed


class BatchStrategy(MergeStrategy):
    """A ``MergeMethod`` with no incremental form: keeps references to the
    absorbed task vectors and merges them in one streamed pass."""

    resume_replays_absorb = True

    def __init__(self, method: MergeMethod, key_filter: KeyFilter | None = None, device=None):
        super().__init__(method)
        self.key_filter = key_filter
        self.device = device
        self.task_vectors: list[Any] = []

    def _start(self) -> None:
        self.task_vectors = []

    def _absorb(self, task: TaskInput) -> None:
        self.task_vectors.append(task.task_vector)

    def current(self, **overrides):
        if not self.task_vectors:
            return dict(self.pretrained)
        method = self._method_with(overrides)
        sources = [tv if hasattr(tv, "get") and hasattr(tv, "keys") else DictSource(tv, f"task vector {i}")
                   for i, tv in enumerate(self.task_vectors)]
        if len(sources) == 1 and method.min_models > 1:
            # a method defined for two or more models (SLERP, Model Stock's
            # angle), at the first stage of a continual run: the only model
            # there is to "merge" is that task's fine-tuned model, θ0 + τ
            from cl_merge.merging.registry import get_method

            method = get_method("task_arithmetic", scaling=1.0)
        kwargs = {"device": self.device} if self.device is not None else {}
        return run_merge(method, self.pretrained, sources, key_filter=self.key_filter, task_vectors=True, **kwargs)


class ScalingSearch(MergeStrategy):
    """Chooses ``scaling`` on held-out data around any strategy: ``score``
    maps merged weights to a number to maximise (e.g. mean validation
    accuracy over the tasks seen so far); ties go to the smaller |scaling|."""

    def __init__(self, inner: MergeStrategy, grid: Sequence[float], score: Callable[[Any], float]):
        if not grid:
            raise HyperparameterError(f"{inner.name}: the scaling grid is empty")
        if "scaling" not in inner.method.hparam_names():
            raise HyperparameterError(f"{inner.name} has no 'scaling' hyperparameter to search")
        super().__init__(inner.method)
        self.inner = inner
        self.grid = [float(s) for s in grid]
        self.score = score
        self.incremental = inner.incremental
        self.needs = inner.needs
        self.data_split = inner.data_split
        self.needs_labels = inner.needs_labels
        self.resume_replays_absorb = inner.resume_replays_absorb
        self.chosen: float | None = None
        self.scores: dict[float, float] = {}

    def start(self, pretrained, context=None) -> None:
        self.inner.start(pretrained, context)
        super().start(pretrained, context)

    def _absorb(self, task: TaskInput) -> None:
        self.inner.absorb(task)
        self.chosen = None

    def choose(self) -> float:
        if self.chosen is None:
            self.scores = {s: float(self.score(self.inner.current(scaling=s))) for s in self.grid}
            self.chosen = max(self.grid, key=lambda s: (self.scores[s], -abs(s)))
        return self.chosen

    def current(self, **overrides):
        if "scaling" in overrides:
            return self.inner.current(**overrides)
        return self.inner.current(scaling=self.choose(), **overrides)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state, num_absorbed: int) -> None:
        self.inner.load_state_dict(state, num_absorbed)
        self.num_absorbed = num_absorbed


def build_strategy(method: MergeMethod, *, key_filter: KeyFilter | None = None, device=None,
                   continual: bool = False) -> MergeStrategy:
    """The lifecycle object for ``method``. ``continual=True`` asks for a form
    whose memory does not grow with the number of tasks where one exists."""
    create = getattr(method, "create_strategy", None)
    if create is not None:
        return create(key_filter=key_filter, device=device)
    if method.supports_incremental():
        return IncrementalStrategy(method, key_filter, device)
    return BatchStrategy(method, key_filter, device)


def merge_with_strategy(strategy: MergeStrategy, pretrained: Weights, finetuned: Sequence[Weights], *,
                        context: MergeContext | None = None, data: Sequence[Iterable[Any]] | None = None,
                        task_vectors: bool = False):
    """Start, absorb each model in list order, return ``current()``."""
    if data is not None and len(data) != len(finetuned):
        raise MergeInputError(f"data has batches for {len(data)} task(s) but {len(finetuned)} fine-tuned model(s) were given")
    strategy.start(pretrained, context)
    for i, model in enumerate(finetuned):
        tv = model if task_vectors else _difference(model, pretrained, i)
        strategy.absorb(TaskInput(i, tv, batches=None if data is None else data[i], head=None))
    return strategy.current()


def _difference(finetuned: Weights, pretrained: Weights, index: int) -> dict[str, Tensor]:
    out = {}
    for key, base in pretrained.items():
        if key not in finetuned:
            raise MergeInputError(f"fine-tuned model {index} lacks key {key!r}")
        value = finetuned[key]
        if not isinstance(value, Tensor):
            raise MergeInputError(f"fine-tuned model {index}: {key!r} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(base.shape):
            raise MergeInputError(f"fine-tuned model {index}: {key!r} has shape {list(value.shape)}, "
                                  f"the pretrained model has {list(base.shape)}")
        if base.is_floating_point():
            dtype = torch.promote_types(base.dtype, torch.float32)
            out[key] = value.detach().to(dtype) - base.detach().to(dtype)
        else:
            out[key] = value
    return out


__all__ = ["TaskInput", "MergeStrategy", "IncrementalStrategy", "BatchStrategy", "ScalingSearch", "build_strategy",
           "merge_with_strategy"]
