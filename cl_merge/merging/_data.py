"""Shared pieces of the data-based strategies (Fisher, RegMean, RegMean++,
AdaMerging, Surgery): batch handling, the fine-tuned weights of one task, and
the discovery of the model's linear maps.

Pure torch: no Lightning, runner, model or dataset code.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from cl_merge.core.state_dict import DictSource, KeyFilter, plan_merge
from cl_merge.errors import HyperparameterError, MergeInputError
from cl_merge.merging.base import MergeMethod, _TaskVectorSource
from cl_merge.merging.context import batch_size_of
from cl_merge.merging.lifecycle import MergeStrategy, TaskInput

Tensor = torch.Tensor


# ----------------------------------------------------------------- batches
def take_examples(batches: Iterable[Any], num_examples: int, *, what: str = "") -> Iterator[Any]:
    """The batches used for statistics, FusionBench's rule: before each batch,
    stop once ``num_examples`` rows have been used (so the last batch may
    overshoot: 3 batches of 32 for 70 examples). Fewer rows than asked for:
    all of them, with a warning (the runner checks its calibration request
    against the split's size); none at all is an error."""
    used = 0
    for batch in batches:
        if used >= num_examples:
            return
        used += batch_size_of(batch)
        yield batch
    if used == 0:
        raise MergeInputError(f"no calibration batches{' for ' + what if what else ''}: the data is empty")
    if used < num_examples:
        warnings.warn(f"{what or 'calibration data'}: {used} example(s) given, fewer than num_examples={num_examples}; "
                      "using all of them", stacklevel=3)


def slice_rows(batch: Any, start: int, stop: int, rows: int):
    """Rows ``start:stop`` of every tensor in ``batch`` whose first dimension is ``rows``."""
    if isinstance(batch, Tensor):
        return batch[start:stop] if batch.dim() and batch.shape[0] == rows else batch
    if isinstance(batch, Mapping):
        return {k: slice_rows(v, start, stop, rows) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(slice_rows(v, start, stop, rows) for v in batch)
    return batch


def concat_batches(batches: Sequence[Any]):
    """One batch from several of the same structure (rows concatenated)."""
    first = batches[0]
    if len(batches) == 1:
        return first
    if isinstance(first, Tensor):
        return torch.cat(list(batches), dim=0)
    if isinstance(first, Mapping):
        return {k: concat_batches([b[k] for b in batches]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(concat_batches([b[i] for b in batches]) for i in range(len(first)))
    return first


def cycle_batches(batches: Iterable[Any], batch_size: int, *, what: str = "") -> Iterator[Any]:
    """Endless batches of exactly ``batch_size`` rows, re-iterating ``batches``
    (a re-iterable: a list, or a loader whose shuffling is seeded) as often
    as needed; rows are regrouped lazily, so the data is never all in memory."""
    pending: list[Any] = []
    held = 0
    while True:
        seen = 0
        for batch in batches:
            rows = batch_size_of(batch)
            seen += rows
            start = 0
            while start < rows:
                take = min(batch_size - held, rows - start)
                pending.append(slice_rows(batch, start, start + take, rows) if (start, take) != (0, rows) else batch)
                held += take
                start += take
                if held == batch_size:
                    yield concat_batches(pending)
                    pending, held = [], 0
        if seen == 0:
            raise MergeInputError(f"no test-time batches{' for ' + what if what else ''}: the data is empty")


def as_logits(output: Any) -> Tensor:
    """The logits in a module's output: the tensor itself, ``.logits``
    (transformers' outputs) or the first element of a tuple."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise MergeInputError(f"the model's output is a {type(output).__name__}, not logits (a tensor)")


def entropy(logits: Tensor, eps: float = 1e-8) -> Tensor:
    """Mean Shannon entropy of the softmax predictions (AdaMerging's loss;
    ``eps`` inside the log as in the authors' code)."""
    if logits.dim() != 2:
        raise MergeInputError(f"expected logits of shape (batch, classes), got {list(logits.shape)}")
    probs = logits.float().softmax(dim=-1)
    return -(probs * torch.log(probs + eps)).sum(dim=-1).mean()


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Deterministic forwards (no dropout, frozen norms) while a strategy
    computes its statistics; the module's own mode is restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


# ----------------------------------------------------------------- the base strategy
class DataBasedStrategy(MergeStrategy):
    """Common start/absorb plumbing: the merge plan (which keys are merged,
    checked against the model's keys), and the weights of one task,
    θ0 + τ_t, on the context's device."""

    needs = frozenset({"model", "data"})

    def __init__(self, method: MergeMethod, key_filter: KeyFilter | None = None, device=None):
        super().__init__(method)
        self.key_filter = key_filter
        self.device_override = device

    # -- lifecycle
    def _start(self) -> None:
        if isinstance(self.pretrained, Mapping):
            self.context.check_keys(self.pretrained)
        self.device = torch.device(self.device_override) if self.device_override is not None else self.context.device
        self.pre = self.pretrained if hasattr(self.pretrained, "get") and not isinstance(self.pretrained, Mapping) \
            else DictSource(self.pretrained, "pretrained")
        keys = list(self.pre.keys())
        self.merge_keys = [k for k in keys if _dtype(self.pre, k).is_floating_point
                           and (self.key_filter is None or self.key_filter.selects(k))]
        self.base = {k: self.pre.get(k).to(self.device) for k in keys}
        self._start_data()

    def _start_data(self) -> None:
        pass

    def _source(self, task: TaskInput) -> _TaskVectorSource:
        tv = task.task_vector
        tv = tv if hasattr(tv, "get") and hasattr(tv, "keys") and not isinstance(tv, Mapping) \
            else DictSource(tv, f"task vector {task.index}")
        source = _TaskVectorSource(self.pre, tv, as_weights=True)
        extra = [k for k in tv.keys() if k not in set(self.pre.keys())]
        if extra:
            raise MergeInputError(f"task vector {task.index} has key {extra[0]!r}, which the pretrained model lacks")
        plan_merge(self.pre, [source], self.key_filter)  # keys, shapes, dtypes
        return source

    def task_weights(self, task: TaskInput) -> dict[str, Tensor]:
        """A complete state dict θ0 + τ_t (merged keys in float32 or wider),
        on the device, for ``functional_call``."""
        source = self._source(task)
        weights = dict(self.base)
        for key in self.merge_keys:
            value = source.get(key).to(self.device)
            weights[key] = value.to(torch.promote_types(value.dtype, torch.float32))
        return weights

    def task_vector(self, task: TaskInput) -> dict[str, Tensor]:
        """τ_t over the merged keys (float32 or wider) on the device."""
        tv = task.task_vector
        tv = tv if hasattr(tv, "get") and not isinstance(tv, Mapping) else DictSource(tv, f"task vector {task.index}")
        self._source(task)
        own = set(tv.keys())
        out = {}
        for key in self.merge_keys:
            if key in own:
                value = tv.get(key).to(self.device)
                out[key] = value.to(torch.promote_types(value.dtype, torch.float32))
            else:
                out[key] = torch.zeros(self.base[key].shape, dtype=torch.promote_types(self.base[key].dtype, torch.float32),
                                       device=self.device)
        return out

    # what a refused hyperparameter override would have to undo ("... cannot change once <this>")
    fixed_by = "the statistics are computed"

    def current(self, **overrides):
        """The merged weights of the tasks absorbed so far (θ0 before any).
        Overrides are refused: the hyperparameters are baked into what was
        computed from the data (an unknown name is still reported as such)."""
        if overrides:
            self._method_with(overrides)
            raise HyperparameterError(f"{self.name}: hyperparameters cannot change once {self.fixed_by}")
        if self.num_absorbed == 0:
            return dict(self.pretrained)
        check_method_models(self.method, self.num_absorbed)
        return self._merged()

    def _merged(self):
        """The merge of the absorbed tasks (at least one)."""
        raise NotImplementedError

    def task_head(self, task: TaskInput):
        """The task's head: ``task.head``, else the context's head for its index (None: the output is the logits)."""
        heads = self.context.heads
        if task.head is None and heads is not None and task.index < len(heads):
            return heads[task.index]
        return task.head

    def task_logits(self, task: TaskInput, weights: Mapping[str, Tensor], batch) -> Tensor:
        """Task ``task``'s logits under ``weights``: the module's output
        through the task's head (``task.head``, else the context's head for
        its index; none: the output is the logits)."""
        head = self.task_head(task)
        features = as_logits(self.context.call(weights, batch))
        return as_logits(head(features)) if head is not None else features

    def finish(self, merged: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A state dict in θ0's order and dtypes, on the CPU: merged keys from
        ``merged``, the rest θ0's."""
        out = {}
        for key in self.pre.keys():
            base = self.pre.get(key)
            value = merged[key] if key in merged else base
            out[key] = value.detach().to(device="cpu", dtype=base.dtype)
        return out


def _dtype(source, key: str) -> torch.dtype:
    return source.dtype(key) if hasattr(source, "dtype") else source.get(key).dtype


# ----------------------------------------------------------------- linear maps and Gram matrices
def linear_maps(module: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """The linear maps whose inputs RegMean needs, by module name: ``"linear"``
    for every ``nn.Linear`` (its ``.weight`` is W in y = x Wᵀ + b), ``"mha"``
    for every ``nn.MultiheadAttention`` (``in_proj_weight`` maps the block's
    input; ``out_proj`` maps the attention output, which the module computes
    internally without calling ``out_proj``, so it is handled by the MHA)."""
    found: dict[str, tuple[str, nn.Module]] = {}
    mha_children = set()
    for name, sub in module.named_modules():
        if isinstance(sub, nn.MultiheadAttention):
            found[name] = ("mha", sub)
            mha_children.add(f"{name}.out_proj" if name else "out_proj")
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear) and name not in mha_children:
            found[name] = ("linear", sub)
    return found


def _key(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


class GramCollector:
    """Forward hooks that keep, for every linear map, the running mean of
    XᵀX over all input rows (batch × tokens flattened), updated exactly as
    FusionBench does: G ← (G·n + XᵀX)/(n + m) after the first batch's XᵀX/m.

    Grams are keyed by the weight's state-dict key. An
    ``nn.MultiheadAttention`` gives ``<name>.in_proj_weight`` the Gram of its
    query input (self-attention: query = key = value) or, when they differ,
    one Gram per row block (``#q``/``#k``/``#v`` suffixes; also for separate
    ``q/k/v_proj_weight``), and ``<name>.out_proj.weight`` the Gram of the
    attention output before the projection, recomputed from the module's
    inputs with an identity projection (the module never calls ``out_proj``,
    in either its fast or its slow path)."""

    def __init__(self, module: nn.Module, maps: Mapping[str, tuple[str, nn.Module]] | None = None):
        self.module = module
        self.maps = dict(linear_maps(module) if maps is None else maps)
        self.grams: dict[str, Tensor] = {}
        self.rows: dict[str, int] = {}
        self.handles: list = []

    def __enter__(self):
        for name, (kind, sub) in self.maps.items():
            if kind == "linear":
                self.handles.append(sub.register_forward_hook(self._linear_hook(_key(name, "weight"))))
            else:
                self.handles.append(sub.register_forward_hook(self._mha_hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []
        return False

    def add(self, key: str, x: Tensor) -> None:
        x = x.detach()
        x = x.reshape(-1, x.shape[-1])
        xtx = x.transpose(0, 1) @ x
        rows = x.shape[0]
        if key not in self.grams:
            self.grams[key] = xtx / rows
            self.rows[key] = rows
        else:
            n = self.rows[key]
            self.grams[key] = (self.grams[key] * n + xtx) / (n + rows)
            self.rows[key] = n + rows

    def _linear_hook(self, key: str):
        def hook(module, inputs, output):
            self.add(key, inputs[0])
        return hook

    def _mha_hook(self, name: str):
        def hook(module: nn.MultiheadAttention, args, kwargs, output):
            bound = _bind_mha(args, kwargs)
            query, key, value = bound["query"], bound["key"], bound["value"]
            if module._qkv_same_embed_dim and key is query and value is query:
                self.add(_key(name, "in_proj_weight"), query)
            elif module._qkv_same_embed_dim:
                for suffix, x in (("q", query), ("k", key), ("v", value)):
                    self.add(_key(name, "in_proj_weight") + "#" + suffix, x)
            else:
                for leaf, x in (("q_proj_weight", query), ("k_proj_weight", key), ("v_proj_weight", value)):
                    self.add(_key(name, leaf), x)
            self.add(_key(name, "out_proj.weight"), _attention_values(module, bound))
        return hook


def _bind_mha(args, kwargs) -> dict:
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _attention_values(module: nn.MultiheadAttention, bound: Mapping) -> Tensor:
    """The concatenated heads' outputs (the input of ``out_proj``)."""
    query, key, value = bound["query"], bound["key"], bound["value"]
    batched = query.dim() == 3
    if module.batch_first and batched:
        query, key, value = (x.transpose(0, 1) for x in (query, key, value))
    eye = torch.eye(module.embed_dim, dtype=query.dtype, device=query.device)
    with torch.no_grad():
        out, _ = nn.functional.multi_head_attention_forward(
            query, key, value, module.embed_dim, module.num_heads,
            module.in_proj_weight, module.in_proj_bias, module.bias_k, module.bias_v, module.add_zero_attn,
            0.0, eye, None, training=False, key_padding_mask=bound.get("key_padding_mask"), need_weights=False,
            attn_mask=bound.get("attn_mask"), use_separate_proj_weight=not module._qkv_same_embed_dim,
            q_proj_weight=module.q_proj_weight, k_proj_weight=module.k_proj_weight,
            v_proj_weight=module.v_proj_weight, is_causal=bool(bound.get("is_causal", False)))
    return out


def reduce_non_diagonal(gram: Tensor, ratio: float) -> Tensor:
    """Off-diagonal entries × ``ratio``, diagonal kept (RegMean's
    regularisation toward the plain average); the scale matrix is built as
    FusionBench builds it, so results agree to the bit."""
    n = gram.shape[0]
    scale = torch.diag(torch.ones(n, dtype=gram.dtype, device=gram.device) - ratio)
    scale = scale + torch.full_like(scale, ratio)
    return gram * scale


def check_method_models(method: MergeMethod, n: int) -> None:
    if n < 1:
        raise MergeInputError("no task was absorbed: give at least one fine-tuned model")
    method.check_num_models(n)


def require_int(name: str, value, method: str, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise HyperparameterError(f"{method}: {name} must be an integer >= {minimum}, got {value!r}")
