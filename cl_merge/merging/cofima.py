"""CoFiMA: continual Fisher-weighted model averaging."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cl_merge.errors import MergeInputError
from cl_merge.merging._fisher_stats import diagonal_fisher
from cl_merge.merging._stateful import RunningMergeStrategy
from cl_merge.merging.base import MergeMethod, check_fraction, require
from cl_merge.merging.lifecycle import TaskInput
from cl_merge.merging.registry import register

Tensor = torch.Tensor

FISHERS = ("empirical", "expected")
PREVIOUS_FISHERS = ("finetuned", "merged")


def fisher_weighted_step(merged: Tensor, task: Tensor, merged_fisher: Tensor, task_fisher: Tensor,
                         alpha: float) -> Tensor:
    """((1 − α)·F_m ⊙ τ_m + α·F_t ⊙ τ_t) / ((1 − α)·F_m + α·F_t), entry-wise; where
    both Fishers are 0 (no gradient reached the entry) the plain average
    (1 − α)·τ_m + α·τ_t (CoMA) instead of the reference's 0/0."""
    weight_m = (1 - alpha) * merged_fisher
    weight_t = alpha * task_fisher
    denominator = weight_m + weight_t
    fisher_mix = (weight_m * merged + weight_t * task) / torch.where(denominator > 0, denominator, 1)
    plain = (1 - alpha) * merged + alpha * task
    return torch.where(denominator > 0, fisher_mix, plain)


@register
@dataclass
class CoFiMA(MergeMethod):
    """CoFiMA: θ_t = ((1 − α)·F_{t−1} ⊙ θ_{t−1} + α·F_t ⊙ θ̂_t) / ((1 − α)·F_{t−1} + α·F_t).

    Marouf et al., "Weighted Ensemble Models Are Strong Continual Learners",
    ECCV 2024 (https://arxiv.org/abs/2312.08977; code: IemProg/CoFiMA,
    ``models/cofima.py``). θ_{t−1} is the previous merge, θ̂_t the model
    fine-tuned on task t (the paper fine-tunes it from θ_{t−1}: the
    scenario's ``init`` decides), F the diagonal Fishers, α = ``alpha`` the
    weight of the new model. The first task's fine-tuned model is the first
    merge. Computed on task vectors (the weights of each entry sum to one, so
    θ0 cancels): τ_t = ((1 − α)F_{t−1}τ_m + αF_tτ̂_t)/((1 − α)F_{t−1} + αF_t).

    The Fisher (``cl_merge.merging._fisher_stats.diagonal_fisher``): per
    calibration batch of task t, the squared gradient of the mean
    cross-entropy with the true labels (``fisher="empirical"``, the authors'
    ``getFisherDiagonal``; the runner passes labels), averaged over the
    batches (``num_fisher_examples`` rows at most; ``None``: every batch, as
    the authors use the whole training set), each entry clipped at
    ``fisher_max`` (their ``fishermax`` 1e-4; ``None``: no clip).
    ``fisher="expected"`` draws the labels from the model's prediction
    instead (needs no labels, e.g. through ``cl_merge.merge(data=...)``).
    The module runs in the mode its owner left it in (the authors compute the
    Fisher in train mode, dropout on; the runner's encoders are in eval mode,
    which makes the Fisher deterministic).

    F_{t−1}: ``previous_fisher="finetuned"`` (default, the authors' code):
    the Fisher of the previous task's fine-tuned model on its own data,
    computed before it was merged; ``"merged"``: the Fisher of the previous
    merge on that task's data (the paper's F_{θ_{t−1}} read literally; one
    more Fisher pass per task). Neither accumulates over older tasks.

    Defaults: α 0.4 (``wt_alpha`` of the authors' configurations), clip 1e-4.
    Entries where both Fishers are 0 (buffers, frozen parameters) take the
    plain average (1 − α)·τ_m + α·τ_t, where the reference divides 0 by 0.
    Memory: θ0 + the merged task vector + one Fisher tensor per entry.
    FusionBench has no CoFiMA.
    """

    name = "cofima"
    reference = "https://arxiv.org/abs/2312.08977"
    incremental = True

    alpha: float = 0.4
    num_fisher_examples: int | None = None
    fisher_max: float | None = 1e-4
    fisher: str = "empirical"
    previous_fisher: str = "finetuned"

    def validate(self) -> None:
        check_fraction("alpha", self.alpha, allow_zero=True, method=self.name)
        require(self.num_fisher_examples is None or (isinstance(self.num_fisher_examples, int)
                                                     and not isinstance(self.num_fisher_examples, bool)
                                                     and self.num_fisher_examples >= 1),
                f"{self.name}: num_fisher_examples must be an integer >= 1 or null, got {self.num_fisher_examples!r}")
        require(self.fisher_max is None or (isinstance(self.fisher_max, (int, float)) and self.fisher_max > 0),
                f"{self.name}: fisher_max must be > 0 or null, got {self.fisher_max!r}")
        require(self.fisher in FISHERS, f"{self.name}: fisher must be one of {', '.join(FISHERS)}, got {self.fisher!r}")
        require(self.previous_fisher in PREVIOUS_FISHERS,
                f"{self.name}: previous_fisher must be one of {', '.join(PREVIOUS_FISHERS)}, "
                f"got {self.previous_fisher!r}")

    def create_strategy(self, key_filter=None, device=None) -> "CoFiMAStrategy":
        return CoFiMAStrategy(self, key_filter, device)


class CoFiMAStrategy(RunningMergeStrategy):
    """The running CoFiMA merge: τ_m and the Fisher F_{t−1}."""

    needs = frozenset({"model", "data"})
    needs_labels = True

    def check_task_vector(self, task: TaskInput) -> None:
        super().check_task_vector(task)
        if self.method.fisher == "empirical" and task.batches is not None and task.labels is None:
            raise MergeInputError(f"cofima: task {task.index} ({task.name or '?'}) has no labels for the "
                                  "empirical Fisher; pass labels, or use fisher='expected'")

    def fisher_of(self, weights, task: TaskInput) -> dict[str, Tensor]:
        method: CoFiMA = self.method
        labels = task.labels if method.fisher == "empirical" else None
        fisher = diagonal_fisher(self.context, weights, task.batches, method.num_fisher_examples, task.head,
                                 labels=labels, keys=self.keys, reduction="mean")
        if method.fisher_max is not None:
            fisher = {k: v.clamp_(max=method.fisher_max) for k, v in fisher.items()}
        return fisher

    def _step(self, task: TaskInput) -> None:
        method: CoFiMA = self.method
        tau = {key: self.read(task, key) for key in self.keys}
        task_fisher = self.fisher_of(self.merged_weights(tau), task)
        if self.num_absorbed == 0:
            self.merged = tau
        else:
            previous = self.extra["fisher"]
            self.merged = {key: fisher_weighted_step(self.merged[key], tau[key], previous[key], task_fisher[key],
                                                     method.alpha) for key in self.keys}
        if method.previous_fisher == "merged" and self.num_absorbed > 0:
            task_fisher = self.fisher_of(self.merged_weights(self.merged), task)
        self.extra = {"fisher": task_fisher}


__all__ = ["CoFiMA", "CoFiMAStrategy", "fisher_weighted_step"]
