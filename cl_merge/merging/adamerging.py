"""AdaMerging: merging coefficients learned at test time by entropy minimisation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from cl_merge.core.state_dict import DictSource
from cl_merge.errors import MergeInputError
from cl_merge.merging._data import (
    DataBasedStrategy,
    cycle_batches,
    entropy,
    eval_mode,
    require_int,
)
from cl_merge.merging.base import MergeMethod, TensorStream, check_fraction, require
from cl_merge.merging.lifecycle import TaskInput
from cl_merge.merging.registry import register
from cl_merge.merging.ties import Ties

Tensor = torch.Tensor

GRANULARITIES = ("task", "layer")


def ties_masked_task_vectors(pretrained: Mapping[str, Tensor], task_vectors: Sequence[Mapping[str, Tensor]],
                             density: float) -> list[dict[str, Tensor]]:
    """AdaMerging++'s inputs: each τ_t trimmed to its top-``density`` entries
    (TIES' global threshold, computed by the TIES strategy's own code), then
    kept only where its sign agrees with the elected sign sign(Σ_t trimmed τ_t)."""
    keys = list(task_vectors[0])
    stream = TensorStream(DictSource({k: pretrained[k] for k in keys}, "pretrained"),
                          [DictSource(tv, f"task vector {i}") for i, tv in enumerate(task_vectors)], keys,
                          check=False, deltas_given=True)
    ties = Ties(density=density)
    thresholds = ties._global_thresholds(stream) if density < 1 else [0.0] * len(task_vectors)
    out: list[dict[str, Tensor]] = [{} for _ in task_vectors]
    for key in keys:
        trimmed = [tv[key] * (tv[key].abs() >= thr) if thr > 0 else tv[key]
                   for tv, thr in zip(task_vectors, thresholds)]
        elected = torch.sign(sum(trimmed))
        for i, t in enumerate(trimmed):
            out[i][key] = t * (torch.sign(t) == elected) * (elected != 0)
    return out


def merged_weights(base: Mapping[str, Tensor], task_vectors: Sequence[Mapping[str, Tensor]], coefficients: Tensor,
                   keys: Sequence[str]) -> dict[str, Tensor]:
    """θ0 + Σ_t λ_t τ_t with λ of shape (T, 1) (task-wise) or (T, len(keys))
    (one coefficient per tensor: layer-wise); differentiable in λ."""
    out = dict(base)
    per_key = coefficients.shape[1] > 1
    for j, key in enumerate(keys):
        column = coefficients[:, j] if per_key else coefficients[:, 0]
        total = base[key].to(task_vectors[0][key].dtype)
        for t, tv in enumerate(task_vectors):
            total = total + column[t] * tv[key]
        out[key] = total
    return out


@register
@dataclass
class AdaMerging(MergeMethod):
    """AdaMerging: θ = θ0 + Σ_t λ_t τ_t with the coefficients λ learned on
    unlabeled test inputs of every task by minimising the entropy of the
    merged model's predictions (test-time adaptation: transductive).

    Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task
    Learning", ICLR 2024 (https://arxiv.org/abs/2310.02575).

    ``granularity="task"``: one λ per task; ``"layer"`` (default, the
    paper's best): one λ per task and merged tensor, as the authors' code
    and FusionBench. λ starts at ``init_value`` 0.3; Adam, ``lr`` 1e-3,
    ``max_steps`` 1000; each step draws ``batch_size`` 16 inputs of every
    task (the given batches regrouped, cycled, shuffled by ``seed``) and
    minimises Σ_t mean-entropy_t (summed over tasks as FusionBench; the
    paper's objective). λ is not clamped (FusionBench's default).
    ``ties_trim`` (AdaMerging++): the task vectors are first TIES-trimmed to
    ``density`` and sign-elected. ``max_steps=0``: task arithmetic with λ =
    ``init_value``.

    Resume: the learned λ is the strategy's state; a rerun that restores it
    for the same tasks reuses it instead of learning again.
    """

    name = "adamerging"
    reference = "https://arxiv.org/abs/2310.02575"

    granularity: str = "layer"
    init_value: float = 0.3
    lr: float = 1e-3
    max_steps: int = 1000
    batch_size: int = 16
    seed: int = 0
    ties_trim: bool = False
    density: float = 0.2

    def validate(self) -> None:
        require(self.granularity in GRANULARITIES,
                f"{self.name}: granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        require(isinstance(self.init_value, (int, float)), f"{self.name}: init_value must be a number")
        require(isinstance(self.lr, (int, float)) and self.lr > 0, f"{self.name}: lr must be > 0, got {self.lr!r}")
        require_int("max_steps", self.max_steps, self.name, minimum=0)
        require_int("batch_size", self.batch_size, self.name)
        require_int("seed", self.seed, self.name, minimum=0)
        require(isinstance(self.ties_trim, bool), f"{self.name}: ties_trim must be true or false")
        check_fraction("density", self.density, method=self.name)

    def create_strategy(self, key_filter=None, device=None):
        return AdaMergingStrategy(self, key_filter, device)


class TestTimeStrategy(DataBasedStrategy):
    """Keeps the absorbed tasks (task vectors by reference, their unlabeled
    test batches) and learns at ``current()``."""

    data_split = "test"
    resume_replays_absorb = True

    def _start_data(self) -> None:
        self.tasks: list[TaskInput] = []
        self._cached = None

    def _absorb(self, task: TaskInput) -> None:
        self._source(task)  # keys and shapes checked now
        self.tasks.append(task)
        self._cached = None

    def batch_streams(self, batch_size: int, seed: int) -> list:
        """One endless stream of ``batch_size``-row batches per task; the
        order of the given batches is reshuffled every pass (seeded)."""
        streams = []
        for task in self.tasks:
            batches = task.batches
            if isinstance(batches, Sequence):
                batches = _Shuffled(batches, torch.Generator().manual_seed(seed * 100003 + task.index))
            streams.append(cycle_batches(batches, batch_size, what=f"task {task.index}"))
        return streams

    def logits(self, task_position: int, weights, batch) -> Tensor:
        return self.task_logits(self.tasks[task_position], weights, batch)


class _Shuffled:
    def __init__(self, batches: Sequence, generator: torch.Generator):
        self.batches, self.generator = batches, generator

    def __iter__(self):
        for i in torch.randperm(len(self.batches), generator=self.generator).tolist():
            yield self.batches[i]


class AdaMergingStrategy(TestTimeStrategy):

    def _start_data(self) -> None:
        super()._start_data()
        self.coefficients: Tensor | None = None
        self.history: list[float] = []  # Σ_t entropy at each step, before the update

    def initial_coefficients(self, num_tasks: int) -> Tensor:
        columns = 1 if self.method.granularity == "task" else len(self.merge_keys)
        return torch.full((num_tasks, columns), float(self.method.init_value), dtype=torch.float32)

    def task_vectors(self) -> list[dict[str, Tensor]]:
        taus = [self.task_vector(t) for t in self.tasks]
        if self.method.ties_trim:
            with torch.no_grad():
                taus = ties_masked_task_vectors(self.base, taus, self.method.density)
        return taus

    def learn(self, taus: list[dict[str, Tensor]]) -> Tensor:
        m = self.method
        lam = self.initial_coefficients(len(taus)).to(self.device).requires_grad_(True)
        if m.max_steps == 0:
            return lam.detach()
        optimizer = torch.optim.Adam([lam], lr=m.lr)
        streams = self.batch_streams(m.batch_size, m.seed)
        module = self.context.module
        self.history = []
        with eval_mode(module), torch.enable_grad():
            for _ in range(m.max_steps):
                weights = merged_weights(self.base, taus, lam, self.merge_keys)
                loss = sum(entropy(self.logits(i, weights, next(stream))) for i, stream in enumerate(streams))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                self.history.append(float(loss.detach()))
        return lam.detach()

    fixed_by = "the coefficients are learned"

    def _merged(self):
        if self._cached is None:
            taus = self.task_vectors()
            expected = self.initial_coefficients(len(self.tasks)).shape
            if self.coefficients is None or tuple(self.coefficients.shape) != tuple(expected):
                self.coefficients = self.learn(taus).cpu()
            with torch.no_grad():
                weights = merged_weights(self.base, taus, self.coefficients.to(self.device), self.merge_keys)
            self._cached = self.finish({k: weights[k] for k in self.merge_keys})
        return dict(self._cached)

    def state_dict(self):
        if self.coefficients is None:
            return None
        return {"coefficients": self.coefficients.detach().cpu().clone()}

    def load_state_dict(self, state, num_absorbed: int) -> None:
        if "coefficients" not in state:
            raise MergeInputError(f"{self.name}: saved state has no 'coefficients'")
        lam = state["coefficients"].detach().float()
        expected = self.initial_coefficients(num_absorbed).shape
        if tuple(lam.shape) != tuple(expected):
            raise MergeInputError(f"{self.name}: saved coefficients have shape {list(lam.shape)}, "
                                  f"expected {list(expected)} for {num_absorbed} task(s) ({self.method.granularity}-wise)")
        self.coefficients = lam.clone()
        self._cached = None
