"""LiNeS: layer-increasing scaling of the merged task vector."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from cl_merge.errors import HyperparameterError, MergeInputError
from cl_merge.merging.base import MergeMethod, TensorStream, check_nonnegative, require
from cl_merge.merging.registry import register
from cl_merge.merging.task_arithmetic import sum_of, sum_of_differences

# ``<blocks|resblocks|layers|layer|h>.<i>.``: open_clip ``transformer.resblocks.{i}``,
# timm ``blocks.{i}``, Hugging Face ``encoder.layer.{i}`` / ``layers.{i}``, GPT ``h.{i}``
DEFAULT_LAYER_PATTERN = r"(?:^|\.)(?:resblocks|blocks|layers|layer|h)\.(\d+)\."
_SUM_BASES = ("task_arithmetic", "average")


def layer_index(key: str, pattern: re.Pattern) -> int | None:
    """The block index of ``key`` (first capture group of ``pattern``), or None."""
    found = pattern.search(key)
    return int(found.group(1)) if found else None


def tower_of(key: str, pattern: re.Pattern) -> str | None:
    """The part of ``key`` before its block name (``visual.transformer.`` for
    ``visual.transformer.resblocks.3.attn.in_proj_weight``, ``text_model.encoder.``
    for ``text_model.encoder.layers.3.mlp.fc1.weight``): blocks of one tower
    share it; None outside the blocks."""
    found = pattern.search(key)
    return key[:found.start(1)].rpartition(".")[0].rpartition(".")[0] if found else None


def depth_table(keys, pattern: re.Pattern, num_layers: int | None = None) -> dict[str, tuple[int | None, int]]:
    """key -> (block index, number of blocks of its tower). A pure function of
    the key set: CLIP's 12-block text tower and 24-block vision tower are
    counted separately. ``num_layers`` (when given) is every tower's L."""
    found = {key: (layer_index(key, pattern), tower_of(key, pattern)) for key in keys}
    towers: dict[str | None, int] = {}
    for depth, tower in found.values():
        if depth is not None:
            towers[tower] = max(towers.get(tower, 0), depth + 1)
    return {key: (depth, num_layers if num_layers is not None else towers.get(tower, 1))
            for key, (depth, tower) in found.items()}


@dataclass
class _LinesContext:
    depth: dict[str, tuple[int | None, int]]  # key -> (block index or None, blocks of its tower)
    alpha: float
    base_context: Any = None
    cached: dict[str, torch.Tensor] | None = None  # merged task vectors from the norm pass


@register
@dataclass
class Lines(MergeMethod):
    """LiNeS: θ = θ0 + λ(ℓ) · τ_merged, with λ(ℓ) = alpha + beta · ℓ/(L−1).

    Wang, Dimitriadis, Favero, Ortiz-Jiménez, Fleuret, Frossard, "LiNeS:
    Post-training Layer Scaling Prevents Forgetting and Enhances Model
    Merging", ICLR 2025. ``τ_merged`` is the merged task vector of
    ``base_method`` (task arithmetic: Σ_t τ_t; TIES: the disjoint merge), taken
    with that method's ``scaling`` set to 1; LiNeS replaces the single scaling
    coefficient by a depth-dependent one.

    Layers: ℓ = 0..L−1 is the block index parsed from the key with
    ``layer_pattern`` (its first capture group; default matches open_clip
    ``transformer.resblocks.{i}``, timm ``blocks.{i}``, Hugging Face
    ``layer(s).{i}``). L is ``num_layers`` when given, else the largest index
    found + 1 *in the key's tower* (the key's prefix before the block name,
    e.g. open_clip ``visual.transformer`` vs ``transformer``, Hugging Face
    ``vision_model.encoder`` vs ``text_model.encoder``): a 12-block text
    tower next to a 24-block vision tower gets its own depth scale, as the
    authors scale each tower's blocks. Entries outside
    the blocks (patch/positional/class embeddings, ``ln_pre``, ``ln_post``,
    ``proj``) get ``alpha``, as in the authors' code (their ``LiNeS_scaling``
    gives every key that matches no block the minimum scaling; the paper's
    formula only speaks of blocks). With one block, λ = alpha.

    Defaults (multi-task merging, the authors' code): ``alpha=None`` means
    alpha = (‖Σ_t τ_t‖₁ / ‖τ_merged‖₁) / T, i.e. 1/T for task arithmetic, and
    for other base methods the same rule corrected by how much the base merge
    shrinks the summed vector (needs one extra model-wide pass, holding
    τ_merged, one model, between the passes). ``beta`` is tuned on validation
    data in the paper (grid 0.1..1.0 for task arithmetic, 0.1..1.5 for TIES);
    0.5, the middle of that grid, is our default, not a paper value. For a
    single fine-tuned model the paper's own editing setting is alpha=λ,
    beta=1−λ.

    FusionBench and mergekit have no LiNeS. Incremental: yes when
    ``base_method`` is ``task_arithmetic`` or ``average`` (state: the running
    Σ τ_t; alpha=None follows 1/T as tasks arrive), otherwise no (the base
    method's own restrictions apply).
    """

    name = "lines"
    reference = "https://arxiv.org/abs/2410.17146"
    incremental = True  # with a task_arithmetic/average base; see __post_init__

    alpha: float | None = None
    beta: float = 0.5
    base_method: str = "task_arithmetic"
    base_hparams: dict | None = None
    layer_pattern: str = DEFAULT_LAYER_PATTERN
    num_layers: int | None = None

    def validate(self) -> None:
        from cl_merge.merging.registry import get_method

        if self.alpha is not None:
            check_nonnegative("alpha", self.alpha, "lines")
        check_nonnegative("beta", self.beta, "lines")
        require(self.num_layers is None or self.num_layers >= 1,
                f"lines: num_layers must be a positive integer, got {self.num_layers!r}")
        try:
            self._pattern = re.compile(self.layer_pattern)
        except (re.error, TypeError) as exc:
            raise HyperparameterError(f"lines: invalid layer_pattern {self.layer_pattern!r}: {exc}") from None
        require(self._pattern.groups >= 1,
                f"lines: layer_pattern {self.layer_pattern!r} needs a capture group for the layer index")
        require(self.base_method != self.name, "lines: base_method cannot be lines itself")
        hparams = dict(self.base_hparams or {})
        if "scaling" in hparams:
            raise HyperparameterError(
                "lines: base_hparams must not set 'scaling': LiNeS replaces it by alpha + beta·depth")
        from cl_merge.merging.registry import method_class

        base_cls = method_class(self.base_method)  # unknown names list the valid ones
        if "scaling" in base_cls.hparam_names():
            hparams["scaling"] = 1.0
        self._base = get_method(self.base_method, **hparams)
        require(not self._base.per_task,
                f"lines: base_method {self.base_method!r} keeps per-task parts; LiNeS needs one merged vector")
        # instance-level overrides of the class contract, depending on the base
        self._sum_base = self.base_method in _SUM_BASES
        self.incremental = self._sum_base
        self.uses_weights = self._sum_base
        self.propagates_nonfinite = self._sum_base
        self.elementwise = self._sum_base  # the cached path pops whole entries
        self.min_models = self._base.min_models
        self.max_models = self._base.max_models

    # ------------------------------------------------------------- depth
    def scale_for(self, depth: int | None, num_layers: int, alpha: float) -> float:
        if depth is None or num_layers <= 1:
            return alpha
        return alpha + self.beta * min(depth, num_layers - 1) / (num_layers - 1)

    def _depths(self, keys) -> dict[str, tuple[int | None, int]]:
        table = depth_table(keys, self._pattern, self.num_layers)
        if self.num_layers is None and all(depth is None for depth, _ in table.values()):
            raise MergeInputError(
                f"lines: no merged key matches layer_pattern {self.layer_pattern!r} "
                f"(first key: {next(iter(table), '')!r}); set layer_pattern or num_layers")
        return table

    # ------------------------------------------------------------- batch form
    def _base_merged_tau(self, key, base, values, base_context) -> torch.Tensor:
        """τ_merged for one entry; ``values`` are weights for sum bases, deltas otherwise."""
        if self.base_method == "task_arithmetic":
            return sum_of_differences(values, base)
        if self.base_method == "average":
            return sum_of_differences(values, base).div_(len(values))
        inputs = [base + d for d in values] if self._base.uses_weights else values
        return self._base.merge_tensor(key, base, inputs, base_context).to(base.dtype) - base

    def prepare(self, stream: TensorStream) -> _LinesContext:
        depth = self._depths(stream.keys)
        base_context = None
        if not self._sum_base:
            sub = TensorStream(stream.pretrained, stream.finetuned, stream.keys, stream.compute_dtype,
                               check=stream.check, deltas_given=stream.deltas_given,
                               raw_weights=self._base.uses_weights, device=stream.device)
            base_context = self._base.prepare(sub)
        context = _LinesContext(depth, 0.0, base_context)
        num_models = stream.num_models
        if self.alpha is not None:
            context.alpha = float(self.alpha)
        elif self.base_method == "task_arithmetic":
            context.alpha = 1.0 / num_models  # ‖Σ τ‖₁ / ‖Σ τ‖₁ = 1
        elif self.base_method == "average":
            context.alpha = 1.0  # ‖Σ τ‖₁ / ‖Σ τ / T‖₁ = T
        else:
            # one pass for ‖Σ τ‖₁ and ‖τ_merged‖₁; τ_merged is kept (one model) for merge_tensor
            context.cached = {}
            norm_sum = norm_merged = 0.0
            for key, base, deltas in stream:
                tau = self._base_merged_tau(key, base, deltas, base_context)
                context.cached[key] = tau.cpu()  # one model, on the CPU whatever the device
                norm_sum += float(sum_of(deltas).abs().sum(dtype=torch.float64))
                norm_merged += float(tau.abs().sum(dtype=torch.float64))
            context.alpha = (norm_sum / norm_merged) / num_models if norm_merged > 0 else 1.0 / num_models
        return context

    def merge_tensor(self, key, base, values, context: _LinesContext):
        if context.cached is not None:
            tau = context.cached.pop(key).to(base.device)
        else:
            tau = self._base_merged_tau(key, base, values, context.base_context)
        scale = self.scale_for(*context.depth[key], context.alpha)
        return tau.mul_(scale).add_(base)

    # ------------------------------------------------------------- incremental form
    # The depth of a key needs its tower's block count, i.e. the whole key
    # set: prepare_task (which sees the stream's keys) computes the table and
    # update_state stores the key's block count in its state, so the state
    # alone defines the weights (no per-instance table: a fresh instance, or
    # one reused for another merger, gives the same result).
    def init_state(self, key, base):
        if not self._sum_base:
            raise NotImplementedError(f"lines has no incremental form with base_method {self.base_method!r}")
        return {"sum": torch.zeros_like(base), "num_layers": torch.zeros((), dtype=torch.int64)}

    def prepare_task(self, stream: TensorStream):
        return self._depths(stream.keys)

    def update_state(self, key, base, state, delta, num_seen, task_context):
        _depth, num_layers = task_context[key]
        return {"sum": state["sum"] + delta, "num_layers": torch.tensor(num_layers, dtype=torch.int64)}

    def state_weights(self, key, base, state, num_seen):
        num_layers = int(state["num_layers"])
        count = num_seen
        if self.base_method == "task_arithmetic":
            tau, alpha = state["sum"], 1.0 / count
        else:  # average: τ_merged = Σ τ / T, alpha = 1
            tau, alpha = state["sum"] / count, 1.0
        if self.alpha is not None:
            alpha = float(self.alpha)
        return base + self.scale_for(layer_index(key, self._pattern), num_layers, alpha) * tau
