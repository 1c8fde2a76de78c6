"""SLERP: spherical interpolation between two fine-tuned models."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cl_merge.errors import HyperparameterError
from cl_merge.merging.base import MergeMethod, require
from cl_merge.merging.registry import register

Tensor = torch.Tensor

# above this |cos| the two tensors are treated as colinear: sin Ω ≈ 0 makes the
# spherical weights ill-conditioned, and the arc and the chord coincide
COLINEAR_COS = 0.9995


def slerp_tensor(a: Tensor, b: Tensor, t: float) -> Tensor:
    """sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b, Ω the angle between a and b
    (flattened); linear interpolation when they are (anti)colinear or zero."""
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 or nb == 0:
        return torch.lerp(a, b, t)
    # clamp: rounding can push |cos| past 1 and arccos would give NaN
    cos = max(-1.0, min(1.0, float(torch.dot(a.reshape(-1), b.reshape(-1))) / (na * nb)))
    if abs(cos) > COLINEAR_COS:
        return torch.lerp(a, b, t)
    omega = math.acos(cos)
    sin_omega = math.sin(omega)
    return (math.sin((1 - t) * omega) / sin_omega) * a + (math.sin(t * omega) / sin_omega) * b


@register
@dataclass
class Slerp(MergeMethod):
    """SLERP of the weights of exactly two fine-tuned models (t=0: first, t=1: second).

    Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985,
    as used for model merging by mergekit and FusionBench. Per tensor, the
    *weights* are interpolated along the great circle through them (mergekit
    and FusionBench both interpolate weights, not task vectors; θ0 is not
    used). The cosine is clamped to [-1, 1] as in mergekit (FusionBench does
    not clamp: rounding can then give NaN), and nearly colinear tensors
    (|cos| > 0.9995) fall back to linear interpolation, as both do.

    Not incremental: it is defined for two models only.
    """

    name = "slerp"
    reference = "https://dl.acm.org/doi/10.1145/325165.325242"
    uses_weights = True
    min_models = 2
    max_models = 2

    t: float = 0.5

    def validate(self) -> None:
        require(0 <= self.t <= 1,
                f"{self.name}: t must be in [0, 1], got {self.t!r}")

    def check_num_models(self, n: int) -> None:
        if n != 2:
            raise HyperparameterError(
                f"slerp interpolates exactly 2 fine-tuned models (t=0 gives the first, t=1 the second), got {n}")

    def merge_tensor(self, key, base, weights, context):
        return slerp_tensor(weights[0], weights[1], self.t)
