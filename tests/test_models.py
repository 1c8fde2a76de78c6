"""Models layer: tiny CLIP / ViT forward-backward, zero-shot heads and their
cache, encoder state dicts, name errors. Everything offline, random init."""

import os
import subprocess
import sys

import cl_merge  # noqa: F401  (torchvision compatibility shim first)
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cl_merge.config import from_dict
from cl_merge.errors import CheckpointError, UnknownNameError
from cl_merge.models import HeadCache, ModelConfig, ZeroShotHead, build_model, check_state_dict_fits, concat_heads, create_model

CLASSES = ["cat", "dog", "airplane"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


@pytest.fixture
def clip(tmp_path):
    HeadCache.clear_memory()
    return create_model("clip", "clmerge-tiny-clip", head_cache_dir=tmp_path / "heads")


@pytest.fixture(scope="module")
def vit():
    return create_model("vit", "clmerge-tiny-vit")


def count_text_calls(model, monkeypatch):
    calls = []
    original = model.encode_text

    def counting(tokens):
        calls.append(tokens.shape[0])
        return original(tokens)

    monkeypatch.setattr(model, "encode_text", counting)
    return calls


def test_tiny_clip_forward_backward(clip):
    assert clip.feature_dim == 64
    assert 4.0e6 < sum(p.numel() for p in clip.clip.parameters()) < 4.2e6
    head = clip.make_head(CLASSES, TEMPLATES)
    images = torch.randn(4, 3, 32, 32)
    logits = clip.forward(images, head)
    assert logits.shape == (4, 3)
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in clip.encoder.parameters())
    assert all(not p.requires_grad for p in clip.text_parameters())
    assert list(head.parameters()) == []  # frozen: buffers only


def test_zero_shot_head_is_normalised_template_average(clip):
    head = clip.make_head(CLASSES, TEMPLATES)
    assert isinstance(head, ZeroShotHead) and head.weight.shape == (3, 64)
    torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(3))
    with torch.no_grad():  # class 1 by hand: normalise each template, average, renormalise
        emb = clip.clip.encode_text(clip.tokenizer([t.format("dog") for t in TEMPLATES]))
        expected = F.normalize(F.normalize(emb, dim=-1).mean(0), dim=0)
    torch.testing.assert_close(head.weight[1], expected, atol=1e-5, rtol=1e-5)
    features = torch.randn(5, 64)
    manual = clip.clip.logit_scale.exp() * F.normalize(features, dim=-1) @ head.weight.T
    torch.testing.assert_close(head(features), manual.detach())


def test_head_cache_skips_text_tower(clip, tmp_path, monkeypatch):
    calls = count_text_calls(clip, monkeypatch)
    first = clip.make_head(CLASSES, TEMPLATES)
    assert sum(calls) == len(CLASSES) * len(TEMPLATES)
    n = len(calls)
    again = clip.make_head(CLASSES, TEMPLATES)  # memory hit
    assert len(calls) == n
    HeadCache.clear_memory()
    from_disk = clip.make_head(CLASSES, TEMPLATES)  # disk hit
    assert len(calls) == n
    assert len(list((tmp_path / "heads").glob("*.safetensors"))) == 1
    torch.testing.assert_close(first.weight, again.weight)
    torch.testing.assert_close(first.weight, from_disk.weight)

    # a new process building the same model (same init seed) hits the disk cache too
    HeadCache.clear_memory()
    twin = create_model("clip", "clmerge-tiny-clip", head_cache_dir=tmp_path / "heads")
    twin_calls = count_text_calls(twin, monkeypatch)
    twin.make_head(CLASSES, TEMPLATES)
    assert twin_calls == []

    # other classes or templates miss
    clip.make_head(["ship"], TEMPLATES)
    clip.make_head(CLASSES, TEMPLATES[:1])
    assert len(calls) > n

    # union head for class-incremental evaluation goes through the same cache
    n = len(calls)
    union = clip.make_union_head([(CLASSES, TEMPLATES), (["ship"], TEMPLATES)])
    assert len(calls) == n
    assert union.weight.shape == (4, 64)
    torch.testing.assert_close(union.weight[:3], first.weight)


def test_head_cache_key_tracks_weights(tmp_path):
    a = create_model("clip", "clmerge-tiny-clip", init_seed=0, head_cache_dir=None)
    b = create_model("clip", "clmerge-tiny-clip", init_seed=1, head_cache_dir=None)
    assert a.weights_id() != b.weights_id()
    assert not torch.equal(a.make_head(CLASSES).weight, b.make_head(CLASSES).weight)


def test_bad_template_is_rejected(clip):
    with pytest.raises(cl_merge.ConfigError, match="placeholder"):
        clip.make_head(CLASSES, ["a photo"])


def test_encoder_state_dict_round_trip(clip):
    sd = clip.encoder_state_dict()
    assert "conv1.weight" in sd and not any(k.startswith("visual.") for k in sd)
    assert not any(k.startswith(("token_embedding", "text_projection", "logit_scale")) for k in sd)
    changed = {k: v + 0.5 for k, v in sd.items()}
    clip.load_encoder_state_dict(changed)
    for k, v in clip.encoder_state_dict().items():
        torch.testing.assert_close(v, changed[k])
    sd["conv1.weight"].zero_()  # a copy: the model is not affected
    assert clip.encoder.conv1.weight.abs().sum() > 0


def test_encoder_state_dict_errors_name_the_key(clip):
    sd = clip.encoder_state_dict()
    missing = dict(sd)
    del missing["ln_post.weight"]
    with pytest.raises(CheckpointError, match="missing.*'ln_post.weight'"):
        clip.load_encoder_state_dict(missing)
    with pytest.raises(CheckpointError, match="unexpected.*'extra.bias'"):
        clip.load_encoder_state_dict({**sd, "extra.bias": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'proj'.*\[128, 64\].*\[64, 64\]"):
        clip.load_encoder_state_dict({**sd, "proj": torch.zeros(64, 64)})
    with pytest.raises(CheckpointError, match="prefixed with 'visual.'"):
        check_state_dict_fits(sd, {f"visual.{k}": v for k, v in sd.items()})
    # loading a whole-model (or Hugging Face layout) state dict converts it to the encoder's layout
    shifted = {k: v + 1 for k, v in sd.items()}
    clip.load_encoder_state_dict({f"visual.{k}": v for k, v in shifted.items()})
    assert all(torch.equal(v, shifted[k]) for k, v in clip.encoder_state_dict().items())
    clip.load_encoder_state_dict(sd)
    clip.load_encoder_state_dict(missing, strict=False)  # non-strict tolerates missing keys


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = create_model("vit", "clmerge-tiny-vit", init_seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b = create_model("vit", "clmerge-tiny-vit", init_seed=7)
    c = create_model("vit", "clmerge-tiny-vit", init_seed=8)
    sa, sb, sc = a.encoder_state_dict(), b.encoder_state_dict(), c.encoder_state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.attn.qkv.weight"], sc["blocks.0.attn.qkv.weight"])


def test_vit_forward_backward_and_linear_head(vit):
    assert vit.feature_dim == 96 and 0.4e6 < vit.num_parameters() < 0.5e6
    head = vit.make_head([str(i) for i in range(10)], seed=3)
    assert isinstance(head, torch.nn.Linear) and head.weight.shape == (10, 96)
    torch.testing.assert_close(head.weight, vit.make_head([str(i) for i in range(10)], seed=3).weight)
    assert not any(k.startswith("head") for k in vit.encoder_state_dict())  # heads live outside the encoder
    logits = vit.forward(torch.randn(2, 3, 32, 32), head)
    assert logits.shape == (2, 10)
    logits.sum().backward()
    assert head.weight.grad is not None and vit.encoder.blocks[0].attn.qkv.weight.grad is not None
    vit.encoder.zero_grad(set_to_none=True)


def test_trainable_subsets(clip, vit):
    last = clip.trainable_parameter_names("last_k_blocks", 2)
    assert any(n.startswith("transformer.resblocks.3.") for n in last)
    assert any(n.startswith("transformer.resblocks.2.") for n in last)
    assert not any(n.startswith("transformer.resblocks.1.") for n in last)
    assert {"ln_post.weight", "proj"} <= set(last) and "conv1.weight" not in last
    norms = vit.trainable_parameter_names("layernorm")
    assert norms and all("norm" in n for n in norms) and "fc_norm.weight" in norms
    assert len(vit.trainable_parameter_names("all")) == len(list(vit.encoder.parameters()))
    with pytest.raises(cl_merge.HyperparameterError, match="only 4 blocks"):
        vit.trainable_parameter_names("last_k_blocks", 5)


def test_preprocess_follows_each_model(clip, vit):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)).convert("RGB")
    for model in (clip, vit):
        for train in (False, True):
            x = model.preprocess(train)(image)
            assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    # CLIP normalises with OpenAI's statistics, the timm ViT with its data config (0.5, 0.5)
    assert "0.4814" in repr(clip.preprocess(False)) and vit.data_config["mean"] == (0.5, 0.5, 0.5)


def test_concat_linear_heads(vit):
    a = vit.make_head(["a", "b"], seed=0)
    b = vit.make_head(["c"], seed=1)
    union = concat_heads([a, b])
    x = torch.randn(3, 96)
    torch.testing.assert_close(union(x), torch.cat([a(x), b(x)], dim=1))
    restored = vit.load_head(union.state_dict())
    torch.testing.assert_close(restored(x), union(x))


def test_model_config_and_unknown_names():
    cfg = from_dict(ModelConfig, {"family": "vit", "name": "clmerge-tiny-vit", "init_seed": 3}, where="model")
    assert build_model(cfg).family == "vit"
    with pytest.raises(UnknownNameError, match=r"unknown CLIP model 'ViT-B-99'.*did you mean: ViT-B-32"):
        create_model("clip", "ViT-B-99")
    with pytest.raises(UnknownNameError, match="clmerge-tiny-clip"):
        create_model("clip", "clmerge-tiny-clipp")
    with pytest.raises(UnknownNameError, match=r"did you mean: vit_tiny_patch16_224"):
        create_model("vit", "vit_tinyy_patch16_224")
    with pytest.raises(UnknownNameError, match=r"unknown pretrained tag 'openaii'.*did you mean: openai"):
        create_model("clip", "ViT-B-32", "openaii")
    with pytest.raises(UnknownNameError, match="did you mean: clip"):
        create_model("clipp", "clmerge-tiny-clip")


def test_offline_download_failure_is_one_clear_error():
    """With HF_HUB_OFFLINE=1 the failure is immediate and says why."""
    code = (
        "import cl_merge\n"
        "from cl_merge.models import create_model\n"
        "from cl_merge.errors import CheckpointError\n"
        "try:\n"
        "    create_model('clip', 'ViT-B-32', 'openai', head_cache_dir=None)\n"
        "except CheckpointError as exc:\n"
        "    print('ERR', exc)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("ERR")]
    assert line, out.stdout + out.stderr
    assert "could not download pretrained weights 'openai'" in line[0] and "HF_HUB_OFFLINE" in line[0]
    assert "Retrying" not in out.stderr
