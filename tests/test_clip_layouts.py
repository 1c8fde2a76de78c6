"""Key-layout conversion between open_clip and Hugging Face CLIP: a tiny
open_clip model converted to HF layout, loaded by ``transformers``, computes
the same image and text features, and back; layout detection and the error
that names a foreign layout."""

from __future__ import annotations

import pytest
import torch

import cl_merge  # noqa: F401  (torchvision compat before open_clip / transformers)
from cl_merge.errors import CheckpointError
from cl_merge.models.base import check_state_dict_fits
from cl_merge.models.clip_layouts import (
    adapt_to_reference,
    convert_layout,
    detect_layout,
    hf_to_open_clip,
    open_clip_to_hf,
)

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

EMBED, WIDTH, HEADS, LAYERS, IMAGE, PATCH = 16, 32, 2, 2, 32, 8
CONTEXT, VOCAB = 8, 100


def tiny_open_clip(seed: int = 0):
    torch.manual_seed(seed)
    model = open_clip.CLIP(
        EMBED,
        vision_cfg={"image_size": IMAGE, "layers": LAYERS, "width": WIDTH, "head_width": WIDTH // HEADS,
                    "patch_size": PATCH},
        text_cfg={"context_length": CONTEXT, "vocab_size": VOCAB, "width": WIDTH, "heads": HEADS, "layers": LAYERS},
        quick_gelu=True,
    )
    with torch.no_grad():  # open_clip zero-initialises nothing that matters, but make every tensor distinctive
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def tiny_hf_config():
    common = {"hidden_size": WIDTH, "intermediate_size": 4 * WIDTH, "num_hidden_layers": LAYERS,
              "num_attention_heads": HEADS, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    return transformers.CLIPConfig(
        vision_config={**common, "image_size": IMAGE, "patch_size": PATCH},
        text_config={**common, "vocab_size": VOCAB, "max_position_embeddings": CONTEXT,
                     "bos_token_id": VOCAB - 2, "eos_token_id": VOCAB - 1, "pad_token_id": 0},
        projection_dim=EMBED,
    )


def features(output):
    """transformers 5 returns a model output from get_*_features, 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, IMAGE, IMAGE, generator=g)
    tokens = torch.zeros(3, CONTEXT, dtype=torch.long)
    for row, length in enumerate((3, 5, 8)):  # start token, words, end token (the highest id), padding 0
        tokens[row, 0] = VOCAB - 2
        tokens[row, 1:length - 1] = torch.randint(1, VOCAB - 2, (length - 2,), generator=g)
        tokens[row, length - 1] = VOCAB - 1
    return images, tokens


@torch.no_grad()
def test_open_clip_to_hf_and_back_gives_the_same_features():
    oc = tiny_open_clip()
    state = oc.state_dict()
    assert detect_layout(state) == "open_clip"
    hf_state = open_clip_to_hf(state)
    assert detect_layout(hf_state) == "hf_clip"
    hf = transformers.CLIPModel(tiny_hf_config()).eval()
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    assert not unexpected and set(missing) <= {"vision_model.embeddings.position_ids", "text_model.embeddings.position_ids"}
    images, tokens = inputs()
    assert torch.allclose(features(hf.get_image_features(pixel_values=images)), oc.encode_image(images), atol=1e-5)
    assert torch.allclose(features(hf.get_text_features(input_ids=tokens)), oc.encode_text(tokens), atol=1e-5)
    assert torch.equal(hf.logit_scale, oc.logit_scale)
    # and back: the exact tensors open_clip started with
    back = hf_to_open_clip(hf.state_dict())
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


@torch.no_grad()
def test_hf_to_open_clip_gives_the_same_features():
    torch.manual_seed(3)
    hf = transformers.CLIPModel(tiny_hf_config()).eval()
    oc = tiny_open_clip(seed=5)
    oc.load_state_dict(hf_to_open_clip(hf.state_dict()))
    images, tokens = inputs(seed=2)
    assert torch.allclose(oc.encode_image(images), features(hf.get_image_features(pixel_values=images)), atol=1e-5)
    assert torch.allclose(oc.encode_text(tokens), features(hf.get_text_features(input_ids=tokens)), atol=1e-5)


def test_detect_layout_names_each_layout():
    oc = tiny_open_clip().state_dict()
    visual = {k[len("visual."):]: v for k, v in oc.items() if k.startswith("visual.")}
    assert detect_layout(visual) == "open_clip_visual"
    assert detect_layout({f"model.{k}": v for k, v in oc.items()}) == "task_vectors_image_encoder"
    assert detect_layout({f"module.{k}": v for k, v in visual.items()}) == "open_clip_visual"
    hf = open_clip_to_hf(oc)
    vision_only = {k: v for k, v in hf.items() if k.startswith("vision_model.")}
    assert detect_layout(vision_only) == "hf_clip_vision"
    # transformers 5 saves a CLIPVisionModel without the vision_model. prefix
    assert detect_layout({k[len("vision_model."):]: v for k, v in vision_only.items()}) == "hf_clip_vision"
    assert detect_layout({"patch_embed.proj.weight": 0, "cls_token": 0, "blocks.0.attn.qkv.weight": 0}) == "timm"
    assert detect_layout({"weight": 0, "bias": 0}) == "unknown"


def test_vision_only_checkpoint_takes_the_reference_projection():
    oc = tiny_open_clip().state_dict()
    hf = open_clip_to_hf(oc)
    encoder_ref = {k: v for k, v in hf.items() if k.startswith("vision_model.") or k == "visual_projection.weight"}
    vision_only = {k[len("vision_model."):]: v + 1 for k, v in hf.items() if k.startswith("vision_model.")}
    adapted = adapt_to_reference(vision_only, encoder_ref)
    assert set(adapted) == set(encoder_ref)
    assert torch.equal(adapted["visual_projection.weight"], encoder_ref["visual_projection.weight"])
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(adapted[key], encoder_ref[key] + 1)
    # the same vision tower into an open_clip image encoder: renamed, projection from the reference
    oc_ref = {k[len("visual."):]: v for k, v in oc.items() if k.startswith("visual.")}
    adapted = adapt_to_reference(vision_only, oc_ref)
    assert set(adapted) == set(oc_ref) and torch.equal(adapted["proj"], oc_ref["proj"])
    assert torch.equal(adapted["transformer.resblocks.1.attn.in_proj_weight"],
                       oc_ref["transformer.resblocks.1.attn.in_proj_weight"] + 1)


def test_foreign_layout_error_names_it_and_the_command():
    oc = tiny_open_clip().state_dict()
    encoder_ref = {k[len("visual."):]: v for k, v in oc.items() if k.startswith("visual.")}
    hf = open_clip_to_hf(oc)
    with pytest.raises(CheckpointError, match=r"looks like a hf_clip checkpoint.*"
                                              r"`cl-merge convert ft\.safetensors converted\.safetensors --to open_clip`"):
        check_state_dict_fits(encoder_ref, hf, what="checkpoint ft.safetensors", source="ft.safetensors")
    # the image tower alone (keys whose tails match the reference's) is named by its layout too
    tower = {k: v for k, v in hf.items() if k.startswith("vision_model.") or k == "visual_projection.weight"}
    with pytest.raises(CheckpointError, match="looks like a hf_clip checkpoint"):
        check_state_dict_fits(encoder_ref, tower)
    timm_like = {"patch_embed.proj.weight": torch.zeros(1), "cls_token": torch.zeros(1), "blocks.0.norm1.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="looks like a timm checkpoint.*do not convert"):
        check_state_dict_fits(encoder_ref, timm_like)


def test_convert_refuses_keys_outside_the_shared_layout():
    oc = tiny_open_clip().state_dict()
    oc["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(WIDTH)  # layer scale: no HF counterpart
    with pytest.raises(CheckpointError, match="ls_1.gamma"):
        convert_layout(oc, "hf_clip")
    with pytest.raises(CheckpointError, match="layout 'timm'"):
        convert_layout({"patch_embed.proj.weight": torch.zeros(1), "cls_token": torch.zeros(1)}, "open_clip")


def test_open_clip_model_loads_weights_saved_in_hf_layout(tmp_path):
    from cl_merge.core.io import save_state_dict
    from cl_merge.models import create_model

    source = create_model("clip", "clmerge-tiny-clip", init_seed=3, head_cache_dir=None)
    expected = source.clip.state_dict()
    path = save_state_dict(open_clip_to_hf(expected), tmp_path / "hf_layout.safetensors")
    loaded = create_model("clip", "clmerge-tiny-clip", str(path), init_seed=0, head_cache_dir=None)
    state = loaded.clip.state_dict()
    assert set(state) == set(expected) and all(torch.equal(state[k], expected[k]) for k in expected)
