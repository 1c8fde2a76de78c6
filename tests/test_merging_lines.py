"""LiNeS: λ(ℓ) = alpha + beta·ℓ/(L−1) on the merged task vector."""

from __future__ import annotations

import pytest
import torch

import cl_merge
from cl_merge import merge
from cl_merge.errors import HyperparameterError, MergeInputError, UnknownNameError
from cl_merge.merging import incremental_merger


def T(values):
    return torch.tensor(values, dtype=torch.float32)


@pytest.fixture
def vit():
    """open_clip-style keys: an embedding, 3 residual blocks, a final LN; and an int buffer."""
    pre = {
        "visual.class_embedding": T([0.0, 0.0]),
        "visual.transformer.resblocks.0.attn.w": T([1.0, 1.0]),
        "visual.transformer.resblocks.1.attn.w": T([1.0, 1.0]),
        "visual.transformer.resblocks.2.attn.w": T([1.0, 1.0]),
        "visual.ln_post.weight": T([1.0, 1.0]),
        "visual.count": torch.tensor(3),
    }
    # τ_a = [1, 2] and τ_b = [3, -2] on every float entry → Σ τ = [4, 0]
    ft_a = {k: (v + T([1.0, 2.0]) if v.is_floating_point() else v) for k, v in pre.items()}
    ft_b = {k: (v + T([3.0, -2.0]) if v.is_floating_point() else v) for k, v in pre.items()}
    return pre, ft_a, ft_b


def test_task_arithmetic_base_hand_computed(vit):
    pre, ft_a, ft_b = vit
    out = merge(pre, [ft_a, ft_b], "lines", beta=0.5)
    # alpha = 1/T = 0.5; L = 3: λ = 0.5, 0.75, 1.0 for blocks 0,1,2; outside blocks 0.5
    assert torch.equal(out["visual.class_embedding"], T([2.0, 0.0]))  # 0 + 0.5·[4,0]
    assert torch.equal(out["visual.transformer.resblocks.0.attn.w"], T([3.0, 1.0]))  # 1 + 0.5·4
    assert torch.equal(out["visual.transformer.resblocks.1.attn.w"], T([4.0, 1.0]))  # 1 + 0.75·4
    assert torch.equal(out["visual.transformer.resblocks.2.attn.w"], T([5.0, 1.0]))  # 1 + 1.0·4
    assert torch.equal(out["visual.ln_post.weight"], T([3.0, 1.0]))  # outside blocks: alpha
    assert int(out["visual.count"]) == 3


def test_explicit_alpha_and_num_layers(vit):
    pre, ft_a, ft_b = vit
    out = merge(pre, [ft_a, ft_b], "lines", alpha=0.25, beta=1.0, num_layers=5)
    # L = 5: λ(2) = 0.25 + 1.0·2/4 = 0.75 → 1 + 0.75·4 = 4
    assert torch.equal(out["visual.transformer.resblocks.2.attn.w"], T([4.0, 1.0]))
    assert torch.equal(out["visual.class_embedding"], T([1.0, 0.0]))  # 0.25·4


def test_beta_zero_is_task_arithmetic_with_alpha(vit):
    pre, ft_a, ft_b = vit
    lines = merge(pre, [ft_a, ft_b], "lines", alpha=0.3, beta=0.0)
    ta = merge(pre, [ft_a, ft_b], "task_arithmetic", scaling=0.3)
    assert all(torch.equal(lines[k], ta[k]) for k in ta)


def test_average_base_alpha_rule(vit):
    pre, ft_a, ft_b = vit
    out = merge(pre, [ft_a, ft_b], "lines", base_method="average", beta=1.0)
    # τ_merged = mean τ = [2, 0]; alpha = (‖Σ‖₁/‖mean‖₁)/T = 2/2 = 1; block 2: λ = 2 → 1 + 2·2 = 5
    assert torch.equal(out["visual.transformer.resblocks.2.attn.w"], T([5.0, 1.0]))
    assert torch.equal(out["visual.class_embedding"], T([2.0, 0.0]))


def test_generic_base_uses_norm_ratio_alpha(vit):
    """A base method other than a sum: alpha = (‖Σ τ‖₁ / ‖τ_merged‖₁) / T, from one extra pass."""
    pre, ft_a, ft_b = vit
    name = "magmax" if "magmax" in cl_merge.available_methods() else None
    if name is None:
        pytest.skip("magmax not registered")
    base = merge(pre, [ft_a, ft_b], name, scaling=1.0)  # LiNeS takes the unscaled merge
    tau = {k: base[k] - pre[k] for k in pre if pre[k].is_floating_point()}
    norm_sum = 5 * 4.0  # Σ τ = [4, 0] on 5 entries
    norm_merged = sum(float(t.abs().sum()) for t in tau.values())
    alpha = norm_sum / norm_merged / 2
    out = merge(pre, [ft_a, ft_b], "lines", base_method=name, beta=0.5)
    for key, depth in (("visual.class_embedding", None), ("visual.transformer.resblocks.2.attn.w", 2)):
        scale = alpha + (0.5 * depth / 2 if depth is not None else 0.0)
        assert torch.allclose(out[key], pre[key] + scale * tau[key], atol=1e-6)


def test_incremental_equals_batch(vit):
    pre, ft_a, ft_b = vit
    ft_c = {k: (v + T([-1.0, 0.5]) if v.is_floating_point() else v) for k, v in pre.items()}
    for base in ("task_arithmetic", "average"):
        inc = incremental_merger(pre, "lines", base_method=base, beta=0.7)
        for ft in (ft_a, ft_b, ft_c):
            inc.update_finetuned(ft)
        batch = merge(pre, [ft_a, ft_b, ft_c], "lines", base_method=base, beta=0.7)
        current = inc.current()
        assert all(torch.allclose(current[k].float(), batch[k].float(), atol=1e-6) for k in batch), base


def test_bf16_round_trip(vit):
    pre, ft_a, ft_b = vit
    low = [{k: (v.bfloat16() if v.is_floating_point() else v) for k, v in sd.items()} for sd in (pre, ft_a, ft_b)]
    out = merge(low[0], low[1:], "lines", beta=0.5)
    assert out["visual.transformer.resblocks.1.attn.w"].dtype == torch.bfloat16
    assert torch.equal(out["visual.transformer.resblocks.1.attn.w"].float(), T([4.0, 1.0]))


def test_timm_keys_and_custom_pattern():
    pre = {"blocks.0.w": T([0.0]), "blocks.1.w": T([0.0]), "head.w": T([0.0])}
    ft = {k: v + 1.0 for k, v in pre.items()}
    out = merge(pre, [ft], "lines", alpha=0.0, beta=1.0)
    assert torch.equal(out["blocks.1.w"], T([1.0])) and torch.equal(out["blocks.0.w"], T([0.0]))
    custom = {"stage_0.w": T([0.0]), "stage_1.w": T([0.0])}
    out = merge(custom, [{k: v + 1.0 for k, v in custom.items()}], "lines", alpha=0.0, beta=1.0,
                layer_pattern=r"stage_(\d+)\.")
    assert torch.equal(out["stage_1.w"], T([1.0]))


def test_no_layer_found_is_named():
    pre = {"fc.weight": T([0.0])}
    with pytest.raises(MergeInputError, match="layer_pattern.*'fc.weight'"):
        merge(pre, [{"fc.weight": T([1.0])}], "lines")


def test_validation_errors():
    with pytest.raises(HyperparameterError, match="lines: alpha must be >= 0"):
        cl_merge.get_method("lines", alpha=-0.1)
    with pytest.raises(HyperparameterError, match="capture group"):
        cl_merge.get_method("lines", layer_pattern=r"blocks\.\d+")
    with pytest.raises(HyperparameterError, match="invalid layer_pattern"):
        cl_merge.get_method("lines", layer_pattern="(")
    with pytest.raises(HyperparameterError, match="'scaling'"):
        cl_merge.get_method("lines", base_hparams={"scaling": 0.3})
    with pytest.raises(HyperparameterError, match="num_layers"):
        cl_merge.get_method("lines", num_layers=0)
    with pytest.raises(UnknownNameError, match="task_arithmetic"):
        cl_merge.get_method("lines", base_method="nope")
    with pytest.raises(HyperparameterError, match="lines itself"):
        cl_merge.get_method("lines", base_method="lines")
