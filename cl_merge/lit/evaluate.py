"""Accuracy of (encoder weights, head) on a dataset: a plain no-grad loop,
no Trainer, used after every merge.

The encoder weights are applied with ``torch.func.functional_call``, so
evaluating a merged state dict neither copies the model nor changes the
weights the model holds.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader

from cl_merge.core.heap import release_freed_heap
from cl_merge.errors import ConfigError, DataError
from cl_merge.models.base import TaskModel, check_state_dict_fits

_GPU_ACCELERATORS = ("gpu", "cuda")


def resolve_device(accelerator: str = "auto", devices=None) -> torch.device:
    """The torch device a run configured with Lightning's ``accelerator`` /
    ``devices`` computes on (the first device of a multi-device setting).

    ``auto``: the first GPU when CUDA is available, else the CPU. ``gpu``/``cuda``
    without CUDA is a ConfigError, as in Lightning.
    """
    accelerator = str(accelerator or "auto").lower()
    index = 0
    if isinstance(devices, (list, tuple)) and devices:
        index = int(devices[0])
    elif isinstance(devices, str) and "," in devices:
        index = int(devices.split(",")[0].strip() or 0)
    if accelerator == "cpu":
        return torch.device("cpu")
    if accelerator in _GPU_ACCELERATORS or (accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError(f"accelerator {accelerator!r}: no CUDA GPU is available on this machine")
        return torch.device("cuda", index)
    if accelerator == "mps" and torch.backends.mps.is_available():
        return torch.device("mps")
    if accelerator == "auto":
        return torch.device("cpu")
    raise ConfigError(f"accelerator {accelerator!r}: evaluation supports auto, cpu, gpu/cuda and mps")


def enable_tf32(device: torch.device) -> None:
    """TF32 matmuls and convolutions on CUDA (Ampere and later): the float32
    speed-up Lightning recommends; results stay within float32 training noise."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast_for(device: torch.device, precision: str | int | None):
    """The autocast context matching a Lightning ``precision`` setting (a no-op for 32-bit)."""
    text = str(precision or "32-true")
    device = torch.device(device)
    if text.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if text in ("16", "16-mixed") and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


# on CPU, after this many bytes of input batches, freed C heap memory is handed
# back to the OS (on a GPU the forward pass does not use the C heap: no trim)
TRIM_EVERY_BYTES = 256 * 2**20


class _TransformCollate:
    """Collate ``(image, label)`` pairs, transforming PIL images and passing
    tensors (already transformed, e.g. from ``cache_tensors``) through. Runs
    in the DataLoader workers, so decoding and transforms happen there."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, batch):
        images = [img if isinstance(img, torch.Tensor) else self.transform(img) for img, _ in batch]
        labels = torch.as_tensor([int(label) for _, label in batch], dtype=torch.long)
        return torch.stack(images), labels


@torch.inference_mode()
def predict_logits(
    model: TaskModel,
    encoder_state: Mapping[str, torch.Tensor] | None,
    head: nn.Module,
    dataset,
    batch_size: int = 256,
    *,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    transform: Callable | None = None,
    precision: str | int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, C], labels [N]) on CPU, in dataset order."""
    if len(dataset) == 0:
        raise DataError("cannot evaluate on an empty dataset")
    device = torch.device(device) if device is not None else model.device
    encoder = model.encoder
    params = None
    if encoder_state is not None:
        check_state_dict_fits(encoder.state_dict(), encoder_state, strict=True, what=f"{model.name} encoder")
        params = {k: v.to(device) for k, v in encoder_state.items()}
    if device != model.device:
        model.to(device)
    head = head.to(device)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=_TransformCollate(transform or model.preprocess(train=False)),
    )
    was_training, head_training = encoder.training, head.training
    encoder.eval()
    head.eval()
    all_logits, all_labels = [], []
    since_trim, trim = 0, device.type == "cpu"
    try:
        for images, labels in loader:
            since_trim += images.numel() * images.element_size()
            images = images.to(device, non_blocking=True)
            with autocast_for(device, precision):
                features = torch.func.functional_call(encoder, params, (images,)) if params is not None else encoder(images)
                logits = head(features)
            all_logits.append(logits.float().cpu())
            all_labels.append(labels)
            if trim and since_trim >= TRIM_EVERY_BYTES:
                del images, features, logits
                release_freed_heap()
                since_trim = 0
    finally:
        encoder.train(was_training)
        head.train(head_training)
    return torch.cat(all_logits), torch.cat(all_labels)


def evaluate(
    model: TaskModel,
    encoder_state: Mapping[str, torch.Tensor] | None,
    head: nn.Module,
    dataset,
    batch_size: int = 256,
    *,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    transform: Callable | None = None,
    precision: str | int | None = None,
) -> float:
    """Top-1 accuracy in [0, 1] of ``head(encoder(x))`` with the encoder's
    weights replaced by ``encoder_state`` (``None``: the model's own).
    Images that are PIL go through ``transform`` (default: the model's
    evaluation preprocessing); tensors are used as they are. ``device``
    (default: where the model is) moves the model there and leaves it there.
    For repeated evaluation on one split, pass
    ``cl_merge.data.cache_tensors(split, model.preprocess(False))``."""
    logits, labels = predict_logits(
        model, encoder_state, head, dataset, batch_size, device=device, num_workers=num_workers, transform=transform,
        precision=precision,
    )
    return float((logits.argmax(dim=-1) == labels).float().mean())
