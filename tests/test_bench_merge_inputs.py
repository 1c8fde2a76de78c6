"""scripts/bench_merge.py builds its inputs from tower shapes alone (so it
runs where open_clip is not installed, as on a lent GPU machine): those
shapes must be open_clip's own."""

from pathlib import Path

import pytest
import torch

import cl_merge  # noqa: F401  (torchvision compat before open_clip)


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_merge

    return bench_merge


def test_vit_b_32_shapes_are_open_clips(bench):
    import open_clip

    visual = open_clip.create_model("ViT-B-32", pretrained=None).visual
    assert {k: tuple(v.shape) for k, v in visual.state_dict().items()} == bench.tower_shapes("ViT-B-32")


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16", "ViT-L-14"])
def test_tower_table_follows_open_clips_configs(bench, name):
    import open_clip

    config = open_clip.get_model_config(name)
    vision = config["vision_cfg"]
    assert bench.VISUAL_TOWERS[name] == (vision["width"], vision["layers"], vision["patch_size"], config["embed_dim"])
    assert vision["image_size"] == 224


def test_vit_l_14_parameter_count(bench):
    total = sum(torch.Size(shape).numel() for shape in bench.tower_shapes("ViT-L-14").values())
    assert total == 303_966_208  # open_clip's ViT-L-14 visual tower


def test_inputs_take_the_tower_shapes_and_are_reused(bench, tmp_path):
    import json

    from cl_merge.core.io import load_state_dict

    first = bench.build_inputs(tmp_path, 1, "tiny")
    assert json.loads((tmp_path / "inputs.json").read_text())["model"] == "tiny"
    written = first[0].stat().st_mtime_ns
    assert bench.build_inputs(tmp_path, 1, "tiny") == first and first[0].stat().st_mtime_ns == written
    assert {k: tuple(v.shape) for k, v in load_state_dict(first[0]).items()} == bench.tower_shapes("tiny")
