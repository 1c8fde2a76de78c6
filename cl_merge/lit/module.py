"""``FineTuneModule``: fine-tune an encoder on one task under a head.

The standard recipe for CLIP (task vectors, MagMax): only the image encoder
trains; the zero-shot head is frozen (its tensors are buffers). A ViT's
linear head trains with the encoder. Optimiser (``TrainConfig.optimizer``): AdamW, Adam
or SGD with momentum over the trainable parameters; learning rate: linear
warm-up to ``lr`` over ``warmup_steps``, then (``TrainConfig.scheduler``)
cosine or linear decay to 0 at ``max_steps``, or constant; stepped every
optimizer step.
"""

from __future__ import annotations

import math
from typing import Sequence

import cl_merge._torchvision_compat  # noqa: F401  (before Lightning imports torchvision)
import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from cl_merge.errors import HyperparameterError
from cl_merge.lit.config import TrainConfig


class WarmupSchedule:
    """lr factor: (step+1)/warmup during warm-up, then by ``kind``:
    ``cosine`` 0.5·(1+cos(π·progress)), ``linear`` 1−progress, ``constant`` 1,
    with progress = (step−warmup)/(max_steps−warmup) clipped to [0, 1].
    A class rather than a closure so the scheduler state stays picklable."""

    def __init__(self, warmup_steps: int, max_steps: int, kind: str = "cosine"):
        if kind not in ("cosine", "linear", "constant"):
            raise HyperparameterError(f"scheduler must be cosine, linear or constant, got {kind!r}")
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.kind = kind

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        decay_steps = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        if self.kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine(WarmupSchedule):
    """``WarmupSchedule(..., "cosine")`` under the name scripts and tests import."""

    def __init__(self, warmup_steps: int, max_steps: int):
        super().__init__(warmup_steps, max_steps, "cosine")


def build_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``config.optimizer`` names, with ``lr`` and ``weight_decay``."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    raise HyperparameterError(f"optimizer must be adam, adamw or sgd, got {config.optimizer!r}")


class FineTuneModule(pl.LightningModule):
    """Lightning module over ``head(encoder(images))``.

    ``trainable_names``: encoder parameter names to train (``None``: all);
    the rest get ``requires_grad=False``. ``train_head``: whether the head's
    parameters train (ViT linear heads) or stay frozen (CLIP).
    """

    def __init__(
        self,
        encoder: nn.Module,
        head: nn.Module,
        config: TrainConfig,
        *,
        num_classes: int,
        trainable_names: Sequence[str] | None = None,
        train_head: bool = False,
    ):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.config = config
        self.train_head = train_head
        names = None if trainable_names is None else set(trainable_names)
        unknown = sorted(names - {n for n, _ in encoder.named_parameters()}) if names is not None else []
        if unknown:
            raise HyperparameterError(f"trainable parameter {unknown[0]!r} is not in the encoder")
        for name, param in encoder.named_parameters():
            param.requires_grad_(names is None or name in names)
        for param in head.parameters():
            param.requires_grad_(train_head)
        if not any(p.requires_grad for p in self.parameters()):
            raise HyperparameterError("nothing to train: no encoder or head parameter is trainable")
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.train()  # models arrive in eval mode (open_clip builds them so); Lightning keeps modes as found

    @classmethod
    def from_task_model(cls, model, head: nn.Module, config: TrainConfig, *, num_classes: int,
                        encoder: nn.Module | None = None) -> "FineTuneModule":
        """Trainable subset and head policy taken from a ``TaskModel``;
        ``encoder`` (default ``model.encoder``) lets a copy be trained instead."""
        names = model.trainable_parameter_names(config.trainable, config.trainable_k)
        return cls(encoder if encoder is not None else model.encoder, head, config, num_classes=num_classes,
                   trainable_names=names, train_head=model.head_trainable)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = self.loss_fn(logits.float(), labels)
        self.train_acc(logits.detach(), labels)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/acc", self.train_acc, prog_bar=True, on_step=True, on_epoch=False)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.val_acc(logits, labels)
        self.log("val/loss", self.loss_fn(logits.float(), labels), prog_bar=True, on_epoch=True, sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True, on_epoch=True)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, self.config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, WarmupSchedule(self.config.warmup_steps, self.config.max_steps, self.config.scheduler)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
