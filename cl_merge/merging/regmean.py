"""RegMean and RegMean++: merging linear maps by regression on their inputs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from cl_merge.errors import HyperparameterError, MergeInputError
from cl_merge.merging._data import (
    DataBasedStrategy,
    GramCollector,
    eval_mode,
    linear_maps,
    reduce_non_diagonal,
    require_int,
    take_examples,
)
from cl_merge.merging.base import MergeMethod, check_fraction
from cl_merge.merging.lifecycle import TaskInput
from cl_merge.merging.registry import register

Tensor = torch.Tensor

_BLOCK_ROWS = {"q": 0, "k": 1, "v": 2}


# ----------------------------------------------------------------- the closed form
def split_gram_key(key: str) -> tuple[str, int | None]:
    """``"attn.in_proj_weight#k"`` -> (``"attn.in_proj_weight"``, 1): a Gram for
    one third of the rows of a packed q/k/v projection."""
    if "#" in key:
        base, part = key.rsplit("#", 1)
        return base, _BLOCK_ROWS[part]
    return key, None


def weight_rows(weight: Tensor, block: int | None) -> Tensor:
    if block is None:
        return weight
    size = weight.shape[0] // 3
    return weight[block * size:(block + 1) * size]


def regmean_terms(gram: Tensor, weight: Tensor, ratio: float, weight_transpose: bool) -> tuple[Tensor, Tensor]:
    """(G̃, G̃ Wᵀ) of one model for one linear map, G̃ the Gram with its
    off-diagonal entries scaled by ``ratio``."""
    reduced = reduce_non_diagonal(gram, ratio)
    w = weight.transpose(0, 1) if weight_transpose else weight
    if w.shape[0] != reduced.shape[0]:
        raise MergeInputError(f"a linear map's weight of shape {list(weight.shape)} does not fit its input's "
                              f"Gram of size {reduced.shape[0]} (weight_transpose={weight_transpose})")
    return reduced, reduced @ w.to(reduced.dtype)


def regmean_solve(sum_gram: Tensor, sum_gw: Tensor, weight_transpose: bool) -> Tensor:
    """W = (Σ G̃_i)⁻¹ Σ G̃_i W_iᵀ, transposed back. Computed as FusionBench
    does (explicit inverse, same dtype) so both agree to rounding."""
    merged = torch.inverse(sum_gram) @ sum_gw
    return merged.transpose(0, 1) if weight_transpose else merged


class _RegMeanSums:
    """Σ G̃_i and Σ G̃_i W_iᵀ per Gram key, with the number of models that
    contributed (a map some task never reached is averaged instead)."""

    def __init__(self):
        self.gram: dict[str, Tensor] = {}
        self.gw: dict[str, Tensor] = {}
        self.count: dict[str, int] = {}

    def add(self, grams: Mapping[str, Tensor], weights: Mapping[str, Tensor], merge_keys: set[str],
            ratio: float, transpose: bool) -> None:
        for key, gram in grams.items():
            base, block = split_gram_key(key)
            if base not in merge_keys:
                continue
            reduced, gw = regmean_terms(gram, weight_rows(weights[base], block), ratio, transpose)
            if key in self.gram:
                self.gram[key] = self.gram[key] + reduced
                self.gw[key] = self.gw[key] + gw
                self.count[key] += 1
            else:
                self.gram[key], self.gw[key], self.count[key] = reduced, gw, 1

    def solved(self, num_models: int, transpose: bool) -> dict[str, Tensor]:
        """Merged weights of the maps every model reached."""
        parts: dict[str, dict[int | None, Tensor]] = {}
        for key in self.gram:
            if self.count[key] != num_models:
                continue
            base, block = split_gram_key(key)
            parts.setdefault(base, {})[block] = regmean_solve(self.gram[key], self.gw[key], transpose)
        out = {}
        for base, blocks in parts.items():
            if None in blocks:
                out[base] = blocks[None]
            elif len(blocks) == 3:
                out[base] = torch.cat([blocks[0], blocks[1], blocks[2]], dim=0)
        return out


def _check_regmean_hparams(method) -> None:
    if method.num_regmean_examples is not None:
        require_int("num_regmean_examples", method.num_regmean_examples, method.name)
        method.num_examples = method.num_regmean_examples
    require_int("num_examples", method.num_examples, method.name)
    patterns = method.exclude_param_names_regex
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise HyperparameterError(f"{method.name}: exclude_param_names_regex must be a list of regular expressions")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise HyperparameterError(f"{method.name}: exclude_param_names_regex {pattern!r}: {exc}") from None
    check_fraction("reduce_non_diagonal_ratio", method.reduce_non_diagonal_ratio, allow_zero=True, method=method.name)
    if not isinstance(method.weight_transpose, bool):
        raise HyperparameterError(f"{method.name}: weight_transpose must be true or false, got {method.weight_transpose!r}")


# ----------------------------------------------------------------- RegMean
@register
@dataclass
class RegMean(MergeMethod):
    """RegMean: each linear map W solves min_W Σ_i ‖X_i W − X_i W_i‖², i.e.
    W = (Σ_i G_i)⁻¹ Σ_i G_i W_i with G_i = X_iᵀX_i the Gram of its inputs
    on task i's data, computed on fine-tuned model i; all other float entries
    (biases, norms, embeddings) are averaged.

    Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language
    Models", ICLR 2023 (https://arxiv.org/abs/2212.09849).

    As FusionBench 0.2.33's ``regmean_merging`` (and agreeing with it to
    rounding): forward hooks on every ``nn.Linear``; G = running mean of XᵀX
    over all input rows (batch × tokens); ``num_examples`` counted in batch
    rows and checked before each batch (the last batch may overshoot);
    off-diagonal entries of every G_i × ``reduce_non_diagonal_ratio`` (the
    paper's α); explicit inverse, no further regularisation. Defaults are
    FusionBench's CLIP config (256 examples, ratio 0.95, ``weight_transpose``
    true: weights stored (out, in) as in ``nn.Linear``). FusionBench's names
    are accepted too: ``num_regmean_examples`` (sets ``num_examples``) and
    ``exclude_param_names_regex`` (entries whose key ``re.match``-es one are
    left at θ0, as FusionBench's algorithm leaves them; same as ``exclude=``).

    Beyond FusionBench (which only hooks ``nn.Linear``, enough for HF CLIP's
    separate q/k/v projections): an ``nn.MultiheadAttention`` (open_clip)
    gives its ``in_proj_weight`` the Gram of the block input and its
    ``out_proj.weight`` the Gram of the attention output; float buffers are
    averaged (FusionBench leaves them at θ0); the module runs in eval mode.

    Incremental: yes. The state is Σ G̃_i and Σ G̃_i W_iᵀ per linear map and
    the running sum of the other weights, constant in the number of tasks.
    """

    name = "regmean"
    reference = "https://arxiv.org/abs/2212.09849"
    incremental = True  # through its strategy (create_strategy), not the per-tensor hooks

    num_examples: int = 256
    reduce_non_diagonal_ratio: float = 0.95
    weight_transpose: bool = True
    num_regmean_examples: int | None = None
    exclude_param_names_regex: tuple = ()

    def validate(self) -> None:
        _check_regmean_hparams(self)

    def create_strategy(self, key_filter=None, device=None):
        return RegMeanStrategy(self, key_filter, device)


def drop_excluded(keys: list[str], patterns) -> list[str]:
    return [k for k in keys if not any(re.match(p, k) for p in patterns)]


class RegMeanStrategy(DataBasedStrategy):
    incremental = True
    data_split = "train"

    def _start_data(self) -> None:
        self.merge_keys = drop_excluded(self.merge_keys, self.method.exclude_param_names_regex)
        self.maps = linear_maps(self.context.module)
        self.sums = _RegMeanSums()
        self.weight_sum: dict[str, Tensor] = {}

    def grams_of(self, task: TaskInput, weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Gram matrices of every linear map of the model under ``weights``
        on this task's calibration batches."""
        module = self.context.module
        with torch.no_grad(), eval_mode(module), GramCollector(module, self.maps) as collector:
            for batch in take_examples(task.batches, self.method.num_examples, what=f"task {task.index}"):
                self.context.call(weights, batch)
        return collector.grams

    def _absorb(self, task: TaskInput) -> None:
        weights = self.task_weights(task)
        grams = self.grams_of(task, weights)
        if not grams:
            raise MergeInputError(f"{self.name}: the model has no nn.Linear / nn.MultiheadAttention that the "
                                  f"batches of task {task.index} reach")
        m = self.method
        with torch.no_grad():
            self.sums.add(grams, weights, set(self.merge_keys), m.reduce_non_diagonal_ratio, m.weight_transpose)
            for key in self.merge_keys:
                w = weights[key]
                self.weight_sum[key] = w.clone() if key not in self.weight_sum else self.weight_sum[key] + w

    fixed_by = "the Gram matrices are computed"

    def _merged(self):
        with torch.no_grad():
            merged = {k: v / self.num_absorbed for k, v in self.weight_sum.items()}
            merged.update(self.sums.solved(self.num_absorbed, self.method.weight_transpose))
        return self.finish(merged)

    # -- resume
    def state_dict(self):
        state = {f"gram::{k}": v for k, v in self.sums.gram.items()}
        state.update({f"gw::{k}": v for k, v in self.sums.gw.items()})
        state.update({f"count::{k}": torch.tensor(c) for k, c in self.sums.count.items()})
        state.update({f"sum::{k}": v for k, v in self.weight_sum.items()})
        return {k: v.detach().cpu() for k, v in state.items()}

    def load_state_dict(self, state, num_absorbed: int) -> None:
        self.sums = _RegMeanSums()
        self.weight_sum = {}
        for name, value in state.items():
            kind, _, key = name.partition("::")
            value = value.to(self.device)
            if kind == "gram":
                self.sums.gram[key] = value
            elif kind == "gw":
                self.sums.gw[key] = value
            elif kind == "count":
                self.sums.count[key] = int(value)
            elif kind == "sum":
                self.weight_sum[key] = value
            else:
                raise MergeInputError(f"{self.name}: saved state has an unknown entry {name!r}")
        if set(self.weight_sum) != set(self.merge_keys):
            raise MergeInputError(f"{self.name}: saved state does not cover the merged keys of this model")
        self.num_absorbed = num_absorbed


# ----------------------------------------------------------------- RegMean++
class _StopForward(Exception):
    """Raised after the block being merged has run: nothing later is needed."""


def find_blocks(module: nn.Module, maps: Mapping[str, Any], path: str | None = None) -> list[str]:
    """The model's layers, in order: the children of ``path`` (a
    ``ModuleList``/``Sequential``) or, by default, of the container with the
    most children holding linear maps (open_clip's ``resblocks``, HF's
    ``encoder.layers``, timm's ``blocks``); a model with no such container
    has each linear map as its own layer."""
    def inside(child: str) -> bool:
        return any(m == child or m.startswith(child + ".") for m in maps)

    if path is not None:
        try:
            container = module.get_submodule(path)
        except AttributeError:
            raise HyperparameterError(f"regmean_plusplus: the model has no module {path!r} (layers=)") from None
        return [f"{path}.{c}" if path else c for c, _ in container.named_children()]
    best: list[str] = []
    for name, sub in module.named_modules():
        if isinstance(sub, (nn.ModuleList, nn.Sequential)):
            kids = [f"{name}.{c}" if name else c for c, _ in sub.named_children()]
            holding = [k for k in kids if inside(k)]
            if len(holding) >= 2 and len(holding) > len(best):
                best = holding
    return best or list(maps)


@register
@dataclass
class RegMeanPlusPlus(MergeMethod):
    """RegMean++: RegMean merged layer by layer, where the inputs of layer l
    come from the *merged* model's layers below l rather than from each
    fine-tuned model alone, so the Grams see the representation the merged
    model will actually feed that layer.

    Nguyen et al., "RegMean++: Enhancing Effectiveness and Generalization of
    Regression Mean for Model Merging", 2025 (https://arxiv.org/abs/2508.03121).

    For l = 1..L and each task i: the merged layers < l (and the averaged
    entries outside the layers: embeddings, norms) compute the input of
    layer l on task i's data; fine-tuned model i's layer l runs on it and
    its linear maps' Grams G_i^l are taken as in RegMean (same counting,
    ``reduce_non_diagonal_ratio``, closed form); layer l is merged before
    moving on. As FusionBench's ``regmean_plusplus`` except that entries
    outside the layers after them (e.g. the final LayerNorm) are averaged,
    where FusionBench leaves them at θ0. ``layers``: path of the layer list
    (default: found, see ``find_blocks``). Each layer is reached by an early
    stopped forward from the input, so the cost is ≈ L/2 forwards per batch
    and layer; the T fine-tuned models are held at once (no incremental form).
    """

    name = "regmean_plusplus"
    reference = "https://arxiv.org/abs/2508.03121"

    num_examples: int = 256
    reduce_non_diagonal_ratio: float = 0.95
    weight_transpose: bool = True
    layers: str | None = None
    num_regmean_examples: int | None = None
    exclude_param_names_regex: tuple = ()

    def validate(self) -> None:
        _check_regmean_hparams(self)
        if self.layers is not None and not isinstance(self.layers, str):
            raise HyperparameterError(f"{self.name}: layers must be a module path, got {self.layers!r}")

    def create_strategy(self, key_filter=None, device=None):
        return RegMeanPlusPlusStrategy(self, key_filter, device)


class RegMeanPlusPlusStrategy(DataBasedStrategy):
    data_split = "train"
    resume_replays_absorb = True  # no state of its own: the tasks are merged again

    def _start_data(self) -> None:
        self.merge_keys = drop_excluded(self.merge_keys, self.method.exclude_param_names_regex)
        self.tasks: list[TaskInput] = []
        self._cached = None
        self.maps = linear_maps(self.context.module)
        self.blocks = find_blocks(self.context.module, self.maps, self.method.layers)

    def _absorb(self, task: TaskInput) -> None:
        self._source(task)  # check keys and shapes now, not at the end
        self.tasks.append(task)
        self._cached = None

    fixed_by = "the Gram matrices are computed"

    def _merged(self):
        if self._cached is None:
            self._cached = self.finish(self._merge())
        return dict(self._cached)

    def _merge(self) -> dict[str, Tensor]:
        m, module = self.method, self.context.module
        weights = [self.task_weights(t) for t in self.tasks]
        batches = [list(take_examples(t.batches, m.num_examples, what=f"task {t.index}")) for t in self.tasks]
        merge_keys = set(self.merge_keys)
        merged = dict(self.base)
        with torch.no_grad():
            for key in self.merge_keys:
                merged[key] = sum(w[key] for w in weights) / len(weights)
            for block in self.blocks:
                prefix = block + "."
                block_keys = [k for k in self.merge_keys if k.startswith(prefix)]
                block_maps = {n: v for n, v in self.maps.items() if n == block or n.startswith(prefix)}
                if not block_maps:
                    continue
                sums = _RegMeanSums()
                for i, task_weights in enumerate(weights):
                    hybrid = dict(merged)
                    hybrid.update({k: task_weights[k] for k in block_keys})
                    with eval_mode(module), GramCollector(module, block_maps) as collector:
                        # registered after the Gram hooks, so a block that is itself a linear map is seen first
                        stop = module.get_submodule(block).register_forward_hook(_raise_stop)
                        try:
                            for batch in batches[i]:
                                try:
                                    self.context.call(hybrid, batch)
                                except _StopForward:
                                    pass
                        finally:
                            stop.remove()
                    sums.add(collector.grams, task_weights, merge_keys, m.reduce_non_diagonal_ratio,
                             m.weight_transpose)
                merged.update(sums.solved(len(weights), m.weight_transpose))
        return {k: merged[k] for k in self.merge_keys}


def _raise_stop(module, inputs, output):
    raise _StopForward
