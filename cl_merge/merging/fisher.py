"""Fisher merging: a per-parameter average weighted by each model's diagonal Fisher."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from cl_merge.errors import HyperparameterError, MergeInputError
from cl_merge.merging._data import DataBasedStrategy, eval_mode, require_int
from cl_merge.merging._fisher_stats import ESTIMATORS, diagonal_fisher
from cl_merge.merging.base import MergeMethod, check_nonnegative
from cl_merge.merging.lifecycle import TaskInput
from cl_merge.merging.registry import register

Tensor = torch.Tensor

def fisher_norm(fisher: Mapping[str, Tensor]) -> Tensor:
    """L2 norm of a model's whole diagonal Fisher (all parameters as one vector)."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(f.float()) for f in fisher.values()]))


def fisher_model_weight(fisher: Mapping[str, Tensor], normalize: bool, floor: float) -> float:
    """The factor FusionBench gives model i: 1/(‖F_i‖ + floor) when
    ``normalize`` (so a model with larger Fisher values does not dominate
    everywhere), else 1. The constant factors it also applies (1/T and the
    normalisation of these factors to sum 1) cancel in the weighted mean."""
    return 1.0 / (float(fisher_norm(fisher)) + floor) if normalize else 1.0


def fisher_weighted_average(weights: Sequence[Mapping[str, Tensor]], fishers: Sequence[Mapping[str, Tensor]], *,
                            normalize: bool = True, floor: float = 1e-6) -> dict[str, Tensor]:
    """θ = Σ_i c_i (F_i + floor) θ_i / Σ_i c_i (F_i + floor) per entry, c_i
    from :func:`fisher_model_weight`; entries absent from a Fisher count as 0."""
    num: dict[str, Tensor] = {}
    den: dict[str, Tensor] = {}
    for w, f in zip(weights, fishers):
        accumulate_fisher(num, den, w, f, fisher_model_weight(f, normalize, floor), floor)
    return {k: num[k] / den[k] for k in num}


def accumulate_fisher(num: dict, den: dict, weights: Mapping[str, Tensor], fisher: Mapping[str, Tensor],
                      factor: float, floor: float) -> None:
    for key, w in weights.items():
        f = fisher.get(key)
        scale = (f + floor if f is not None else torch.full_like(w, floor)) * factor
        num[key] = scale * w if key not in num else num[key] + scale * w
        den[key] = scale if key not in den else den[key] + scale


@register
@dataclass
class Fisher(MergeMethod):
    """Fisher merging: θ = Σ_i F_i θ_i / Σ_i F_i per parameter, F_i the
    diagonal Fisher information of fine-tuned model i on its task's data.

    Matena & Raffel, "Merging Models with Fisher-Weighted Averaging",
    NeurIPS 2022 (https://arxiv.org/abs/2111.09832).

    ``estimator="exact"`` (default, the paper): per example x, the exact
    expectation over the model's own predictive distribution,
    F = mean_x Σ_y p(y|x) (∇ log p(y|x))² — labels are not used (one
    backward per class and example). ``"batch"`` (FusionBench's CLIP code):
    per batch, the squared gradient of Σ_x Σ_y √p(y|x)·log p(y|x), divided
    by the number of examples: one backward per batch, but the square of a
    batch sum mixes examples (cross terms), so it is not the Fisher the
    paper defines. Both use the model's predictions, not true labels.

    ``num_examples`` counted in batch rows, checked before each batch;
    ``normalize_fisher_weight`` and ``minimal_fisher_weight`` as
    FusionBench's CLIP config (256, true, 1e-6): F_i + 1e-6 keeps the
    ratio defined, and each model's Fisher is divided by its global L2 norm.
    Entries without a gradient (buffers) get the floor only, i.e. a plain
    average with the models' factors. The module runs in eval mode.

    Incremental: yes (state Σ c_i (F_i+ε) θ_i and Σ c_i (F_i+ε)).
    """

    name = "fisher"
    reference = "https://arxiv.org/abs/2111.09832"
    incremental = True  # through its strategy (create_strategy), not the per-tensor hooks

    num_examples: int = 256
    normalize_fisher_weight: bool = True
    minimal_fisher_weight: float = 1e-6
    estimator: str = "exact"

    def validate(self) -> None:
        require_int("num_examples", self.num_examples, self.name)
        check_nonnegative("minimal_fisher_weight", self.minimal_fisher_weight, self.name)
        if not isinstance(self.normalize_fisher_weight, bool):
            raise HyperparameterError(f"{self.name}: normalize_fisher_weight must be true or false")
        if self.estimator not in ESTIMATORS:
            raise HyperparameterError(f"{self.name}: estimator must be one of {', '.join(ESTIMATORS)}, "
                                      f"got {self.estimator!r}")

    def create_strategy(self, key_filter=None, device=None):
        return FisherStrategy(self, key_filter, device)


class FisherStrategy(DataBasedStrategy):
    incremental = True
    data_split = "train"

    def _start_data(self) -> None:
        self.num: dict[str, Tensor] = {}
        self.den: dict[str, Tensor] = {}
        params = {name for name, _ in self.context.module.named_parameters()}
        self.param_keys = [k for k in self.merge_keys if k in params]

    def fisher_of(self, task: TaskInput, weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Diagonal Fisher of the model under ``weights`` on the task's batches
        (its predictions, not its labels), on the device its weights are on."""
        with eval_mode(self.context.module):
            fisher = diagonal_fisher(self.context, weights, task.batches, self.method.num_examples,
                                     self.task_head(task), keys=self.param_keys, estimator=self.method.estimator,
                                     what=f"task {task.index}")
        return {k: v.to(weights[k].device) for k, v in fisher.items()}

    def _absorb(self, task: TaskInput) -> None:
        m = self.method
        weights = self.task_weights(task)
        fisher = self.fisher_of(task, weights)
        factor = fisher_model_weight(fisher, m.normalize_fisher_weight, m.minimal_fisher_weight)
        with torch.no_grad():
            accumulate_fisher(self.num, self.den, {k: weights[k] for k in self.merge_keys}, fisher, factor,
                              m.minimal_fisher_weight)

    fixed_by = "the Fishers are computed"

    def _merged(self):
        with torch.no_grad():
            return self.finish({k: self.num[k] / self.den[k] for k in self.num})

    def state_dict(self):
        state = {f"num::{k}": v.detach().cpu() for k, v in self.num.items()}
        state.update({f"den::{k}": v.detach().cpu() for k, v in self.den.items()})
        return state

    def load_state_dict(self, state, num_absorbed: int) -> None:
        self.num = {k[5:]: v.to(self.device) for k, v in state.items() if k.startswith("num::")}
        self.den = {k[5:]: v.to(self.device) for k, v in state.items() if k.startswith("den::")}
        if set(self.num) != set(self.merge_keys) or set(self.den) != set(self.merge_keys):
            raise MergeInputError(f"{self.name}: saved state does not cover the merged keys of this model")
        self.num_absorbed = num_absorbed
