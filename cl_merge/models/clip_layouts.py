"""Key layouts of CLIP checkpoints, and conversion between open_clip's and
Hugging Face ``transformers``' (pure tensor code: nothing here imports
open_clip or transformers).

The two libraries hold the same ViT-CLIP under different names:

==============================================  =====================================================
open_clip (``CLIP``)                             transformers (``CLIPModel``)
==============================================  =====================================================
``visual.conv1.weight``                          ``vision_model.embeddings.patch_embedding.weight``
``visual.class_embedding``                       ``vision_model.embeddings.class_embedding``
``visual.positional_embedding``                  ``vision_model.embeddings.position_embedding.weight``
``visual.ln_pre`` / ``visual.ln_post``           ``vision_model.pre_layrnorm`` / ``.post_layernorm``
``….resblocks.{i}.ln_1`` / ``ln_2``              ``….layers.{i}.layer_norm1`` / ``layer_norm2``
``….resblocks.{i}.attn.in_proj_weight`` [3W,W]   ``….layers.{i}.self_attn.{q,k,v}_proj.weight`` [W,W]
``….resblocks.{i}.attn.out_proj``                ``….layers.{i}.self_attn.out_proj``
``….resblocks.{i}.mlp.c_fc`` / ``c_proj``        ``….layers.{i}.mlp.fc1`` / ``fc2``
``visual.proj`` [W,E] (``x @ proj``)             ``visual_projection.weight`` [E,W] (transposed)
``token_embedding.weight``                       ``text_model.embeddings.token_embedding.weight``
``positional_embedding``                         ``text_model.embeddings.position_embedding.weight``
``ln_final``                                     ``text_model.final_layer_norm``
``text_projection`` [W,E]                        ``text_projection.weight`` [E,W] (transposed)
``logit_scale``                                  ``logit_scale``
==============================================  =====================================================

``nn.MultiheadAttention`` packs q, k, v row-wise in that order, and both
libraries split heads the same way inside each projection, so the conversion
is exact (no head count needed). The models then compute the same features
when their activations agree (QuickGELU for OpenAI weights, ``hidden_act:
quick_gelu`` in HF configs).

Layouts :func:`detect_layout` recognises:
``open_clip`` (whole open_clip model), ``open_clip_visual`` (its image tower,
no prefix: the ``clip`` family's encoder), ``hf_clip`` (``CLIPModel``, or its
vision tower with ``visual_projection``: the ``hf_clip`` family's encoder),
``hf_clip_vision`` (``CLIPVisionModel``: vision tower without projection, as
FusionBench's fine-tuned checkpoints), ``task_vectors_image_encoder``
(task-vectors' pickled ``ImageEncoder``: an open_clip model under ``model.``),
``timm`` (a timm ViT), and ``unknown``.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from cl_merge.errors import CheckpointError

Tensor = torch.Tensor

LAYOUTS = ("open_clip", "open_clip_visual", "hf_clip", "hf_clip_vision", "task_vectors_image_encoder", "timm", "unknown")
TARGETS = ("open_clip", "hf_clip")  # what `cl-merge convert --to` writes

# the layout each `--to` target is written in, and the one a checkpoint is converted through
_FAMILY_OF = {
    "open_clip": "open_clip", "open_clip_visual": "open_clip", "task_vectors_image_encoder": "open_clip",
    "hf_clip": "hf_clip", "hf_clip_vision": "hf_clip",
}
# buffers one side stores and the other rebuilds (HF's position ids; open_clip's causal mask is not persistent)
_DROPPED = re.compile(r"^(vision_model|text_model)\.embeddings\.position_ids$|(^|\.)attn_mask$")

# ---------------------------------------------------------------------- detection
_WRAPPER_PREFIXES = ("module.", "state_dict.", "image_encoder.", "encoder.")


def detect_layout(keys) -> str:
    """Name the layout a set of state-dict keys is in (see the module docstring)."""
    keys = set(keys)
    if not keys:
        return "unknown"
    if "model.visual.conv1.weight" in keys or "model.visual.class_embedding" in keys:
        return "task_vectors_image_encoder"
    if "visual.conv1.weight" in keys or "visual.class_embedding" in keys:
        return "open_clip"
    if "conv1.weight" in keys and "class_embedding" in keys:
        return "open_clip_visual"
    if "token_embedding.weight" in keys and any(k.startswith("transformer.resblocks.") for k in keys):
        return "open_clip"  # text tower only
    hf_vision = "vision_model.embeddings.patch_embedding.weight" in keys
    if hf_vision or any(k.startswith("text_model.") for k in keys):
        if hf_vision and "visual_projection.weight" not in keys and not any(k.startswith("text_model.") for k in keys):
            return "hf_clip_vision"
        return "hf_clip"
    if "embeddings.patch_embedding.weight" in keys and "pre_layrnorm.weight" in keys:
        return "hf_clip_vision"  # transformers 5 saves CLIPVisionModel without the vision_model. prefix
    if "patch_embed.proj.weight" in keys and (any(k.startswith("blocks.") for k in keys) or "cls_token" in keys):
        return "timm"
    for prefix in _WRAPPER_PREFIXES:
        inner = {k[len(prefix):] for k in keys if k.startswith(prefix)}
        if inner and len(inner) == len(keys):
            return detect_layout(inner)
    return "unknown"


def _unwrap(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Strip wrapper prefixes (``module.`` from DataParallel, ...) that cover every key."""
    state = dict(state)
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if state and all(k.startswith(prefix) for k in state) and detect_layout(
                [k[len(prefix):] for k in state]
            ) != "unknown":
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


# ---------------------------------------------------------------------- per-block renames
_BLOCK_RENAMES = (  # open_clip suffix -> HF suffix inside one transformer block
    ("ln_1.weight", "layer_norm1.weight"), ("ln_1.bias", "layer_norm1.bias"),
    ("ln_2.weight", "layer_norm2.weight"), ("ln_2.bias", "layer_norm2.bias"),
    ("attn.out_proj.weight", "self_attn.out_proj.weight"), ("attn.out_proj.bias", "self_attn.out_proj.bias"),
    ("mlp.c_fc.weight", "mlp.fc1.weight"), ("mlp.c_fc.bias", "mlp.fc1.bias"),
    ("mlp.c_proj.weight", "mlp.fc2.weight"), ("mlp.c_proj.bias", "mlp.fc2.bias"),
)
_VISION_RENAMES = (  # open_clip (under visual.) -> HF (under vision_model.)
    ("conv1.weight", "embeddings.patch_embedding.weight"),
    ("class_embedding", "embeddings.class_embedding"),
    ("positional_embedding", "embeddings.position_embedding.weight"),
    ("ln_pre.weight", "pre_layrnorm.weight"), ("ln_pre.bias", "pre_layrnorm.bias"),
    ("ln_post.weight", "post_layernorm.weight"), ("ln_post.bias", "post_layernorm.bias"),
)
_TEXT_RENAMES = (  # open_clip (no prefix) -> HF (under text_model.)
    ("token_embedding.weight", "embeddings.token_embedding.weight"),
    ("positional_embedding", "embeddings.position_embedding.weight"),
    ("ln_final.weight", "final_layer_norm.weight"), ("ln_final.bias", "final_layer_norm.bias"),
)
_OC_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)$")


def _unsupported(key: str, source: str) -> CheckpointError:
    return CheckpointError(
        f"cannot convert {source} key {key!r}: not part of the ViT-CLIP layout both libraries share "
        "(only ViT image towers and the standard text tower convert)"
    )


def open_clip_to_hf(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An open_clip state dict (whole model, image tower only, or task-vectors'
    ``model.``-prefixed one) in ``CLIPModel`` key names. An image tower alone
    becomes ``vision_model.*`` + ``visual_projection.weight`` (the ``hf_clip``
    family's encoder)."""
    state = _unwrap(state)
    layout = detect_layout(state)
    if layout == "task_vectors_image_encoder":
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    elif layout == "open_clip_visual":
        state = {f"visual.{k}": v for k, v in state.items()}
    elif layout != "open_clip":
        raise CheckpointError(f"expected an open_clip state dict, got one in layout {layout!r}")
    vision = dict(_VISION_RENAMES)
    text = dict(_TEXT_RENAMES)
    blocks = dict(_BLOCK_RENAMES)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if _DROPPED.search(key):
            continue
        match = _OC_BLOCK.match(key)
        if match:
            tower = "vision_model" if match.group(1) else "text_model"
            base = f"{tower}.encoder.layers.{match.group(2)}."
            rest = match.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]
                for name, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                    out[f"{base}self_attn.{name}_proj.{kind}"] = chunk.clone()
            elif rest in blocks:
                out[base + blocks[rest]] = value
            else:
                raise _unsupported(key, "open_clip")
        elif key.startswith("visual."):
            rest = key[len("visual."):]
            if rest == "proj":
                out["visual_projection.weight"] = value.t().contiguous()
            elif rest in vision:
                out["vision_model." + vision[rest]] = value
            else:
                raise _unsupported(key, "open_clip")
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif key == "logit_scale":
            out["logit_scale"] = value
        elif key in text:
            out["text_model." + text[key]] = value
        else:
            raise _unsupported(key, "open_clip")
    return out


def hf_to_open_clip(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A ``CLIPModel`` / ``CLIPVisionModel`` state dict in open_clip key names
    (image tower under ``visual.``; a vision-only checkpoint has no ``visual.proj``)."""
    state = _unwrap(state)
    layout = detect_layout(state)
    if layout not in ("hf_clip", "hf_clip_vision"):
        raise CheckpointError(f"expected a Hugging Face CLIP state dict, got one in layout {layout!r}")
    if "vision_model.embeddings.patch_embedding.weight" not in state and "embeddings.patch_embedding.weight" in state:
        state = {f"vision_model.{k}": v for k, v in state.items()}
    vision = {hf: oc for oc, hf in _VISION_RENAMES}
    text = {hf: oc for oc, hf in _TEXT_RENAMES}
    blocks = {hf: oc for oc, hf in _BLOCK_RENAMES}
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        if _DROPPED.search(key):
            continue
        match = _HF_BLOCK.match(key)
        if match:
            base = ("visual." if match.group(1) == "vision_model" else "") + f"transformer.resblocks.{match.group(2)}."
            rest = match.group(3)
            attn = re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", rest)
            if attn:
                qkv.setdefault((base, attn.group(2)), {})[attn.group(1)] = value
            elif rest in blocks:
                out[base + blocks[rest]] = value
            else:
                raise _unsupported(key, "Hugging Face CLIP")
        elif key.startswith("vision_model."):
            rest = key[len("vision_model."):]
            if rest not in vision:
                raise _unsupported(key, "Hugging Face CLIP")
            out["visual." + vision[rest]] = value
        elif key.startswith("text_model."):
            rest = key[len("text_model."):]
            if rest not in text:
                raise _unsupported(key, "Hugging Face CLIP")
            out[text[rest]] = value
        elif key == "visual_projection.weight":
            out["visual.proj"] = value.t().contiguous()
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
        elif key == "logit_scale":
            out["logit_scale"] = value
        else:
            raise _unsupported(key, "Hugging Face CLIP")
    for (base, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{base}: attention has {sorted(parts)} projections, needs q, k and v")
        out[f"{base}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def convert_layout(state: Mapping[str, Tensor], to: str) -> dict[str, Tensor]:
    """``state`` in the ``to`` layout (``open_clip`` or ``hf_clip``): whole-model
    key names of that library (an image tower alone stays an image tower)."""
    if to not in TARGETS:
        raise CheckpointError(f"unknown target layout {to!r} (valid: {', '.join(TARGETS)})")
    source = detect_layout(state)
    family = _FAMILY_OF.get(source)
    if family is None:
        raise CheckpointError(
            f"cannot convert a checkpoint in layout {source!r} to {to!r} (convertible: open_clip and Hugging Face CLIP)"
        )
    if family == to:
        state = _unwrap(state)
        if source == "task_vectors_image_encoder":
            return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        if source == "open_clip_visual":
            return {f"visual.{k}": v for k, v in state.items()}
        if source == "hf_clip_vision" and "vision_model.embeddings.patch_embedding.weight" not in state:
            return {f"vision_model.{k}": v for k, v in state.items() if not _DROPPED.search(f"vision_model.{k}")}
        return {k: v for k, v in state.items() if not _DROPPED.search(k)}
    return open_clip_to_hf(state) if to == "hf_clip" else hf_to_open_clip(state)


# ---------------------------------------------------------------------- fitting a model's encoder
_PROJECTION_KEY = {"open_clip_visual": "proj", "hf_clip": "visual_projection.weight"}


def adapt_to_reference(state: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` renamed into the layout of ``reference`` (a model's encoder state
    dict) when the two are CLIP layouts that convert; else ``state`` unchanged
    (the caller's fit check then names the problem). A vision tower without
    projection (``hf_clip_vision``) gets the reference's projection, as
    FusionBench does with its vision-only checkpoints."""
    target = detect_layout(reference)
    source = detect_layout(state)
    if target not in _PROJECTION_KEY or _FAMILY_OF.get(source) is None:
        return dict(state)
    if set(reference) <= set(state) and set(state) <= set(reference):
        return dict(state)
    converted = convert_layout(state, _FAMILY_OF[target])
    if target == "open_clip_visual":
        converted = {k[len("visual."):]: v for k, v in converted.items() if k.startswith("visual.")}
    else:
        converted = {k: v for k, v in converted.items() if k.startswith("vision_model.") or k == "visual_projection.weight"}
    projection = _PROJECTION_KEY[target]
    if projection not in converted and projection in reference and source == "hf_clip_vision":
        converted[projection] = reference[projection].detach().clone()
    return converted


def layout_hint(reference: Mapping[str, Tensor], state: Mapping[str, Tensor], source: str | None = None) -> str:
    """`` (this looks like a <layout> checkpoint ...; convert it with ...)`` when
    ``state`` is recognisably in another layout than ``reference``, else ''."""
    have = detect_layout(state)
    want = detect_layout(reference)
    if have == "unknown" or want == "unknown" or have == want:
        return ""
    if _FAMILY_OF.get(have) is not None and _FAMILY_OF.get(have) == _FAMILY_OF.get(want):
        return ""  # the same library's names under another prefix: the prefix hint says which
    path = source or "CHECKPOINT"
    target = _FAMILY_OF.get(want)
    if target is not None and _FAMILY_OF.get(have) is not None:
        return (f" (this looks like a {have} checkpoint and the model expects {want}; convert it with "
                f"`cl-merge convert {path} converted.safetensors --to {target}`)")
    return f" (this looks like a {have} checkpoint and the model expects {want}; they do not convert into each other)"
