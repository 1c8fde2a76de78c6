"""Models: CLIP (open_clip or Hugging Face transformers) and ViT (timm) behind
one ``TaskModel`` interface.

>>> from cl_merge.models import create_model
>>> model = create_model("clip", "clmerge-tiny-clip")          # offline, random init
>>> head = model.make_head(["cat", "dog"], ["a photo of a {}."])
>>> logits = model.forward(images, head)
>>> theta0 = model.encoder_state_dict()                           # what task vectors are made of

open_clip and timm are imported on first use of a family, so importing this
package stays cheap.
"""

from cl_merge.models.base import (
    MODEL_FAMILIES,
    ModelConfig,
    TaskModel,
    build_model,
    check_state_dict_fits,
    create_model,
    register_family,
)
from cl_merge.models.heads import HeadCache, ZeroShotHead, concat_heads, head_from_state_dict

_LAZY = {
    "create_clip": "cl_merge.models.clip",
    "ClipModel": "cl_merge.models.clip",
    "create_hf_clip": "cl_merge.models.hf_clip",
    "HFClipModel": "cl_merge.models.hf_clip",
    "detect_layout": "cl_merge.models.clip_layouts",
    "convert_layout": "cl_merge.models.clip_layouts",
    "create_vit": "cl_merge.models.vit",
    "VitModel": "cl_merge.models.vit",
    "VIT_PRESETS": "cl_merge.models.vit",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # replaces the submodule attribute of the same name (lit.finetune)
        return value
    raise AttributeError(f"module 'cl_merge.models' has no attribute {name!r}")


__all__ = [
    "MODEL_FAMILIES",
    "ModelConfig",
    "TaskModel",
    "build_model",
    "check_state_dict_fits",
    "create_model",
    "register_family",
    "HeadCache",
    "ZeroShotHead",
    "concat_heads",
    "head_from_state_dict",
    *_LAZY,
]
