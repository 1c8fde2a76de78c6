"""Per-task boolean masks stored one bit per task per entry (TALL masks, EMR).

T masks of one entry are packed along the task axis into ceil(T/8) bytes
per element, so 8 tasks of a ViT-B/32 cost 88 MB instead of 700 MB of bools.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def pack_masks(masks: list[Tensor]) -> Tensor:
    """Bool tensors of one shape -> uint8 tensor [ceil(T/8), *shape]."""
    shape = masks[0].shape
    packed = torch.zeros((len(masks) + 7) // 8, *shape, dtype=torch.uint8, device=masks[0].device)
    for t, mask in enumerate(masks):
        packed[t // 8] |= mask.to(torch.uint8) << (t % 8)
    return packed


def unpack_mask(packed: Tensor, task: int) -> Tensor:
    """The bool mask of ``task`` from ``pack_masks``' output."""
    return ((packed[task // 8] >> (task % 8)) & 1).bool()

