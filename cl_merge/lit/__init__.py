"""Lightning fine-tuning: ``finetune`` (artifacts for merging), ``evaluate``
(plain accuracy loop), ``FineTuneModule``, ``TaskDataModule``, ``TrainConfig``.

``TrainConfig``/``LoggerConfig`` and ``evaluate`` import without Lightning;
the rest loads it on first use.
"""

from cl_merge.lit.config import LoggerConfig, TrainConfig
from cl_merge.lit.evaluate import evaluate, predict_logits

_LAZY = {
    "finetune": "cl_merge.lit.finetune",
    "FinetuneResult": "cl_merge.lit.finetune",
    "FineTuneModule": "cl_merge.lit.module",
    "WarmupCosine": "cl_merge.lit.module",
    "WarmupSchedule": "cl_merge.lit.module",
    "build_optimizer": "cl_merge.lit.module",
    "TaskDataModule": "cl_merge.lit.datamodule",
    "make_loggers": "cl_merge.lit.loggers",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # replaces the submodule attribute of the same name (lit.finetune)
        return value
    raise AttributeError(f"module 'cl_merge.lit' has no attribute {name!r}")


__all__ = ["LoggerConfig", "TrainConfig", "evaluate", "predict_logits", *_LAZY]
