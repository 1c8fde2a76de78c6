"""``cl-merge finetune --config FILE [key.sub=value ...] --out DIR``

Config sections: ``model`` (ModelConfig), ``task`` (TaskSpec), ``train``
(TrainConfig), ``logging`` (LoggerConfig), ``seed``, ``data_root``.
Writes encoder / task vector / head safetensors and metadata.json into DIR;
rerunning a finished command skips training, rerunning an interrupted one
resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SECTIONS = ("model", "task", "train", "logging", "seed", "data_root")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML file with model/task/train/logging/seed/data_root")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.max_steps=50")
    parser.add_argument("--out", required=True, help="output folder for the artifacts")
    parser.add_argument("--force", action="store_true", help="retrain even if DIR holds a finished run of this config")


def main(args: argparse.Namespace) -> int:
    from cl_merge.config import apply_overrides, from_dict, load_yaml
    from cl_merge.errors import ConfigError, close_matches

    raw = apply_overrides(load_yaml(args.config), args.overrides)
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:
        raise ConfigError(
            f"{args.config}: unknown section {unknown[0]!r}{close_matches(unknown[0], SECTIONS)} (valid: {', '.join(SECTIONS)})"
        )
    for required in ("model", "task"):
        if required not in raw:
            raise ConfigError(f"{args.config}: missing section {required!r}")

    from cl_merge.data import TaskSpec
    from cl_merge.lit.config import LoggerConfig, TrainConfig
    from cl_merge.models.base import ModelConfig

    where = Path(args.config).name
    model_cfg = from_dict(ModelConfig, raw["model"], where=f"{where}: model")
    task_spec = from_dict(TaskSpec, raw["task"], where=f"{where}: task")
    train_cfg = from_dict(TrainConfig, raw.get("train") or {}, where=f"{where}: train")
    logger_cfg = from_dict(LoggerConfig, raw.get("logging") or {}, where=f"{where}: logging")
    seed = raw.get("seed", train_cfg.seed)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"{where}: seed: expected an integer, got {seed!r}")
    data_root = raw.get("data_root")
    if data_root is not None and not isinstance(data_root, str):
        raise ConfigError(f"{where}: data_root: expected a path string, got {data_root!r}")

    from cl_merge.pretrain import OFFLINE_TAG, ensure_offline_clip

    if model_cfg.family == "clip" and model_cfg.pretrained == OFFLINE_TAG:
        # the toolkit's own offline-pretrained tiny CLIP (made once, cached)
        model_cfg.pretrained = str(ensure_offline_clip(data_root=data_root))

    from cl_merge.lit.finetune import finetune

    result = finetune(
        model_cfg,
        task_spec,
        train_cfg,
        out_dir=args.out,
        seed=seed,
        logger_cfg=logger_cfg,
        data_root=data_root,
        force=args.force,
    )
    state = "already complete, skipped training" if result.skipped else f"trained {result.metadata.get('global_step')} steps"
    print(f"finetune {model_cfg.name} on {result.metadata['task']['name']}: {state}")
    print(json.dumps(result.metrics, indent=2, sort_keys=True))
    print(f"artifacts: {result.out_dir}")
    return 0
