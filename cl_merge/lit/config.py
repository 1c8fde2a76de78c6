"""Fine-tuning and logging settings (the ``train:`` and ``logging:`` config
sections). Plain dataclasses, importable without Lightning; validate dicts
with ``cl_merge.config.from_dict(TrainConfig, data, where=...)``.

Defaults follow the MagMax recipe for CLIP image encoders: AdamW lr 1e-5,
weight decay 0.1, batch 128, cosine schedule with 500 linear warm-up steps,
gradient clipping at 1.0. FusionBench's CLIP recipe is ``optimizer="adam"``,
``weight_decay=0``, ``warmup_steps=0``, ``grad_clip=None``, 4000 steps.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from cl_merge.errors import HyperparameterError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("cosine", "constant", "linear")
MAX_SEED = 2**32 - 1  # numpy / Lightning seeds are unsigned 32-bit

# fields that change how a run looks, not what it computes (left out of the resume/skip key)
COSMETIC_FIELDS = frozenset(
    {"progress_bar", "keep_checkpoints", "log_every_n_steps", "num_workers", "checkpoint_every_n_steps", "eval_batch_size"}
)
# data-loading settings: how fast batches arrive, never which ones (the order is a function of seed and step)
COSMETIC_FIELDS = COSMETIC_FIELDS | {"pin_memory", "persistent_workers", "prefetch_factor"}


@dataclasses.dataclass
class TrainConfig:
    """How to fine-tune one encoder on one task.

    ``trainable``: ``all`` encoder parameters, the ``last_k_blocks``
    (``trainable_k`` blocks plus final norm/projection) or ``layernorm``
    affine parameters only. ``augment``: train with the model's training
    transform (random crops, ...) instead of its evaluation transform (the
    task-vectors recipe trains on the evaluation preprocessing).
    ``cache_tensors``: precompute the transformed images once (only without
    ``augment``, and only for splits under 256 MiB of tensors: larger ones
    are streamed). ``num_workers``/``pin_memory``/``persistent_workers``/
    ``prefetch_factor``: DataLoader settings (images are decoded and
    transformed in the workers).
    ``accelerator``/``devices``/``strategy``/``precision``/``num_nodes`` go to
    ``lightning.Trainer`` unchanged ("ddp", "fsdp", "bf16-mixed", ...).
    Under a multi-process strategy ``batch_size`` is the global batch: each
    process trains on its slice of the batch a single process would draw.
    ``val_check_interval``: validate every n steps (int) during training;
    ``None`` validates only once at the end (``eval_splits``).
    ``deterministic``: ``Trainer(deterministic=...)``; CPU runs are
    reproducible with the same seed either way.
    ``optimizer``: ``adamw`` (decoupled weight decay), ``adam`` (weight decay
    as an L2 term, as ``torch.optim.Adam``) or ``sgd`` (with ``momentum``,
    L2 weight decay). ``scheduler``: the learning rate after the linear
    warm-up of ``warmup_steps`` steps: ``cosine`` decay to 0 at
    ``max_steps``, ``linear`` decay to 0 at ``max_steps``, or ``constant``.
    """

    max_steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-5
    weight_decay: float = 0.1
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    momentum: float = 0.9  # sgd only
    scheduler: Literal["cosine", "constant", "linear"] = "cosine"
    warmup_steps: int = 500
    grad_clip: float | None = 1.0
    label_smoothing: float = 0.0
    trainable: Literal["all", "last_k_blocks", "layernorm"] = "all"
    trainable_k: int = 1
    augment: bool = False
    cache_tensors: bool = False
    accelerator: str = "auto"
    devices: int | str | list[int] = "auto"
    strategy: str = "auto"
    precision: str | int = "32-true"
    num_nodes: int = 1
    num_workers: int = 0
    pin_memory: bool | None = None  # None: on when CUDA is available
    persistent_workers: bool = True  # keep training workers between epochs
    prefetch_factor: int | None = None  # batches each worker loads ahead (None: torch's default, 2)
    val_check_interval: int | None = None
    eval_splits: list[str] = dataclasses.field(default_factory=lambda: ["val", "test"])
    eval_batch_size: int | None = None
    checkpoint_every_n_steps: int | None = 500
    keep_checkpoints: bool = False
    log_every_n_steps: int = 10
    progress_bar: bool = True
    seed: int = 0
    deterministic: bool = False

    def __post_init__(self) -> None:
        positive = {"max_steps": self.max_steps, "batch_size": self.batch_size, "trainable_k": self.trainable_k,
                    "num_nodes": self.num_nodes, "log_every_n_steps": self.log_every_n_steps}
        for name, value in positive.items():
            if value < 1:
                raise HyperparameterError(f"{name} must be >= 1, got {value}")
        for name in ("val_check_interval", "eval_batch_size", "checkpoint_every_n_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise HyperparameterError(f"{name} must be >= 1 or null, got {value}")
        if self.lr <= 0:
            raise HyperparameterError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise HyperparameterError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.optimizer not in OPTIMIZERS:
            raise HyperparameterError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.scheduler not in SCHEDULERS:
            raise HyperparameterError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise HyperparameterError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.seed <= MAX_SEED:
            raise HyperparameterError(f"seed must be in 0..{MAX_SEED}, got {self.seed}")
        if self.warmup_steps < 0:
            raise HyperparameterError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise HyperparameterError(f"grad_clip must be > 0 or null, got {self.grad_clip}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise HyperparameterError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.num_workers < 0:
            raise HyperparameterError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor is not None and self.prefetch_factor < 1:
            raise HyperparameterError(f"prefetch_factor must be >= 1 or null, got {self.prefetch_factor}")
        if self.trainable not in ("all", "last_k_blocks", "layernorm"):
            raise HyperparameterError(f"trainable must be all, last_k_blocks or layernorm, got {self.trainable!r}")
        if self.augment and self.cache_tensors:
            raise HyperparameterError("cache_tensors would freeze one draw of the augmentation; use augment or cache_tensors")
        bad = [s for s in self.eval_splits if s not in ("train", "val", "test")]
        if bad:
            raise HyperparameterError(f"eval_splits: unknown split {bad[0]!r} (valid: train, val, test)")


@dataclasses.dataclass
class LoggerConfig:
    """Lightning's ``CSVLogger`` always writes ``<out>/logs``; ``wandb: true``
    adds a ``WandbLogger``, offline by default (no account or API key needed;
    ``wandb sync`` uploads later). ``wandb_mode: online`` is the only way to
    reach the wandb servers."""

    wandb: bool = False
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "cl_merge"
    wandb_entity: str | None = None
    wandb_group: str | None = None
    wandb_tags: list[str] = dataclasses.field(default_factory=list)
    run_name: str | None = None
