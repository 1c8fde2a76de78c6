"""The contract every merging strategy follows, and the engine that runs it.

A strategy is a dataclass whose fields are its hyperparameters (with the
paper's defaults). Its math is pure functions over float tensors:

- ``merge_tensor(key, base, deltas, context) -> Tensor``: merged *weights*
  for one entry, from the pretrained tensor ``base`` and the task vectors
  ``deltas`` (one per fine-tuned model), all float32 (float64 where the
  strategy sets ``compute_dtype`` or the entry itself is float64: a merge
  never computes in a lower precision than its input), on the merge's device
  (``device=``: one entry at a time is moved there, results come back to
  the CPU).
- ``prepare(stream) -> context`` (optional): a pass over all entries before
  merging, for strategies that need model-wide statistics (TIES' global top-k,
  LiNeS' depth of every layer). ``stream`` can be iterated several times.
- ``finalize(merged, context)`` (optional): wraps the merged dict, e.g. into a
  ``PerTaskMergeResult`` for strategies that keep per-task parts.

Strategies that can be computed one task at a time with memory that does not
grow with the number of tasks also implement the incremental hooks
(``incremental = True``): ``init_state`` / ``update_state`` / ``state_weights``,
driven by ``IncrementalMerger``.

The engine (``run_merge``) owns validation (keys, shapes, NaN/Inf, integer
buffers), dtype handling and I/O; the strategies never see files, Lightning
or models, and never mutate their inputs.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

import torch

from cl_merge.core.state_dict import (
    DictSource,
    KeyFilter,
    check_finite,
    copied_entry,
    plan_merge,
    source_name,
)
from cl_merge.errors import HyperparameterError, MergeInputError
from cl_merge.merging import _placement

Tensor = torch.Tensor


# ----------------------------------------------------------------- tensor streams
class TensorStream:
    """Re-iterable view over the merged entries: yields ``(key, base, deltas)``
    with ``base`` the pretrained tensor and ``deltas`` the task vectors, in the
    compute dtype, one entry at a time (a lazy checkpoint source is read one
    tensor per model per step, so memory stays near one tensor per input)."""

    def __init__(self, pretrained, finetuned: Sequence, keys: Sequence[str],
                 compute_dtype: torch.dtype = torch.float32, check: bool = True,
                 deltas_given: bool = False, raw_weights: bool = False, device: torch.device | None = None):
        self.device = device
        self.pretrained = pretrained
        self.finetuned = list(finetuned)
        self.keys = list(keys)
        self.compute_dtype = compute_dtype
        self.check = check
        self.deltas_given = deltas_given  # inputs are task vectors already
        self.raw_weights = raw_weights  # yield fine-tuned weights instead of deltas
        self._checked: set[str] = set()  # keys whose inputs passed the NaN/Inf check

    @property
    def num_models(self) -> int:
        return len(self.finetuned)

    def shape(self, key: str) -> tuple[int, ...]:
        src = self.pretrained
        return tuple(src.shape(key)) if hasattr(src, "shape") else tuple(src.get(key).shape)

    def load(self, key: str) -> tuple[Tensor, list[Tensor]]:
        # each entry is checked once, on the first pass (strategies with a
        # prepare() pass read the stream several times)
        check = self.check and key not in self._checked
        base = self.pretrained.get(key)
        if check and not _all_finite(base):
            check_finite(key, base, f"the pretrained model ({source_name(self.pretrained)})")
        dtype = compute_dtype_for(self.compute_dtype, base.dtype)
        base = base.detach().to(device=self.device, dtype=dtype)
        deltas = []
        for i, model in enumerate(self.finetuned):
            value = model.get(key)
            if check and not _all_finite(value):
                check_finite(key, value, f"fine-tuned model {i} ({source_name(model)})")
            value = value.detach().to(device=self.device, dtype=dtype)
            deltas.append(value if (self.deltas_given or self.raw_weights) else value - base)
        if check:
            self._checked.add(key)
        return base, deltas

    def __iter__(self) -> Iterator[tuple[str, Tensor, list[Tensor]]]:
        for key in self.keys:
            base, deltas = self.load(key)
            yield key, base, deltas


# ----------------------------------------------------------------- results
class PerTaskMergeResult(Mapping[str, Tensor]):
    """Result of strategies that keep per-task parts (TALL masks, EMR).

    Behaves as the shared merged state dict (a Mapping), and
    ``task_state_dict(i)`` gives the weights to use for task ``i``.
    """

    def __init__(self, shared: dict[str, Tensor], task_fn: Callable[[int], dict[str, Tensor]], num_tasks: int):
        self.shared = shared
        self._task_fn = task_fn
        self.num_tasks = num_tasks

    def __getitem__(self, key):
        return self.shared[key]

    def __iter__(self):
        return iter(self.shared)

    def __len__(self):
        return len(self.shared)

    check: bool = True  # finiteness of the per-task entries in their dtype

    def task_state_dict(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < self.num_tasks:
            raise IndexError(f"task index {index} out of range for {self.num_tasks} tasks")
        with torch.no_grad():
            out = {key: value.detach() for key, value in self._task_fn(index).items()}
        if self.check:
            for key, value in out.items():
                if value.is_floating_point() and not _all_finite(value):
                    raise MergeInputError(f"the task-{index} model's tensor {key!r} is not finite in {value.dtype} "
                                          "(overflow when rounding to the output dtype)")
        return out


# ----------------------------------------------------------------- the strategy base
@dataclass
class MergeMethod:
    """Base class; subclasses are dataclasses of hyperparameters."""

    name: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    incremental: ClassVar[bool] = False
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    compute_dtype: ClassVar[torch.dtype] = torch.float32
    per_task: ClassVar[bool] = False
    # ``merge_tensor`` receives fine-tuned *weights* instead of task vectors
    # (saves one subtraction per input for sums; the tensors may alias the inputs:
    # never modify them in place)
    uses_weights: ClassVar[bool] = False
    # a NaN/Inf in any input surely reaches the output (sums, means): the engine
    # then checks only the output and looks for the culprit input on failure,
    # instead of scanning every input tensor
    propagates_nonfinite: ClassVar[bool] = False
    # ``merge_tensor`` is entry-wise (output[j] depends only on input[j], no
    # per-tensor statistics or RNG): the engine then feeds large tensors in
    # cache-sized chunks, which keeps the accumulator in cache (≈5× faster sums)
    elementwise: ClassVar[bool] = False
    # entries per chunk when the engine fills the output with merge_tensor_into
    # (2^19, 2 MiB of fp32): a sum's accumulator and scratch stay in cache
    # while each input chunk streams through once, and the chunks are large
    # enough that torch's per-op overhead and the threads' fork/join per op
    # stay small (task arithmetic on ViT-B/32 inputs: 2^16 is 1.3× slower,
    # 2^20 no faster)
    into_chunk: ClassVar[int] = 1 << 19

    def __post_init__(self) -> None:
        check_hparam_types(self)
        self.validate()

    # -- hyperparameters
    def validate(self) -> None:
        """Raise HyperparameterError for out-of-range values (override). Types
        are already checked against the field annotations (``check_hparam_types``)."""

    def hparams(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def hparam_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def check_num_models(self, n: int) -> None:
        if n < 1:
            raise MergeInputError("the list of fine-tuned models is empty: give at least one")
        if n < self.min_models or (self.max_models is not None and n > self.max_models):
            want = (str(self.min_models) if self.max_models == self.min_models
                    else f"{self.min_models}..{self.max_models or 'any'}")
            raise HyperparameterError(f"{self.name} merges {want} fine-tuned models, got {n}")

    # -- batch form
    def prepare(self, stream: TensorStream) -> Any:
        return None

    def merge_tensor(self, key: str, base: Tensor, deltas: list[Tensor], context: Any) -> Tensor:
        raise NotImplementedError

    # Entry-wise strategies may also write their result in place (override
    # ``merge_tensor_into``): the engine then hands out slices of the output
    # (``into_chunk`` entries), so no per-chunk result is allocated and copied.
    def merge_tensor_into(self, out: Tensor, key: str, base: Tensor, deltas: list[Tensor], context: Any) -> None:
        out.copy_(self.merge_tensor(key, base, deltas, context))

    def finalize(self, merged: dict[str, Tensor], context: Any, stream: TensorStream):
        return merged

    # -- incremental form (only where ``incremental = True``)
    def supports_incremental(self) -> bool:
        """Whether these hyperparameters have an incremental form through the
        per-entry hooks below (a strategy may have one only for some settings,
        e.g. Model Stock's cosine average). A method that builds its own
        lifecycle strategy (``create_strategy``: data, a model or model-wide
        steps) is incremental, if at all, through that strategy, not here."""
        return self.incremental and not builds_own_strategy(self)

    def prepare_task(self, key_deltas: "TensorStream") -> Any:
        """Per-task statistics needed before ``update_state`` (e.g. TIES' global threshold)."""
        return None

    def init_state(self, key: str, base: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError(f"{self.name} has no incremental form")

    def update_state(self, key: str, base: Tensor, state: dict[str, Tensor], delta: Tensor,
                     num_seen: int, task_context: Any) -> dict[str, Tensor]:
        raise NotImplementedError(f"{self.name} has no incremental form")

    def state_weights(self, key: str, base: Tensor, state: dict[str, Tensor], num_seen: int) -> Tensor:
        raise NotImplementedError(f"{self.name} has no incremental form")

    def fold_tensor(self, key: str, base: Tensor, deltas: list[Tensor], task_context: Any = None) -> Tensor:
        """The batch form of an incremental strategy: fold the task vectors into
        the running state one by one (so both forms agree to the bit)."""
        state = self.init_state(key, base)
        for i, delta in enumerate(deltas):
            state = self.update_state(key, base, state, delta, i, task_context)
        return self.state_weights(key, base, state, len(deltas))


# ----------------------------------------------------------------- hyperparameter types
def _type_ok(value, hint) -> bool:
    """Whether ``value`` fits the annotation ``hint`` (the dataclass field type)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if hint is float:  # an int is a number too; a bool is not (True would be 1.0)
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is bool:
        return isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, item) for v in value)
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return isinstance(value, Mapping)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(arg) for arg in typing.get_args(hint) if arg is not type(None)]
        text = " or ".join(parts)
        return text + " (or None)" if type(None) in typing.get_args(hint) else text
    if hint is float:
        return "a number"
    if hint is int:
        return "an integer"
    if origin in (list, tuple):
        args = typing.get_args(hint)
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    names = {str: "a string", bool: "true or false", dict: "a mapping"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def check_hparam_types(method) -> None:
    """Every strategy's hyperparameters are checked here, against the types
    of its dataclass fields: ``density='0.2'``, ``scaling=True``, NaN or Inf
    fail with one line naming the field, before any range check."""
    hints = typing.get_type_hints(type(method))
    for field in dataclasses.fields(method):
        hint = hints.get(field.name, Any)
        value = getattr(method, field.name)
        if value is field.default:
            continue  # the strategy's own default (e.g. None standing for "derived") is trusted
        if not _type_ok(value, hint):
            if isinstance(value, float) and not math.isfinite(value):
                raise HyperparameterError(f"{method.name}: {field.name} must be finite, got {value!r}")
            raise HyperparameterError(f"{method.name}: {field.name} must be {_describe(hint)}, got {value!r}")


def compute_dtype_for(compute_dtype: torch.dtype, input_dtype: torch.dtype) -> torch.dtype:
    """The strategy's compute dtype, or the input's when that is more precise
    (float64 models are merged in float64)."""
    if input_dtype == torch.float64 and compute_dtype != torch.float64:
        return torch.float64
    return compute_dtype


# ----------------------------------------------------------------- helpers for strategies
def require(condition: bool, message: str) -> None:
    if not condition:
        raise HyperparameterError(message)


def check_fraction(name: str, value: float, *, allow_zero: bool = False, method: str = "") -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    interval = "[0, 1]" if allow_zero else "(0, 1]"
    require(low_ok and value <= 1,
            f"{method + ': ' if method else ''}{name} must be in {interval}, got {value!r}")


def check_nonnegative(name: str, value: float, method: str = "") -> None:
    require(value >= 0,
            f"{method + ': ' if method else ''}{name} must be >= 0, got {value!r}")


# ----------------------------------------------------------------- the engine
def _as_source(obj, name: str):
    if hasattr(obj, "get") and hasattr(obj, "keys") and not isinstance(obj, Mapping):
        return obj
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if not isinstance(value, Tensor):
                raise MergeInputError(f"{name}: entry {key!r} is a {type(value).__name__}, not a torch.Tensor")
            if value.device.type == "meta":
                raise MergeInputError(f"{name}: entry {key!r} is on the meta device (shape only, no values); "
                                      "load the weights before merging")
        return DictSource(obj, name)
    raise MergeInputError(f"{name} must be a state dict (mapping of name to tensor), got {type(obj).__name__}")


def as_model_list(finetuned) -> list:
    """The fine-tuned models as a list, refusing the usual mistakes clearly."""
    if finetuned is None:
        raise MergeInputError("the list of fine-tuned models is missing (got None): give a list of state dicts")
    if isinstance(finetuned, Mapping):
        raise MergeInputError("finetuned must be a list of state dicts; got a single state dict "
                              "(wrap it in a list: [model])")
    if isinstance(finetuned, (str, bytes)) or not hasattr(finetuned, "__len__"):
        raise MergeInputError(f"finetuned must be a list of state dicts, got {type(finetuned).__name__}")
    if len(finetuned) == 0:
        raise MergeInputError("the list of fine-tuned models is empty: give at least one")
    return list(finetuned)


def resolve_device(device) -> torch.device | None:
    """``None`` (compute where the inputs are, the CPU for checkpoints) or a
    usable torch device."""
    if device is None:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise MergeInputError(f"invalid device {device!r}: {exc}") from None
    if resolved.type == "meta":
        raise MergeInputError("device 'meta' holds no values: merge on 'cpu' or 'cuda'")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise MergeInputError(f"device {device!r} requested but CUDA is not available on this machine")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise MergeInputError(f"device {device!r} requested but MPS is not available on this machine")
    return resolved


_CHUNK = 1 << 16  # elements per chunk for entry-wise methods (256 KiB of fp32: fits L2)


def _overrides_into(method: MergeMethod) -> bool:
    return type(method).merge_tensor_into is not MergeMethod.merge_tensor_into


def _merge_entry(method: MergeMethod, key: str, base: Tensor, deltas: list[Tensor], context,
                 want_sum: bool = False) -> tuple[Tensor, Tensor | None]:
    """The merged entry and, with ``want_sum`` where it comes for free (chunk
    by chunk while each is in cache), the sum of its values: finite exactly
    when every value is (or None: the caller tests the result itself)."""
    if not method.elementwise or not _placement.host_kernels(base):
        return method.merge_tensor(key, base, deltas, context), None
    into = _overrides_into(method)
    chunk = method.into_chunk if into else _CHUNK
    if not into and base.numel() <= 2 * chunk:
        return method.merge_tensor(key, base, deltas, context), None
    flat_base = base.reshape(-1)
    flat_deltas = [d.reshape(-1) for d in deltas]
    out = torch.empty(flat_base.shape, dtype=base.dtype)
    sums = []
    for start in range(0, flat_base.numel(), chunk):
        part = slice(start, start + chunk)
        if into:
            method.merge_tensor_into(out[part], key, flat_base[part], [d[part] for d in flat_deltas], context)
        else:
            out[part] = method.merge_tensor(key, flat_base[part], [d[part] for d in flat_deltas], context)
        if want_sum:
            sums.append(out[part].sum())
    total = (sums[0] if len(sums) == 1 else torch.stack(sums).sum()) if sums else None
    return out.view(base.shape), total


class _TaskVectorSource:
    """A task vector seen as a full state-dict source next to θ0: entries the
    task vector lacks are θ0's own (integer buffers) or a zero delta (float
    entries left out when it was made); with ``as_weights`` it yields θ0 + τ,
    for strategies that read fine-tuned weights."""

    def __init__(self, pretrained, task_vector, as_weights: bool):
        self.pretrained = pretrained
        self.task_vector = task_vector
        self.as_weights = as_weights
        self.path = source_name(task_vector)
        self._own = set(task_vector.keys())

    def keys(self):
        return self.pretrained.keys()

    def shape(self, key: str):
        if key in self._own:
            tv = self.task_vector
            return tuple(tv.shape(key)) if hasattr(tv, "shape") else tuple(tv.get(key).shape)
        return tuple(self.pretrained.shape(key)) if hasattr(self.pretrained, "shape") else tuple(self.pretrained.get(key).shape)

    def dtype(self, key: str):
        return self.pretrained.dtype(key) if hasattr(self.pretrained, "dtype") else self.pretrained.get(key).dtype

    def get(self, key: str) -> Tensor:
        base = self.pretrained.get(key)
        if not base.is_floating_point():
            return base
        if key not in self._own:
            return base.clone() if self.as_weights else torch.zeros_like(base, dtype=torch.promote_types(base.dtype, torch.float32))
        delta = self.task_vector.get(key)
        if not self.as_weights:
            return delta
        dtype = torch.promote_types(base.dtype, delta.dtype)
        return base.to(dtype) + delta.to(dtype)


def _all_finite(tensor: Tensor, total: Tensor | None = None) -> bool:
    """Cheap test first: the sum (``total`` if already known) is finite unless
    some entry is NaN/Inf (or the sum overflows, which the exact test then clears)."""
    if bool(torch.isfinite(tensor.sum() if total is None else total)):
        return True
    return bool(torch.isfinite(tensor).all())


def builds_own_strategy(method: MergeMethod) -> bool:
    """The method runs only through the strategy its ``create_strategy``
    builds (OPCM, DOP, CoFiMA, the data-based methods), never through the
    per-entry engine."""
    return getattr(method, "create_strategy", None) is not None


def run_merge(method: MergeMethod, pretrained, finetuned: Sequence, *,
              key_filter: KeyFilter | None = None, check: bool = True,
              progress: Callable[[Iterator], Iterator] | None = None, device=None,
              task_vectors: bool = False):
    """Merge with ``method``. ``pretrained`` and each of ``finetuned`` are state
    dicts or lazy checkpoint readers (``cl_merge.core.io.CheckpointReader``).

    ``device``: where the arithmetic runs (e.g. ``"cuda"``); entries are
    moved there one at a time and the results come back to the CPU, so a
    model larger than the device's memory merges. ``task_vectors=True``:
    ``finetuned`` holds task vectors (τ = θ_t − θ0) instead of fine-tuned
    weights. Returns a new dict (or
    ``PerTaskMergeResult``) of plain CPU tensors (no autograd history) in the
    pretrained model's dtypes; inputs are never modified. With ``check`` the
    inputs are checked for NaN/Inf and every result *after* rounding to its
    output dtype (an fp16 merge that overflows is refused, naming the entry).
    """
    if builds_own_strategy(method):
        raise MergeInputError(f"{method.name} folds the models in one at a time with model-wide steps (or data); "
                              "run it through cl_merge.merge(...), incremental_merger(...) or build_strategy(...), "
                              "not run_merge")
    fts_in = as_model_list(finetuned)
    target = resolve_device(device)
    pre = _as_source(pretrained, "pretrained")
    fts = [_as_source(m, f"fine-tuned model {i}") for i, m in enumerate(fts_in)]
    method.check_num_models(len(fts))
    if task_vectors:
        fts = [_TaskVectorSource(pre, tv, as_weights=method.uses_weights) for tv in fts]
    plan = plan_merge(pre, fts, key_filter)
    with torch.no_grad():
        return _run(method, pre, fts, plan, check, progress, target, task_vectors)


def _run(method, pre, fts, plan, check, progress, device, task_vectors=False):
    lazy_check = check and method.propagates_nonfinite
    stream = TensorStream(pre, fts, plan.merge_keys, method.compute_dtype, check=check and not lazy_check,
                          raw_weights=method.uses_weights, device=device,
                          deltas_given=task_vectors and not method.uses_weights)
    context = method.prepare(stream)
    merged: dict[str, Tensor] = {}
    keys_iter = iter(stream)
    if progress is not None:
        keys_iter = progress(keys_iter)
    for key, base, deltas in keys_iter:
        out_dtype = pre.dtype(key) if hasattr(pre, "dtype") else pre.get(key).dtype
        result, total = _merge_entry(method, key, base, deltas, context, want_sum=lazy_check)
        if lazy_check and not _all_finite(result, total):
            stream.check = True
            stream.load(key)  # raises, naming the input and tensor
            stream.check = False
            raise MergeInputError(f"merging {key!r} produced NaN/Inf from finite inputs (overflow in {result.dtype})")
        cast = result.to(device="cpu", dtype=out_dtype)  # inputs were detached: no autograd history
        # (a lazily checked result that needed no cast was just checked)
        if check and not (lazy_check and cast is result) and not _all_finite(cast):
            if not _all_finite(result):
                raise MergeInputError(f"merging {key!r} produced NaN/Inf from finite inputs (overflow in {result.dtype})")
            raise MergeInputError(f"merged tensor {key!r} overflows {out_dtype}: its values exceed the range of "
                                  f"the output dtype (largest |value| {float(result.abs().max()):.4g})")
        merged[key] = cast
    ordered: dict[str, Tensor] = {}
    for key in pre.keys():
        ordered[key] = merged[key] if key in merged else copied_entry(key, pre, fts).detach()
    result = method.finalize(ordered, context, stream)
    if isinstance(result, PerTaskMergeResult):
        result.check = check
    return result
