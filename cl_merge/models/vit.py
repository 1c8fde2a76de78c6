"""timm backbones (any timm model name) with per-task linear heads.

The backbone is created with ``num_classes=0`` so ``encoder(images)`` returns
pooled features and its state dict holds no classifier; each task gets its
own ``nn.Linear`` head, trained during fine-tuning and kept outside the
encoder.

Toolkit presets (``VIT_PRESETS``) are timm architectures with overridden
sizes that fit a CPU: ``clmerge-tiny-vit`` is a ViT at 32 px, patch 4,
width 96, depth 4, 3 heads (0.46M parameters), mean-pooled tokens (a
randomly initialised class token barely depends on the image, so from
scratch it learns far more slowly than the average of the patch tokens).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import cl_merge._torchvision_compat  # noqa: F401  (before timm imports torchvision)
import timm
import timm.data
import torch
from torch import nn

from cl_merge.errors import CheckpointError, HyperparameterError, UnknownNameError, close_matches
from cl_merge.models.base import TaskModel, register_family, seeded_init

# name -> (timm architecture, overrides); random init only
VIT_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "clmerge-tiny-vit": (
        "vit_tiny_patch16_224",
        {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3, "global_pool": "avg"},
    ),
    "clmerge-small-vit": (
        "vit_small_patch16_224",
        {"img_size": 64, "patch_size": 8, "embed_dim": 192, "depth": 6, "num_heads": 3, "global_pool": "avg"},
    ),
}


class VitModel(TaskModel):
    """A timm backbone plus trained linear heads."""

    family = "vit"
    head_trainable = True
    block_prefixes = ("blocks", "stages", "layers")
    post_block_prefixes = ("norm", "fc_norm", "attn_pool", "head", "head_drop", "final_conv", "conv_head", "bn2")

    def __init__(self, backbone: nn.Module, *, name: str, pretrained: bool, data_config: dict, init_seed: int = 0):
        self.encoder = backbone
        self.name = name
        self.pretrained = pretrained
        self.init_seed = init_seed
        self.data_config = data_config
        self.feature_dim = int(backbone.num_features)

    def make_head(self, classnames: Sequence[str], templates: Sequence[str] | None = None, *, seed: int = 0) -> nn.Linear:
        """A new linear head (truncated normal, std 0.02, zero bias) drawn from
        its own generator, so the same seed gives the same head.
        ``templates`` are ignored (they exist for CLIP's zero-shot heads)."""
        if len(classnames) < 1:
            raise HyperparameterError("a head needs at least one class")
        head = nn.Linear(self.feature_dim, len(classnames))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            nn.init.trunc_normal_(head.weight, std=0.02, a=-0.04, b=0.04, generator=generator)
            head.bias.zero_()
        return head.to(self.device)

    def preprocess(self, train: bool = False) -> Callable:
        return timm.data.create_transform(**self.data_config, is_training=bool(train))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "init_seed": self.init_seed, "input_size": list(self.data_config["input_size"])}


def available_vit_models() -> list[str]:
    return sorted(VIT_PRESETS) + timm.list_models()


@register_family("vit")
def create_vit(
    name: str,
    pretrained: bool | str | None = False,
    img_size: int | None = None,
    *,
    device: str | torch.device = "cpu",
    init_seed: int = 0,
    **timm_kwargs: Any,
) -> VitModel:
    """Create a timm backbone without classifier. ``pretrained`` goes to
    ``timm.create_model`` as is (``True``, or a tag string treated as True
    with ``name.tag``); ``timm_kwargs`` override architecture arguments."""
    arch, kwargs = name, dict(timm_kwargs)
    if name in VIT_PRESETS:
        arch, preset = VIT_PRESETS[name]
        kwargs = {**preset, **kwargs}
        if pretrained:
            raise HyperparameterError(f"{name!r} is a toolkit preset with random init only; set pretrained: false")
    elif isinstance(pretrained, str) and pretrained:
        arch, pretrained = f"{name}.{pretrained}", True  # timm's "model.tag" form
    if not timm.is_model(arch.split(".")[0]):
        raise UnknownNameError(
            f"unknown timm model {name!r}{close_matches(name, available_vit_models())} (see timm.list_models())"
        )
    if img_size is not None:
        kwargs["img_size"] = img_size
    kwargs.setdefault("num_classes", 0)
    try:
        with seeded_init(init_seed):
            backbone = timm.create_model(arch, pretrained=bool(pretrained), **kwargs)
    except (OSError, RuntimeError) as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        if pretrained:
            from cl_merge.models.clip import _offline_reason

            raise CheckpointError(
                f"could not download pretrained weights for timm model {arch!r}: {_offline_reason()}; "
                f"run once with network access [{type(exc).__name__}: {first}]"
            ) from None
        raise CheckpointError(f"could not create timm model {arch!r}: {first}") from None
    if backbone.num_features <= 0 or getattr(backbone, "num_classes", 0) != 0:
        raise HyperparameterError(f"timm model {arch!r} did not build as a feature extractor (num_classes=0)")
    backbone.to(device)
    data_config = timm.data.resolve_model_data_config(backbone)
    size = getattr(getattr(backbone, "patch_embed", None), "img_size", None) or kwargs.get("img_size")
    if size is not None:
        size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        data_config["input_size"] = (3, *size)
    return VitModel(backbone, name=name, pretrained=bool(pretrained), data_config=data_config, init_seed=init_seed)
