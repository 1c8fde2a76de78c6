"""Make ``import torchvision`` work next to a CPU-only torch.

Why this exists: torchvision 0.28.0 is the only release built for torch 2.13,
and PyPI ships it compiled against CUDA only. Its ``_C.so`` links against
``libtorch_cuda.so``, which a CPU torch does not have, so loading it fails and
torchvision's import then dies on ``torch.library.register_fake("torchvision::nms")``
with ``RuntimeError: operator torchvision::nms does not exist``. timm,
open_clip and Lightning import torchvision, so they die with it.

What it does, once, before torchvision is first imported:
1. if torchvision is already imported, or its compiled ops load, do nothing;
2. otherwise define the two operator schemas torchvision registers fake
   kernels for at import time (``nms`` and ``qnms``) and give ``nms`` a small
   pure-PyTorch CPU kernel, so ``torch.ops.torchvision.nms`` has a kernel (``torchvision.ops.nms`` itself
still refuses, because it checks for the compiled library first).

Everything cl_merge uses from torchvision (transforms, datasets, models) then
works. Ops that need the compiled library (``roi_pool``, ``deform_conv2d``,
``torchvision.io.decode_image``) still do not; we decode images with PIL.
Where torchvision's own ops load (a CUDA machine, or a matching CPU build),
step 1 makes this module a no-op.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

_LIBRARY: torch.library.Library | None = None  # kept alive: dropping it unregisters the ops
_applied = False


def _nms_cpu(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression, the same contract as torchvision's kernel."""
    if dets.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=dets.device)
    x1, y1, x2, y2 = dets.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    order = scores.argsort(descending=True)
    suppressed = torch.zeros(dets.shape[0], dtype=torch.bool)
    keep = []
    for idx in order.tolist():
        if suppressed[idx]:
            continue
        keep.append(idx)
        xx1 = torch.maximum(x1[idx], x1)
        yy1 = torch.maximum(y1[idx], y1)
        xx2 = torch.minimum(x2[idx], x2)
        yy2 = torch.minimum(y2[idx], y2)
        inter = (xx2 - xx1).clamp(min=0) * (yy2 - yy1).clamp(min=0)
        iou = inter / (areas[idx] + areas - inter)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.long, device=dets.device)


def _torchvision_ops_load() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # torchvision not installed: nothing to patch
    for folder in spec.submodule_search_locations:
        lib = os.path.join(folder, "_C.so")
        if os.path.exists(lib):
            try:
                torch.ops.load_library(lib)
                return True
            except (OSError, RuntimeError):
                return False
    return False


def ensure_torchvision_importable() -> None:
    """Idempotent: patch the missing operator schemas if, and only if, needed."""
    global _LIBRARY, _applied
    if _applied or "torchvision" in sys.modules:
        _applied = True
        return
    _applied = True
    if _torchvision_ops_load():
        return
    try:
        torch.ops.torchvision.nms  # noqa: B018 - already defined by someone else
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define(
        "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
    )
    lib.impl("nms", _nms_cpu, "CPU")
    _LIBRARY = lib


ensure_torchvision_importable()
