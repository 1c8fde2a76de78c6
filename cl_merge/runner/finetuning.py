"""One stage's fine-tune (or imported checkpoint) for the runner, through
``cl_merge.lit.finetune``: the artifacts land in the run folder, and a stage
whose ``metadata.json`` is already there (a previous run, or a cluster job
that ran ``cl-merge finetune`` into the same folder) is not trained again.
"""

from __future__ import annotations

from pathlib import Path

import cl_merge._torchvision_compat  # noqa: F401  (before Lightning imports torchvision)
import pytorch_lightning as pl

from cl_merge.core.io import atomic_write_json, load_state_dict, save_state_dict
from cl_merge.core.task_vector import TaskVector
from cl_merge.errors import ConfigError

# the scenario's ``train`` fields that map one to one onto TrainConfig
_TRAIN_FIELDS = ("max_steps", "lr", "batch_size", "weight_decay", "warmup_steps", "grad_clip", "label_smoothing")


def train_config_for(scenario, accelerator: str = "auto"):
    """TrainConfig from the scenario's ``train`` overrides (the recipe is AdamW
    with a cosine schedule after linear warm-up; others are refused)."""
    from cl_merge.lit.config import TrainConfig

    spec = scenario.train
    if getattr(spec, "optimizer", None) not in (None, "adamw"):
        raise ConfigError(f"train.optimizer: only 'adamw' is implemented, got {spec.optimizer!r}")
    if getattr(spec, "scheduler", None) not in (None, "cosine"):
        raise ConfigError(f"train.scheduler: only 'cosine' (with linear warm-up) is implemented, got {spec.scheduler!r}")
    values = {name: getattr(spec, name) for name in _TRAIN_FIELDS if getattr(spec, name, None) is not None}
    values.setdefault("warmup_steps", min(500, values.get("max_steps", 2000) // 10))
    # the scenario's devices / precision (the accelerator is resolved once by the runner)
    for name in ("devices", "precision"):
        if getattr(spec, name, None) is not None:
            values[name] = getattr(spec, name)
    return TrainConfig(**values, accelerator=accelerator, cache_tensors=True, eval_splits=["val"],
                       progress_bar=False, seed=scenario.seed)


class StepHookCallback(pl.Callback):
    """Calls the runner's step hook after every training batch (tests use it
    to interrupt a fine-tune midway)."""

    def __init__(self, hook, name: str):
        self.hook = hook
        self.name = name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.hook("finetune_step", f"{self.name}/{trainer.global_step}")


class StageFinetuner:
    def __init__(self, scenario, pretrained, model, folder, options):
        self.scenario = scenario
        self.model = model
        self.folder = folder
        self.options = options
        self.train_cfg = train_config_for(scenario, getattr(options, "resolved_accelerator", options.accelerator))
        self.pool = None  # set by the runner
        self.order_run = None

    def __call__(self, *, stage, stage_index: int, init_state, out_dir: Path, chain: str,
                 seed: int | None = None) -> Path:
        """Train (or import) one stage into ``out_dir``. ``seed``: chosen by the
        runner (an independent fine-tune's depends on the task, not its position)."""
        if stage.checkpoint:
            return self._import_checkpoint(stage, out_dir)
        from cl_merge.lit.config import LoggerConfig
        from cl_merge.lit.finetune import finetune

        result = finetune(
            self.model,
            self.pool.task(stage),
            self.train_cfg,
            out_dir=out_dir,
            init_encoder_state=init_state,
            pretrained_encoder_state=self.pool.theta0,
            seed=self.scenario.seed * 1000 + stage_index if seed is None else seed,
            logger_cfg=LoggerConfig(wandb=False),
            callbacks=[StepHookCallback(self.options.hook, f"{chain}/{stage_index:02d}-{stage.name}")],
        )
        if not result.skipped:
            acc = result.metrics.get("val_acc")
            self.options.log(f"  fine-tuned {stage.name} [{chain}]" + (f": val acc {acc:.3f}" if acc is not None else ""))
        return result.encoder_path

    def _import_checkpoint(self, stage, out_dir: Path) -> Path:
        """A stream-of-checkpoints stage: the encoder comes from a file."""
        from cl_merge.scenario import checkpoint_path

        encoder_file = out_dir / "encoder.safetensors"
        if (out_dir / "metadata.json").exists() and encoder_file.exists():
            return encoder_file
        source = checkpoint_path(self.scenario, stage)
        state = load_state_dict(source)
        theta0 = self.pool.theta0
        # a full-model checkpoint: keep the encoder's entries
        if not set(theta0) <= set(state):
            for prefix in ("visual.", "encoder.", "model.visual.", "image_encoder."):
                stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                if set(theta0) <= set(stripped):
                    state = stripped
                    break
        from cl_merge.models.base import check_state_dict_fits

        state = {k: state[k] for k in theta0 if k in state}
        check_state_dict_fits(theta0, state, what=f"checkpoint {source}")
        state = {k: v.to(theta0[k].dtype) for k, v in state.items()}
        save_state_dict(state, encoder_file, {"cl_merge_kind": "encoder", "task": stage.name})
        TaskVector.from_state_dicts(theta0, state).save(out_dir / "task_vector.safetensors", {"task": stage.name})
        atomic_write_json(out_dir / "metadata.json", {"task": stage.name, "source_checkpoint": str(source)})
        return encoder_file

    def head_loader(self, index: int, name: str):
        """Trained heads (timm ViT) come from the stage's fine-tune; CLIP's
        zero-shot heads are built by the model (None here)."""
        if not self.model.head_trainable or self.order_run is None:
            return None
        chain = self.order_run.head_chain()
        path = self.order_run.head_path(index)  # the runner owns the fine-tune folder layout
        if not path.exists():
            self.order_run._finetuned(chain, index)
        return self.model.load_head(load_state_dict(path))
