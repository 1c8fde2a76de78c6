"""QuickGELU where the weights need it: OpenAI-trained tags build the
QuickGELU variant (decided from open_clip's pretrained registry), with no
warning; other tags and local files keep the config's activation."""

from __future__ import annotations

import warnings

import pytest

import cl_merge  # noqa: F401
from cl_merge.models import create_model
from cl_merge.models.clip import needs_quick_gelu, uses_quick_gelu

open_clip = pytest.importorskip("open_clip")


@pytest.mark.parametrize("name, tag, expected", [
    ("ViT-B-32", "openai", True),
    ("ViT-B-16", "openai", True),
    ("ViT-L-14", "openai", True),
    ("ViT-B-32", "laion400m_e31", True),       # trained with QuickGELU too (registry says so)
    ("ViT-B-32", "laion2b_s34b_b79k", False),  # trained with GELU
    ("ViT-B-32-quickgelu", "openai", False),   # already QuickGELU
    ("ViT-B-32", None, False),
    ("ViT-B-32", "/some/local/weights.pt", False),
])
def test_decision_follows_the_pretrained_registry(name, tag, expected):
    assert needs_quick_gelu(name, tag) is expected


def test_flag_builds_quickgelu_in_both_towers(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning-free build
        quick = create_model("clip", "clmerge-tiny-clip", force_quick_gelu=True, head_cache_dir=None)
    plain = create_model("clip", "clmerge-tiny-clip", head_cache_dir=None)
    block = quick.clip.visual.transformer.resblocks[0]
    assert type(block.mlp.gelu).__name__ == "QuickGELU"
    assert type(quick.clip.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert type(plain.clip.visual.transformer.resblocks[0].mlp.gelu).__name__ == "GELU"
    assert uses_quick_gelu(quick.clip) and not uses_quick_gelu(plain.clip)
    assert quick.describe()["quick_gelu"] is True and "quick_gelu" not in plain.describe()


def test_openai_tag_is_built_with_quickgelu(monkeypatch):
    """The weights cannot be downloaded here: check what create_clip asks open_clip for."""
    seen = {}

    class Stop(Exception):
        pass

    def fake_create(name, pretrained=None, **kwargs):
        seen.update(kwargs, name=name, pretrained=pretrained)
        raise Stop

    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake_create)
    with pytest.raises(Stop):
        create_model("clip", "ViT-B-32", "openai")
    assert seen["force_quick_gelu"] is True and seen["pretrained"] == "openai"
    with pytest.raises(Stop):
        create_model("clip", "ViT-B-32", "laion2b_s34b_b79k")
    assert seen["force_quick_gelu"] is False
    with pytest.raises(Stop):  # an explicit choice wins
        create_model("clip", "ViT-B-32", "openai", force_quick_gelu=False)
    assert seen["force_quick_gelu"] is False
