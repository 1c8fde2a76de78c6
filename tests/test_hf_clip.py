"""The ``hf_clip`` model family on tiny ``transformers`` CLIP models saved
with ``save_pretrained`` (no download): features and zero-shot logits equal
transformers' own, vision-only checkpoints, offline errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import cl_merge  # noqa: F401  (torchvision compat first)
from cl_merge.errors import CheckpointError
from cl_merge.models import create_model

transformers = pytest.importorskip("transformers")

IMAGE, PATCH, WIDTH, EMBED = 32, 8, 32, 16


def _byte_symbols() -> list[str]:
    """GPT-2's byte-to-unicode table (CLIP's BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(folder: Path) -> int:
    """A valid CLIPTokenizer with byte-level symbols only (no merges); returns the vocab size."""
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    raw = folder / "raw_tokenizer"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "vocab.json").write_text(json.dumps(vocab))
    (raw / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(raw / "vocab.json"), str(raw / "merges.txt"))
    tokenizer.save_pretrained(folder)
    return len(vocab)


def tiny_config(vocab_size: int = 514):
    common = {"hidden_size": WIDTH, "intermediate_size": 2 * WIDTH, "num_hidden_layers": 2, "num_attention_heads": 2}
    return transformers.CLIPConfig(
        vision_config={**common, "image_size": IMAGE, "patch_size": PATCH},
        text_config={**common, "vocab_size": vocab_size, "max_position_embeddings": 24,
                     "bos_token_id": 512, "eos_token_id": 513, "pad_token_id": 513},
        projection_dim=EMBED,
    )


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf_tiny_clip")
    vocab_size = write_tokenizer(folder)
    torch.manual_seed(0)
    transformers.CLIPModel(tiny_config(vocab_size)).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("CL_MERGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _features(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def test_features_and_zero_shot_logits_equal_transformers(tiny_clip_dir):
    model = create_model("hf_clip", str(tiny_clip_dir))
    reference = transformers.CLIPModel.from_pretrained(tiny_clip_dir).eval()
    images = torch.randn(4, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(model.encoder(images), _features(reference.get_image_features(pixel_values=images)), atol=1e-5)
    assert set(model.encoder_state_dict()) == {k for k in reference.state_dict()
                                               if k.startswith("vision_model.") or k == "visual_projection.weight"}
    # one template: the zero-shot logits are transformers' logits_per_image
    classes = ["cat", "dog", "red car"]
    head = model.make_head(classes, ["a photo of a {}."])
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_clip_dir)
    texts = tokenizer([f"a photo of a {c}." for c in classes], padding=True, return_tensors="pt")
    expected = reference(input_ids=texts["input_ids"], attention_mask=texts["attention_mask"],
                         pixel_values=images).logits_per_image
    assert torch.allclose(model.forward(images, head), expected, atol=1e-5)
    # several templates: per class, the renormalised mean of the normalised text embeddings
    templates = ["a photo of a {}.", "{}", "a drawing of the {}!"]
    head = model.make_head(classes, templates)
    rows = []
    for c in classes:
        ids = tokenizer([t.format(c) for t in templates], padding=True, return_tensors="pt")
        emb = _features(reference.get_text_features(**ids))
        rows.append(torch.nn.functional.normalize(torch.nn.functional.normalize(emb, dim=-1).mean(0), dim=-1))
    img = torch.nn.functional.normalize(_features(reference.get_image_features(pixel_values=images)), dim=-1)
    expected = reference.logit_scale.exp() * img @ torch.stack(rows).T
    assert torch.allclose(model.forward(images, head), expected, atol=1e-5)


def test_trainable_blocks_and_text_tower_frozen(tiny_clip_dir):
    model = create_model("hf_clip", str(tiny_clip_dir), head_cache_dir=None)
    names = model.trainable_parameter_names("last_k_blocks", 1)
    assert names and all(n.startswith(("vision_model.encoder.layers.1.", "vision_model.post_layernorm.",
                                       "visual_projection.")) for n in names)
    assert "visual_projection.weight" in names
    assert all(not p.requires_grad for p in model.text_parameters())


def test_preprocess_follows_the_processor_config(tiny_clip_dir, tmp_path):
    from PIL import Image

    folder = tmp_path / "with_processor"
    folder.mkdir()
    for file in tiny_clip_dir.iterdir():
        if file.is_file():
            (folder / file.name).write_bytes(file.read_bytes())
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": IMAGE}, "crop_size": {"height": IMAGE, "width": IMAGE}, "do_resize": True,
        "do_center_crop": True, "image_mean": mean, "image_std": std, "resample": 3, "do_convert_rgb": True,
    }))
    model = create_model("hf_clip", str(folder), head_cache_dir=None)
    pixels = torch.randint(0, 256, (IMAGE, IMAGE + 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    image = Image.fromarray(pixels.numpy(), mode="L")  # grayscale, wider than high: crop only (no resampling)
    out = model.preprocess()(image)
    assert out.shape == (3, IMAGE, IMAGE)
    crop = pixels[:, 4:4 + IMAGE].float() / 255
    for channel in range(3):
        assert torch.allclose(out[channel], (crop - mean[channel]) / std[channel], atol=1e-5)


def _vision_only_dir(tiny_clip_dir: Path, folder: Path) -> dict:
    """A CLIPVisionModel checkpoint: the tiny model's vision tower, perturbed (a 'fine-tune')."""
    vision = transformers.CLIPVisionModel(tiny_config().vision_config)
    base = transformers.CLIPModel.from_pretrained(tiny_clip_dir)
    vision.load_state_dict({k: v for k, v in base.vision_model.state_dict().items()})
    with torch.no_grad():
        for p in vision.parameters():
            p.add_(0.01)
    vision.save_pretrained(folder)
    return {k: v.clone() for k, v in vision.state_dict().items()}


def test_vision_only_checkpoint_needs_and_uses_a_base(tiny_clip_dir, tmp_path):
    folder = tmp_path / "vision_only"
    tuned = _vision_only_dir(tiny_clip_dir, folder)
    with pytest.raises(CheckpointError, match="vision tower only.*base="):
        create_model("hf_clip", str(folder))
    model = create_model("hf_clip", str(folder), base=str(tiny_clip_dir), head_cache_dir=None)
    base = create_model("hf_clip", str(tiny_clip_dir), head_cache_dir=None)
    state, base_state = model.encoder_state_dict(), base.encoder_state_dict()
    assert torch.equal(state["visual_projection.weight"], base_state["visual_projection.weight"])
    tuned_key = next(k for k in tuned if k.endswith("layers.0.mlp.fc1.weight"))
    assert torch.equal(state["vision_model.encoder.layers.0.mlp.fc1.weight"], tuned[tuned_key])
    assert not torch.equal(state["vision_model.encoder.layers.0.mlp.fc1.weight"],
                           base_state["vision_model.encoder.layers.0.mlp.fc1.weight"])
    # the same through ModelConfig-style `pretrained` (a scenario's model.pretrained)
    again = create_model("hf_clip", str(folder), str(tiny_clip_dir), head_cache_dir=None)
    assert all(torch.equal(v, again.encoder_state_dict()[k]) for k, v in state.items())
    # text side (zero-shot heads) is the base's
    assert torch.equal(model.make_head(["a", "b"]).weight, base.make_head(["a", "b"]).weight)


def test_unknown_hub_id_offline_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    with pytest.raises(CheckpointError, match=r"'nobody/no-such-clip' is not in the local Hugging Face cache.*"
                                              r"hf download nobody/no-such-clip.*huggingface-cli download"):
        create_model("hf_clip", "nobody/no-such-clip", cache_dir=tmp_path / "hf_home" / "hub")
    with pytest.raises(CheckpointError, match="folder not found"):
        create_model("hf_clip", str(tmp_path / "missing" / "folder"))


def test_stream_of_hf_checkpoints_from_local_folders(tiny_clip_dir, tmp_path, monkeypatch):
    """FusionBench's set-up in small: a base CLIPModel as θ0 and vision-only
    fine-tuned folders as the stages (hub ids work the same way online)."""
    import yaml

    from cl_merge.core.io import load_state_dict
    from cl_merge.runner import RunOptions, run_scenario
    from cl_merge.scenario import checkpoint_path, load_scenario

    monkeypatch.setenv("WANDB_MODE", "disabled")
    first = _vision_only_dir(tiny_clip_dir, tmp_path / "pool" / "digits")
    body = {
        "setting": "task_incremental",
        "model": {"family": "hf_clip", "name": str(tiny_clip_dir)},
        "stages": [{"dataset": "digits", "checkpoint": "pool/digits"},
                   {"dataset": "digits", "variant": "invert", "checkpoint": "nobody/clip-vit-tiny_digits_invert"}],
        "merge": [{"method": "task_arithmetic", "hyperparameters": {"scaling": 1.0}}],
        "baselines": {"zero_shot": True, "individual": False},
        "eval": {"max_test": 40},
    }
    path = tmp_path / "fusionbench_like.yaml"
    path.write_text(yaml.safe_dump(body))
    scenario = load_scenario(path)
    assert checkpoint_path(scenario, scenario.stages[0]) == tmp_path / "pool" / "digits"
    assert checkpoint_path(scenario, scenario.stages[1]) == "nobody/clip-vit-tiny_digits_invert"
    # a hub id that is not cached: the run stops at that stage with the fetch command
    with pytest.raises(CheckpointError, match="hf download nobody/clip-vit-tiny_digits_invert"):
        run_scenario(scenario, RunOptions(out_dir=tmp_path / "run", progress=False, wandb_mode="disabled",
                                          log=lambda m: None))
    second = _vision_only_dir(tiny_clip_dir, tmp_path / "pool" / "invert")
    body["stages"][1]["checkpoint"] = "pool/invert"
    path.write_text(yaml.safe_dump(body))
    scenario = load_scenario(path)
    out = tmp_path / "run2"
    run_scenario(scenario, RunOptions(out_dir=out, progress=False, wandb_mode="disabled", log=lambda m: None))
    base = create_model("hf_clip", str(tiny_clip_dir), head_cache_dir=None).encoder_state_dict()
    from cl_merge.runner import artifacts

    for tag, tuned in (("digits", first), ("digits_invert", second)):
        encoder = load_state_dict(out / "finetune" / "independent" / tag / "encoder.safetensors")
        assert torch.equal(encoder["visual_projection.weight"], base["visual_projection.weight"])
        key = next(k for k in tuned if k.endswith("layers.1.self_attn.q_proj.weight"))
        assert torch.equal(encoder["vision_model.encoder.layers.1.self_attn.q_proj.weight"], tuned[key])
        tv = artifacts.task_vector(out / "finetune" / "independent" / tag, base)
        assert torch.allclose(tv["vision_model.encoder.layers.1.self_attn.q_proj.weight"],
                              tuned[key] - base["vision_model.encoder.layers.1.self_attn.q_proj.weight"])
    results = {r["name"] for r in json.loads((out / "metrics.json").read_text())["results"]}
    assert {"task_arithmetic", "zero_shot"} <= results


def test_cli_finetune_takes_an_hf_clip_model(tiny_clip_dir, tmp_path, capsys):
    import yaml

    from cl_merge.cli import main
    from cl_merge.core.io import load_state_dict

    config = tmp_path / "ft.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"family": "hf_clip", "name": str(tiny_clip_dir), "kwargs": {"head_cache_dir": None}},
        "task": {"dataset": "digits", "max_train": 48, "max_val": 16, "max_test": 16},
        "train": {"max_steps": 2, "batch_size": 16, "lr": 1e-3, "warmup_steps": 0, "progress_bar": False},
        "logging": {"wandb": False},
    }))
    out = tmp_path / "ft"
    assert main(["finetune", "--config", str(config), "--out", str(out)]) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    tau = load_state_dict(out / "task_vector.safetensors")
    assert set(tau) == set(create_model("hf_clip", str(tiny_clip_dir), head_cache_dir=None).encoder_state_dict())
    assert float(tau["visual_projection.weight"].abs().sum()) > 0
