"""Lightning loggers for fine-tuning runs: CSV always, wandb when asked
(offline unless the config says ``wandb_mode: online``)."""

from __future__ import annotations

from pathlib import Path

import cl_merge._torchvision_compat  # noqa: F401  (before Lightning imports torchvision)
from pytorch_lightning.loggers import CSVLogger, Logger

from cl_merge.lit.config import LoggerConfig


def make_loggers(save_dir: str | Path, config: LoggerConfig | None = None, *, name: str = "logs") -> list[Logger]:
    """``[CSVLogger(save_dir/name)]`` plus a ``WandbLogger`` writing under
    ``save_dir`` when ``config.wandb`` is set. The wandb mode is passed
    explicitly, so a stray ``WANDB_MODE=online`` in the environment cannot
    make an offline config try to reach the servers."""
    config = config or LoggerConfig()
    save_dir = Path(save_dir)
    loggers: list[Logger] = [CSVLogger(save_dir=str(save_dir), name=name, version="")]
    if config.wandb:
        from pytorch_lightning.loggers import WandbLogger

        wandb_dir = save_dir / "wandb_runs"
        wandb_dir.mkdir(parents=True, exist_ok=True)
        loggers.append(
            WandbLogger(
                name=config.run_name,
                save_dir=str(wandb_dir),
                project=config.wandb_project,
                entity=config.wandb_entity,
                group=config.wandb_group,
                tags=list(config.wandb_tags) or None,
                mode=config.wandb_mode,
                log_model=False,  # checkpoints stay local; artifacts are our safetensors
            )
        )
    return loggers


def finish_loggers(loggers: list[Logger]) -> None:
    """Close wandb runs so the next fine-tune in this process starts its own."""
    for logger in loggers:
        experiment = getattr(logger, "_experiment", None)
        if type(logger).__name__ == "WandbLogger" and experiment is not None:
            experiment.finish()
