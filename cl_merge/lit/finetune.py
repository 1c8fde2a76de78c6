"""``finetune``: train one encoder on one task and write the artifacts merging needs.

Artifacts in ``out_dir`` (each written atomically; ``metadata.json`` last,
so its presence means the run finished):

- ``encoder.safetensors``: the fine-tuned encoder θ_ft (keys without prefix);
- ``task_vector.safetensors``: τ = θ_ft − θ0, where θ0 is the *pretrained*
  encoder (``pretrained_encoder_state``), not the state training started
  from. Continual schemes that start stage t from the previous fine-tuned or
  merged model (MagMax, CoFiMA) still merge vectors relative to θ0;
- ``head.safetensors``: the head (trained linear head for ViT, the frozen
  zero-shot head for CLIP);
- ``metadata.json``: model, task, classes, hyperparameters, metrics, seed,
  fingerprints of the start and θ0 states, versions;
- ``logs/metrics.csv``: Lightning's CSV log (plus an offline wandb run if asked).

A rerun with the same configuration finds ``metadata.json`` and skips
training; a run that was interrupted resumes from its ``last.ckpt``
(checkpoints live under ``checkpoints/<config hash>/`` so a changed config
never resumes a stale run).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import platform
import shutil
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import cl_merge._torchvision_compat  # noqa: F401  (before Lightning imports torchvision)
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from cl_merge.config import from_dict, to_dict
from cl_merge.core.io import atomic_write_json, load_state_dict, read_json, save_state_dict
from cl_merge.core.task_vector import TaskVector
from cl_merge.errors import CheckpointError, ConfigError
from cl_merge.lit.config import COSMETIC_FIELDS, LoggerConfig, TrainConfig
from cl_merge.lit.datamodule import TaskDataModule
from cl_merge.lit.evaluate import evaluate
from cl_merge.lit.loggers import finish_loggers, make_loggers
from cl_merge.lit.module import FineTuneModule
from cl_merge.models.base import ModelConfig, TaskModel, build_model, check_state_dict_fits
from cl_merge.models.heads import fingerprint_tensors

log = logging.getLogger(__name__)
# Lightning announces the accelerators and a tip through rank_zero_info on every fit (four lines per
# fine-tune); the console keeps to progress bars and results. Its warnings still show.
for _name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# Lightning 2.6 on torch 2.13 trips torch's own deprecation of LeafSpec inside its pytree helper: a
# library mismatch no user can act on, printed at the first fit of every process.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
METADATA_FORMAT = 1
ENCODER_FILE, TASK_VECTOR_FILE, HEAD_FILE, METADATA_FILE = (
    "encoder.safetensors", "task_vector.safetensors", "head.safetensors", "metadata.json"
)


@dataclasses.dataclass
class FinetuneResult:
    """Where a fine-tune's artifacts are, and its metrics (``skipped``: found
    complete on disk, not retrained)."""

    out_dir: Path
    metrics: dict[str, float]
    metadata: dict[str, Any]
    skipped: bool = False

    @property
    def encoder_path(self) -> Path:
        return self.out_dir / ENCODER_FILE

    @property
    def task_vector_path(self) -> Path:
        return self.out_dir / TASK_VECTOR_FILE

    @property
    def head_path(self) -> Path:
        return self.out_dir / HEAD_FILE

    @property
    def metadata_path(self) -> Path:
        return self.out_dir / METADATA_FILE

    def encoder_state(self) -> dict[str, torch.Tensor]:
        return load_state_dict(self.encoder_path)

    def task_vector(self) -> TaskVector:
        return TaskVector.load(self.task_vector_path)

    def head(self, model: TaskModel):
        return model.load_head(load_state_dict(self.head_path))


# ---------------------------------------------------------------------- inputs
def _train_config(train_cfg: TrainConfig | Mapping[str, Any]) -> TrainConfig:
    if isinstance(train_cfg, TrainConfig):
        return train_cfg
    return from_dict(TrainConfig, train_cfg, where="train")


def _resolve_task(task, data_root, seed: int):
    """TaskData as is; a TaskSpec or a mapping of its fields is loaded."""
    from cl_merge.data import TaskSpec, load_task

    if isinstance(task, Mapping):
        task = from_dict(TaskSpec, task, where="task")
    if isinstance(task, TaskSpec):
        return load_task(task, root=data_root, seed=seed)
    for attr in ("name", "classnames", "train"):
        if not hasattr(task, attr):
            raise ConfigError(f"task must be a TaskData, a TaskSpec or a mapping; {type(task).__name__} lacks .{attr}")
    return task


def _task_identity(task) -> dict[str, Any]:
    spec = getattr(task, "spec", None)
    return {
        "name": task.name,
        "classnames": list(task.classnames),
        "templates": list(getattr(task, "templates", None) or []),
        "sizes": {s: len(getattr(task, s)) for s in ("train", "val", "test") if getattr(task, s, None) is not None},
        "spec": to_dict(spec) if dataclasses.is_dataclass(spec) else None,
    }


def _versions() -> dict[str, str]:
    import cl_merge

    out = {"python": platform.python_version(), "torch": torch.__version__, "pytorch_lightning": pl.__version__,
           "cl_merge": getattr(cl_merge, "__version__", "unknown")}
    for module in ("open_clip", "timm", "torchmetrics"):
        try:
            out[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            pass
    return out


def _config_hash(identity: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def _completed(out_dir: Path, config_hash: str) -> dict[str, Any] | None:
    meta_path = out_dir / METADATA_FILE
    if not meta_path.exists():
        return None
    try:
        meta = read_json(meta_path)
    except CheckpointError as exc:
        log.warning("%s; training again", exc)
        return None
    if meta.get("config_hash") != config_hash:
        log.warning("%s holds a run with a different configuration; training again and replacing it", out_dir)
        return None
    if not all((out_dir / name).exists() for name in (ENCODER_FILE, TASK_VECTOR_FILE, HEAD_FILE)):
        return None
    return meta


# ---------------------------------------------------------------------- the run
def finetune(
    model_cfg: ModelConfig | TaskModel | Mapping[str, Any],
    task,
    train_cfg: TrainConfig | Mapping[str, Any],
    *,
    out_dir: str | Path,
    init_encoder_state: Mapping[str, torch.Tensor] | None = None,
    pretrained_encoder_state: Mapping[str, torch.Tensor] | None = None,
    seed: int | None = None,
    logger_cfg: LoggerConfig | None = None,
    data_root: str | Path | None = None,
    callbacks: Sequence[pl.Callback] = (),
    force: bool = False,
) -> FinetuneResult:
    """Fine-tune ``model_cfg``'s encoder on ``task``; write the artifacts (see module doc).

    ``model_cfg``: a ``ModelConfig`` (or its dict), or a built ``TaskModel``
    (never modified: a copy of its encoder trains).
    ``task``: ``TaskData``, ``TaskSpec`` or a dict of TaskSpec fields (loaded from ``data_root``).
    ``init_encoder_state``: where training starts (default θ0): the
    pretrained, a previous fine-tuned or a previous merged encoder.
    ``pretrained_encoder_state``: θ0 for the task vector (default: the
    model's encoder as built, i.e. its pretrained weights).
    ``seed``: default ``train_cfg.seed``. ``force``: retrain even if complete.
    """
    config = _train_config(train_cfg)
    seed = config.seed if seed is None else int(seed)
    out_dir = Path(out_dir)
    if isinstance(model_cfg, Mapping):
        model_cfg = from_dict(ModelConfig, model_cfg, where="model")
    model = build_model(model_cfg) if isinstance(model_cfg, ModelConfig) else model_cfg
    task_data = _resolve_task(task, data_root, seed)

    reference = model.encoder.state_dict()
    theta0 = dict(pretrained_encoder_state) if pretrained_encoder_state is not None else model.encoder_state_dict()
    check_state_dict_fits(reference, theta0, what="pretrained_encoder_state")
    init_state = dict(init_encoder_state) if init_encoder_state is not None else theta0
    check_state_dict_fits(reference, init_state, what="init_encoder_state")
    theta0_fp = fingerprint_tensors(theta0)
    init_fp = theta0_fp if init_state is theta0 else fingerprint_tensors(init_state)

    identity = {
        "format": METADATA_FORMAT,
        "model": {**model.describe(), **({"kwargs": model_cfg.kwargs} if isinstance(model_cfg, ModelConfig) else {})},
        "task": _task_identity(task_data),
        "train": {k: v for k, v in to_dict(config).items() if k not in COSMETIC_FIELDS},
        "seed": seed,
        "pretrained_encoder_sha256": theta0_fp,
        "init_encoder_sha256": init_fp,
    }
    config_hash = _config_hash(identity)
    if not force:
        meta = _completed(out_dir, config_hash)
        if meta is not None:
            log.info("%s: complete run with this configuration found; skipping training", out_dir)
            return FinetuneResult(out_dir, dict(meta.get("metrics", {})), meta, skipped=True)

    # ---- build the trainable copy
    pl.seed_everything(seed, workers=True, verbose=False)
    encoder = copy.deepcopy(model.encoder)
    encoder.load_state_dict(init_state)
    templates = getattr(task_data, "templates", None)
    if model.head_trainable:  # a new linear head, drawn from its own seeded generator
        head = model.make_head(task_data.classnames, templates, seed=seed)
    else:
        head = model.make_head(task_data.classnames, templates)
    module = FineTuneModule.from_task_model(model, head, config, num_classes=len(task_data.classnames), encoder=encoder)
    train_transform = model.preprocess(train=config.augment)
    eval_transform = model.preprocess(train=False)
    datamodule = TaskDataModule(
        task_data,
        train_transform=train_transform,
        eval_transform=eval_transform,
        batch_size=config.batch_size,
        eval_batch_size=config.eval_batch_size,
        num_workers=config.num_workers,
        seed=seed,
        cache=config.cache_tensors,
        pin_memory=config.pin_memory,
        persistent_workers=config.persistent_workers,
        prefetch_factor=config.prefetch_factor,
        augment=config.augment,
    )

    # ---- train (resuming an interrupted run of the same configuration)
    ckpt_dir = out_dir / "checkpoints" / config_hash[:16]
    last_ckpt = ckpt_dir / "last.ckpt"
    resumed_from_step = _usable_checkpoint_step(last_ckpt)
    resume_from = last_ckpt if resumed_from_step is not None else None
    checkpoint_cb = ModelCheckpoint(
        dirpath=str(ckpt_dir),
        save_last=True,
        save_top_k=0,
        every_n_train_steps=config.checkpoint_every_n_steps or config.max_steps,
    )
    loggers = make_loggers(out_dir, logger_cfg, name="logs")
    validate = config.val_check_interval is not None and datamodule.split("val") is not None
    trainer = pl.Trainer(
        max_steps=config.max_steps,
        max_epochs=-1,
        accelerator=config.accelerator,
        devices=config.devices,
        strategy=config.strategy,
        precision=config.precision,
        num_nodes=config.num_nodes,
        gradient_clip_val=config.grad_clip,
        deterministic=config.deterministic,
        logger=loggers,
        callbacks=[checkpoint_cb, *callbacks],
        enable_progress_bar=config.progress_bar,
        enable_model_summary=False,
        log_every_n_steps=min(config.log_every_n_steps, config.max_steps),  # short runs still log
        val_check_interval=config.val_check_interval if validate else None,
        check_val_every_n_epoch=None if validate else 1,
        limit_val_batches=None if validate else 0,
        num_sanity_val_steps=0,
        default_root_dir=str(out_dir),
        # the training sampler shards the global batch per rank itself (StepBatchSampler); Lightning would
        # otherwise try to wrap it in a DistributedSampler under DDP and fail
        use_distributed_sampler=False,
    )
    started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None, weights_only=True)
    except SystemExit:
        if trainer.interrupted:  # Lightning turns Ctrl+C into sys.exit(1) and ignores further SIGINTs
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt from None
        raise
    finally:
        finish_loggers(loggers)
    train_seconds = time.perf_counter() - started

    # gathers full weights under sharded strategies (FSDP); every rank must call it
    full_state = trainer.strategy.lightning_module_state_dict()
    if not trainer.is_global_zero:
        return FinetuneResult(out_dir, {}, {}, skipped=False)
    ft_state = {k[len("encoder."):]: v.detach().cpu() for k, v in full_state.items() if k.startswith("encoder.")}
    head_state = {k[len("head."):]: v.detach().cpu() for k, v in full_state.items() if k.startswith("head.")}
    check_state_dict_fits(reference, ft_state, what="fine-tuned encoder")

    # ---- metrics (plain loop, on the fine-tuned weights)
    final_head = model.load_head(head_state)
    metrics: dict[str, float] = {}
    for key in ("train/loss", "train/acc"):
        value = trainer.callback_metrics.get(key)
        if value is not None:
            metrics[key.replace("/", "_") + "_last"] = float(value)
    eval_batch = config.eval_batch_size or config.batch_size
    eval_device = trainer.strategy.root_device  # the accelerator training used (moves `model` there)
    for split in config.eval_splits:
        dataset = datamodule.split(split) if split != "train" else (
            datamodule.split("train") if not config.augment else None
        )
        if dataset is not None:
            metrics[f"{split}_acc"] = evaluate(model, ft_state, final_head, dataset, eval_batch, device=eval_device,
                                               num_workers=config.num_workers, precision=config.precision)

    # ---- artifacts
    task_vector = TaskVector.from_state_dicts(theta0, ft_state)
    tag = {"model": model.name, "task": task_data.name}
    save_state_dict(ft_state, out_dir / ENCODER_FILE, {"cl_merge_kind": "encoder", **tag})
    task_vector.save(out_dir / TASK_VECTOR_FILE, {**tag, "definition": "finetuned - pretrained"})
    save_state_dict(head_state, out_dir / HEAD_FILE, {"cl_merge_kind": "head", **tag})
    metadata = {
        **identity,
        "config_hash": config_hash,
        "classnames": list(task_data.classnames),
        "metrics": metrics,
        "global_step": int(trainer.global_step),
        "resumed_from_step": resumed_from_step or 0,
        "train_seconds": round(train_seconds, 3),
        "task_vector_norm": task_vector.norm(),
        "task_vector_definition": "fine-tuned encoder minus pretrained encoder (theta0), not minus the start state",
        "artifacts": {"encoder": ENCODER_FILE, "task_vector": TASK_VECTOR_FILE, "head": HEAD_FILE},
        "train_config": to_dict(config),
        "logging": to_dict(logger_cfg) if logger_cfg is not None else None,
        "versions": _versions(),
    }
    atomic_write_json(out_dir / METADATA_FILE, metadata)
    if not config.keep_checkpoints:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return FinetuneResult(out_dir, metrics, metadata, skipped=False)


def _usable_checkpoint_step(path: Path) -> int | None:
    """The global step a ``last.ckpt`` holds, or None when there is none or it
    does not load (truncated by a kill or a full disk): that one is removed
    with a warning and training starts over, instead of every rerun failing."""
    if not path.exists():
        return None
    try:
        # mmap: only the pickled structure is read, not every tensor
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        step = int(ckpt["global_step"])
    except Exception as exc:  # noqa: BLE001 (whatever a damaged file raises, the answer is the same)
        log.warning("%s does not load (%s); discarding it and training this stage from the start",
                    path, str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__)
        path.unlink(missing_ok=True)
        return None
    return step
