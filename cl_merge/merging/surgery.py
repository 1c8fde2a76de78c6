"""Representation Surgery: per-task adapters that pull the merged model's
representation back toward each fine-tuned model's."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from cl_merge.errors import HyperparameterError, MergeInputError
from cl_merge.merging._data import as_logits, eval_mode, require_int
from cl_merge.merging.adamerging import TestTimeStrategy
from cl_merge.merging.base import MergeMethod, PerTaskMergeResult, require
from cl_merge.merging.lifecycle import TaskInput, build_strategy
from cl_merge.merging.registry import get_method, register

Tensor = torch.Tensor


class SurgeryAdapter(nn.Module):
    """z ↦ z − W_up ReLU(W_down z): the paper's task-specific module
    (rank ``rank``, no biases; W_down Kaiming-uniform, W_up zero, so it
    starts as the identity)."""

    def __init__(self, dim: int, rank: int, generator: torch.Generator | None = None):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        with torch.no_grad():
            bound = 1.0 / math.sqrt(dim)  # kaiming_uniform_(a=√5), nn.Linear's default, drawn from our generator
            self.down.weight.uniform_(-bound, bound, generator=generator)
            self.up.weight.zero_()

    def forward(self, features: Tensor) -> Tensor:
        return features - self.up(torch.relu(self.down(features)))


class _AdaptedHead(nn.Module):
    def __init__(self, adapter: SurgeryAdapter, head: nn.Module | Callable | None):
        super().__init__()
        self.adapter = adapter
        self.head = head

    def forward(self, features: Tensor) -> Tensor:
        adapted = self.adapter(features.to(self.adapter.down.weight.dtype))
        return self.head(adapted) if self.head is not None else adapted


class SurgeryResult(PerTaskMergeResult):
    """The base strategy's merged weights (shared, or per task where the
    base strategy has per-task parts) plus one adapter per task on the
    module's output (the representation fed to the task's head).

    The runner evaluates task i with encoder weights ``task_state_dict(i)``
    and head ``wrap_head(i, head_i)`` (the adapter, then the head); or
    calls ``adapt(i, features)`` itself between encoder and head."""

    def __init__(self, base, adapters: nn.ModuleList):
        shared = dict(base)
        per_task = isinstance(base, PerTaskMergeResult)
        super().__init__(shared, (lambda i: base.task_state_dict(i)) if per_task else (lambda i: dict(shared)),
                         len(adapters))
        self.adapters = adapters

    def adapt(self, index: int, features: Tensor) -> Tensor:
        return self.adapters[index](features)

    def wrap_head(self, index: int, head: nn.Module | Callable | None) -> nn.Module:
        return _AdaptedHead(self.adapters[index], head)


@register
@dataclass
class Surgery(MergeMethod):
    """Representation Surgery: after merging with ``base_method``, each task
    t gets an adapter z ↦ z − W_up ReLU(W_down z) on the merged encoder's
    output, trained on unlabeled test inputs of task t to minimise the L1
    distance to fine-tuned model t's output on the same inputs
    (transductive, like AdaMerging).

    Yang et al., "Representation Surgery for Multi-Task Model Merging",
    ICML 2024 (https://arxiv.org/abs/2402.02705).

    ``base_method`` (default ``adamerging``, the paper's and FusionBench's
    best pairing; any registered method works, e.g. ``task_arithmetic``)
    with ``base_hyperparameters``; ``rank`` 16, Adam ``lr`` 1e-3 (betas
    0.9/0.999, no weight decay), ``steps`` 1000, ``batch_size`` 16, as
    FusionBench's CLIP config. Each step draws one batch of every task; the
    adapters are disjoint, so one Adam step on the summed loss equals
    FusionBench's step per task. A base method that learns on training data
    (RegMean, Fisher) is refused: a strategy has one calibration split.

    The result is a :class:`SurgeryResult`: the merged weights do not change;
    the adapters act on features, between the encoder and each task's head.
    Resume: the adapters (and the base strategy's state) are the state.
    """

    name = "surgery"
    reference = "https://arxiv.org/abs/2402.02705"
    per_task = True

    base_method: str = "adamerging"
    base_hyperparameters: dict | None = None
    rank: int = 16
    lr: float = 1e-3
    steps: int = 1000
    batch_size: int = 16
    seed: int = 0

    def validate(self) -> None:
        require(isinstance(self.base_method, str) and self.base_method != self.name,
                f"{self.name}: base_method must name another merging method, got {self.base_method!r}")
        require(self.base_hyperparameters is None or isinstance(self.base_hyperparameters, dict),
                f"{self.name}: base_hyperparameters must be a mapping")
        require_int("rank", self.rank, self.name)
        require(isinstance(self.lr, (int, float)) and self.lr > 0, f"{self.name}: lr must be > 0, got {self.lr!r}")
        require_int("steps", self.steps, self.name, minimum=0)
        require_int("batch_size", self.batch_size, self.name)
        require_int("seed", self.seed, self.name, minimum=0)
        self.base()  # unknown base method / hyperparameters fail now

    def base(self) -> MergeMethod:
        return get_method(self.base_method, **(self.base_hyperparameters or {}))

    def create_strategy(self, key_filter=None, device=None):
        inner = build_strategy(self.base(), key_filter=key_filter, device=device)
        if "data" in inner.needs and inner.data_split != "test":
            raise HyperparameterError(f"{self.name}: base_method {self.base_method!r} learns on {inner.data_split} "
                                      "data; surgery's batches are unlabeled test inputs (use a data-free method "
                                      "or adamerging)")
        return SurgeryStrategy(self, inner, key_filter, device)


class SurgeryStrategy(TestTimeStrategy):

    def __init__(self, method: Surgery, inner, key_filter=None, device=None):
        super().__init__(method, key_filter, device)
        self.inner = inner

    def _start_data(self) -> None:
        super()._start_data()
        self.inner.start(self.pretrained, self.context)
        self.adapters: nn.ModuleList | None = None
        self.history: list[float] = []

    def _absorb(self, task: TaskInput) -> None:
        super()._absorb(task)
        self.inner.absorb(task)

    def features(self, weights, batch) -> Tensor:
        return as_logits(self.context.call(weights, batch)).float()

    def train_adapters(self, merged) -> nn.ModuleList:
        m = self.method
        streams = self.batch_streams(m.batch_size, m.seed)
        generator = torch.Generator().manual_seed(m.seed)
        per_task = isinstance(merged, PerTaskMergeResult)
        merged_weights = [self._on_device(merged.task_state_dict(i) if per_task else merged)
                          for i in range(len(self.tasks))]
        finetuned = [self.task_weights(t) for t in self.tasks]
        module = self.context.module
        adapters = None
        self.history = []
        with eval_mode(module):
            for step in range(max(m.steps, 1)):
                pairs = []
                with torch.no_grad():
                    for i, stream in enumerate(streams):
                        batch = next(stream)
                        pairs.append((self.features(merged_weights[i], batch), self.features(finetuned[i], batch)))
                if adapters is None:
                    dim = pairs[0][0].shape[-1]
                    adapters = nn.ModuleList(SurgeryAdapter(dim, m.rank, generator) for _ in self.tasks).to(self.device)
                    optimizer = torch.optim.Adam(adapters.parameters(), lr=m.lr, betas=(0.9, 0.999), weight_decay=0.0)
                    if m.steps == 0:
                        break
                with torch.enable_grad():
                    loss = sum(nn.functional.l1_loss(adapters[i](z), target) for i, (z, target) in enumerate(pairs))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                self.history.append(float(loss.detach()))
        return adapters.cpu().requires_grad_(False)

    def _on_device(self, weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for key, value in weights.items():
            value = value.to(self.device)
            out[key] = value.float() if value.is_floating_point() and key in self.merge_keys else value
        return out

    fixed_by = "the adapters are trained"

    def _merged(self):
        if self._cached is None:
            merged = self.inner.current()
            if self.adapters is None or len(self.adapters) != len(self.tasks):
                self.adapters = self.train_adapters(merged)
            self._cached = SurgeryResult(merged, self.adapters)
        return self._cached

    def state_dict(self):
        state = {}
        inner = self.inner.state_dict()
        if inner:
            state.update({f"base::{k}": v for k, v in inner.items()})
        if self.adapters is not None:
            state.update({f"surgery::{k}": v.detach().cpu().clone() for k, v in self.adapters.state_dict().items()})
        return state or None

    def load_state_dict(self, state, num_absorbed: int) -> None:
        inner = {k[len("base::"):]: v for k, v in state.items() if k.startswith("base::")}
        own = {k[len("surgery::"):]: v for k, v in state.items() if k.startswith("surgery::")}
        if inner:
            self.inner.load_state_dict(inner, num_absorbed)
        if own:
            count = len({k.split(".")[0] for k in own})
            if count != num_absorbed:
                raise MergeInputError(f"{self.name}: saved state holds adapters for {count} task(s), expected {num_absorbed}")
            dim, rank = own["0.down.weight"].shape[1], own["0.down.weight"].shape[0]
            adapters = nn.ModuleList(SurgeryAdapter(dim, rank) for _ in range(count))
            adapters.load_state_dict(own)
            self.adapters = adapters.requires_grad_(False)
        self._cached = None
