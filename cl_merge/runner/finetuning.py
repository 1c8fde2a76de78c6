"""One stage's fine-tune (or imported checkpoint) for the runner, through
``cl_merge.lit.finetune``: the artifacts land in the run folder, and a stage
whose ``metadata.json`` is already there (a previous run, or a cluster job
that ran ``cl-merge finetune`` into the same folder) is not trained again.
"""

from __future__ import annotations

from pathlib import Path

import cl_merge._torchvision_compat  # noqa: F401  (before Lightning imports torchvision)
import pytorch_lightning as pl
import torch

from cl_merge.core.io import atomic_write_json, load_state_dict, save_state_dict
from cl_merge.core.task_vector import TaskVector
from cl_merge.errors import CheckpointError, ConfigError


def train_config_for(scenario, accelerator: str = "auto"):
    """The scenario's TrainConfig (``TrainSpec.to_train_config``: the mapping
    and validation the scenario loader already ran)."""
    return scenario.train.to_train_config(seed=scenario.seed, accelerator=accelerator)


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
        from cl_merge.runner.folder import artifact_lock

        # per-artifact lock: --stage jobs of one job array share the run folder
        with artifact_lock(out_dir, f"stage {stage_index} ({stage.name}) of chain {chain}"):
            if stage.checkpoint:
                return self._import_checkpoint(stage, out_dir)
            return self._finetune(stage, stage_index, init_state, out_dir, chain, seed)

    def _finetune(self, stage, stage_index: int, init_state, out_dir: Path, chain: str,
                  seed: int | None = None) -> Path:
        from cl_merge.lit.config import LoggerConfig
        from cl_merge.lit.finetune import finetune

        result = finetune(
            self.model,
            self.pool.task(stage),
            self.train_cfg,
            out_dir=out_dir,
            init_encoder_state=init_state,
            pretrained_encoder_state=self.pool.theta0,
            seed=self.scenario.stage_seed(stage_index) if seed is None else seed,
            logger_cfg=LoggerConfig(wandb=False),
            callbacks=[StepHookCallback(self.options.hook, f"{chain}/{stage_index:02d}-{stage.name}")],
        )
        if not result.skipped:
            acc = result.metrics.get("val_acc")
            self.options.log(f"  fine-tuned {stage.name} [{chain}]" + (f": val acc {acc:.3f}" if acc is not None else ""))
        return result.encoder_path

    def _import_checkpoint(self, stage, out_dir: Path) -> Path:
        """A stream-of-checkpoints stage: the encoder comes from a checkpoint
        file (safetensors, weights-only torch, or a pickled module read by the
        safe importer), a folder, or for ``hf_clip`` a hub id / save_pretrained
        folder; other key layouts (open_clip <-> HF, task-vectors' ImageEncoder)
        are converted. A family with trained heads (timm ViT) also gets the
        stage's head: the file beside the checkpoint, else a linear head fitted
        on the task's training data with the imported encoder frozen."""
        from cl_merge.models.base import check_state_dict_fits
        from cl_merge.scenario import checkpoint_path

        encoder_file = out_dir / "encoder.safetensors"
        head_file = out_dir / "head.safetensors"
        needs_head = self.model.head_trainable
        if (out_dir / "metadata.json").exists() and encoder_file.exists() and (head_file.exists() or not needs_head):
            return encoder_file
        source = checkpoint_path(self.scenario, stage)
        theta0 = self.pool.theta0
        state = _encoder_entries(_read_stage_checkpoint(self.model, source), theta0)
        check_state_dict_fits(theta0, state, what=f"checkpoint {source}", source=str(source))
        state = {k: v.to(theta0[k].dtype) for k, v in state.items()}
        save_state_dict(state, encoder_file, {"cl_merge_kind": "encoder", "task": stage.name})
        TaskVector.from_state_dicts(theta0, state).save(out_dir / "task_vector.safetensors", {"task": stage.name})
        metadata = {"task": stage.name, "source_checkpoint": str(source)}
        if needs_head:
            metadata["head"] = self._stage_head(stage, source, state, head_file)
        atomic_write_json(out_dir / "metadata.json", metadata)
        return encoder_file

    def _stage_head(self, stage, source, encoder_state, head_file: Path) -> str:
        """Write the imported stage's head to ``head_file``; say where it came from."""
        task = self.pool.task(stage)
        for candidate in head_candidates(source):
            if candidate.is_file():
                head = self.model.load_head(load_state_dict(candidate))
                if not isinstance(head, torch.nn.Linear) or head.in_features != self.model.feature_dim \
                        or head.out_features != task.num_classes:
                    raise CheckpointError(
                        f"head {candidate} does not fit stage {stage.name!r}: expected a linear head "
                        f"{self.model.feature_dim} -> {task.num_classes} classes, got {head}"
                    )
                save_state_dict(head.state_dict(), head_file, {"cl_merge_kind": "head", "task": stage.name})
                return str(candidate)
        head = fit_head_on_task(self.model, encoder_state, task.train, task.num_classes,
                                batch_size=self.scenario.eval.batch_size)
        save_state_dict(head.state_dict(), head_file, {"cl_merge_kind": "head", "task": stage.name,
                                                       "head_source": "fitted"})
        self.options.log(f"  {stage.name}: no head beside {source}; fitted a linear head on its training data")
        return "fitted on the task's training data (encoder frozen)"

    def head_loader(self, index: int, name: str):
        """Trained heads (timm ViT) come from the stage's fine-tune, or for an
        imported checkpoint from beside it / fitted on the task (see
        ``_import_checkpoint``); CLIP's zero-shot heads are built by the model (None here)."""
        if not self.model.head_trainable or self.order_run is None:
            return None
        chain = self.order_run.head_chain()
        path = self.order_run.head_path(index)  # the runner owns the fine-tune folder layout
        if not path.exists():
            self.order_run._finetuned(chain, index)
        if not path.exists():
            raise CheckpointError(f"stage {name!r} has no head at {path} (its fine-tune or import did not write one)")
        return self.model.load_head(load_state_dict(path))


# names looked for beside an imported checkpoint ``<dir>/<stem>.<ext>``
HEAD_FILE_NAMES = ("{stem}.head.safetensors", "{stem}_head.safetensors")


def head_candidates(source) -> list[Path]:
    """Head files for an imported checkpoint: ``<stem>.head.safetensors`` and
    ``<stem>_head.safetensors`` beside a file, plus ``head.safetensors`` beside
    an ``encoder.*`` file (a ``cl-merge finetune`` output folder) or inside a
    checkpoint folder. A hub id has none."""
    if not isinstance(source, Path):
        return []
    if source.is_dir():
        return [source / "head.safetensors"]
    stem = source.stem
    found = [source.with_name(pattern.format(stem=stem)) for pattern in HEAD_FILE_NAMES]
    if stem == "encoder":
        found.append(source.with_name("head.safetensors"))
    return found


def _read_stage_checkpoint(model, source) -> dict:
    """A stage checkpoint's tensors (see ``_import_checkpoint`` for the sources)."""
    from cl_merge.core.pickle_import import load_checkpoint_tensors

    is_pretrained_folder = isinstance(source, Path) and source.is_dir() and (source / "config.json").is_file()
    if getattr(model, "family", None) == "hf_clip" and (isinstance(source, str) or is_pretrained_folder):
        from cl_merge.models.hf_clip import encoder_state_from_pretrained

        return encoder_state_from_pretrained(model, str(source))
    if isinstance(source, str):
        raise ConfigError(f"checkpoint {source!r}: no such file or folder (hub ids are read for model family hf_clip only)")
    return load_checkpoint_tensors(source)


def _encoder_entries(state: dict, theta0: dict) -> dict:
    """The encoder's entries of a checkpoint: as is, under a wrapper prefix
    (a whole model), or in another CLIP key layout (converted)."""
    from cl_merge.models.clip_layouts import adapt_to_reference

    if not set(theta0) <= set(state):
        for prefix in ("visual.", "encoder.", "model.visual.", "image_encoder.", "model."):
            stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if set(theta0) <= set(stripped):
                state = stripped
                break
        else:
            state = adapt_to_reference(state, theta0)
    return {k: state[k] for k in theta0 if k in state} if set(theta0) <= set(state) else state


@torch.no_grad()
def _features(encoder, data, transform, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    from cl_merge.data import with_transform

    loader = torch.utils.data.DataLoader(with_transform(data, transform), batch_size=batch_size, shuffle=False)
    feats, labels = [], []
    for images, targets in loader:
        feats.append(encoder(images.to(device)).float().cpu())
        labels.append(torch.as_tensor(targets))
    return torch.cat(feats), torch.cat(labels)


def fit_head_on_task(model, encoder_state, train_data, num_classes: int, *, batch_size: int = 128) -> torch.nn.Linear:
    """A linear head for an imported encoder: features of the training split
    (eval transform, encoder frozen), then :func:`fit_linear_head`."""
    import copy

    from cl_merge.models.heads import fit_linear_head

    encoder = copy.deepcopy(model.encoder).eval()
    encoder.load_state_dict(encoder_state)
    features, labels = _features(encoder, train_data, model.preprocess(train=False), batch_size, model.device)
    return fit_linear_head(features, labels, num_classes).to(model.device)
