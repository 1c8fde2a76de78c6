"""The strategy registry: ``@register`` on a strategy class, one line per
strategy in ``cl_merge/merging/__init__.py``."""

from __future__ import annotations

import dataclasses

from cl_merge.errors import HyperparameterError, UnknownNameError, close_matches
from cl_merge.merging.base import MergeMethod

_REGISTRY: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"merging strategy {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def method_class(name: str) -> type[MergeMethod]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError(
            f"unknown merging method {name!r}{close_matches(name, _REGISTRY)}; valid: {', '.join(available_methods())}"
        ) from None


def get_method(name: str, **hparams) -> MergeMethod:
    """Instantiate a strategy, checking hyperparameter names and ranges."""
    cls = method_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in hparams if k not in fields]
    if unknown:
        valid = ", ".join(sorted(fields)) or "none"
        raise HyperparameterError(
            f"{name}: unknown hyperparameter {unknown[0]!r}{close_matches(unknown[0], fields)} (valid: {valid})"
        )
    try:
        return cls(**hparams)
    except TypeError as exc:
        raise HyperparameterError(f"{name}: {exc}") from None


def _is_incremental(cls: type[MergeMethod]) -> bool:
    """Memory independent of the number of tasks: the lifecycle strategy's
    flag for methods that build their own (OPCM, DOP, CoFiMA), else the
    incremental hooks of the default settings."""
    method = cls()
    create = getattr(method, "create_strategy", None)
    if create is not None:
        return bool(create(key_filter=None, device=None).incremental)
    return method.supports_incremental() if cls.incremental else False


def describe_methods() -> list[dict]:
    rows = []
    for name in available_methods():
        cls = _REGISTRY[name]
        rows.append({
            "name": name,
            "reference": cls.reference,
            "incremental": _is_incremental(cls),
            "hparams": {f.name: f.default for f in dataclasses.fields(cls)},
            "summary": (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "",
        })
    return rows
