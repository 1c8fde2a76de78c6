"""``run_scenario``: every order of a scenario through the stage loop, then
the results: ``metrics.json`` + ``accuracy_matrix*.csv`` (see
``docs/run_folder.md``), plots, wandb (offline by default), a summary table.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable

from cl_merge.metrics import AccuracyMatrix
from cl_merge.runner.folder import RunFolder
from cl_merge.runner.loop import OrderRun, StepHook, _noop_hook, accuracy_rows


@dataclasses.dataclass
class RunOptions:
    out_dir: Path
    data_root: str | None = None
    download: bool = False
    accelerator: str = "auto"
    wandb_mode: str = "offline"  # offline | online | disabled
    progress: bool = True
    hook: StepHook = _noop_hook
    log: Callable[[str], None] = print
    resolved_accelerator: str | None = None  # set by the runner from accelerator / train.accelerator


def resolve_pretrained(scenario, options: RunOptions):
    """The scenario's model spec with the offline tag replaced by the cached
    weights file (pretraining them first, once)."""
    from cl_merge.pretrain import OFFLINE_TAG, ensure_offline_clip

    spec = scenario.model
    pretrained = spec.pretrained
    if spec.family == "clip" and pretrained == OFFLINE_TAG:
        pretrained = str(ensure_offline_clip(data_root=options.data_root, progress=options.progress,
                                             log=options.log))
    return pretrained


def resolve_device(scenario, options: RunOptions) -> tuple[str, "torch.device"]:
    """(Lightning accelerator name, torch device) the run uses for fine-tunes,
    evaluation and merging. ``--accelerator`` wins over the scenario's
    ``train.accelerator``; ``auto`` is CUDA when available, else the CPU."""
    import torch

    from cl_merge.errors import ConfigError

    name = options.accelerator if options.accelerator not in (None, "auto") else (
        getattr(scenario.train, "accelerator", None) or "auto")
    name = str(name).lower()
    if name == "auto":
        name = "gpu" if torch.cuda.is_available() else "cpu"
    if name in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"accelerator {name!r}: no CUDA GPU is visible to this process (use cpu or auto)")
        return "gpu", torch.device("cuda")
    if name == "mps":
        return "mps", torch.device("mps")
    if name == "cpu":
        return "cpu", torch.device("cpu")
    raise ConfigError(f"accelerator: unknown value {name!r} (valid: auto, cpu, gpu, cuda, mps)")


@dataclasses.dataclass
class _RunSetup:
    """What every order of one run shares: folders, θ0, the model on its
    device, and the rows (each method's strategy built once)."""

    root: Path
    top: RunFolder
    pretrained: Any
    model: Any
    theta0: dict
    device: Any
    rows: list


def _setup(scenario, options: RunOptions, lock: bool = True) -> _RunSetup:
    from cl_merge.models import create_model
    from cl_merge.runner.loop import scenario_rows
    from cl_merge.runner.plan import validate_run

    validate_run(scenario, options.accelerator, options.data_root)  # before the run folder exists: a bad config leaves nothing behind
    accelerator, device = resolve_device(scenario, options)
    options.resolved_accelerator = accelerator
    root = Path(options.out_dir)
    top = RunFolder(root, scenario.fingerprint(), scenario.to_dict(), lock=lock)
    pretrained = resolve_pretrained(scenario, options)
    model = create_model(scenario.model.family, scenario.model.name, pretrained, init_seed=scenario.seed)
    theta0 = model.encoder_state_dict()  # on the CPU, where the artifacts and the merge inputs live
    # merges stream tensor by tensor to the configured device (results back on the CPU)
    rows = scenario_rows(scenario, device=device)
    return _RunSetup(root, top, pretrained, model, theta0, device, rows)


def _order_run(scenario, stages, folder, setup: _RunSetup, options: RunOptions) -> OrderRun:
    from cl_merge.runner.evaluation import TaskPool
    from cl_merge.runner.finetuning import StageFinetuner

    model = setup.model
    finetuner = StageFinetuner(scenario, setup.pretrained, model, folder, options)
    # evaluation on the configured device even when no fine-tune runs in this
    # process (resume, imported checkpoints, --stage jobs)
    pool = TaskPool(scenario, model, data_root=options.data_root, download=options.download,
                    head_loader=finetuner.head_loader, device=setup.device, precision=scenario.train.precision,
                    num_workers=scenario.train.num_workers)
    pool.theta0 = setup.theta0
    finetuner.pool = pool
    order_run = OrderRun(scenario, stages, folder, pool, finetuner=finetuner, hook=options.hook,
                         progress=options.progress, log=options.log, rows=setup.rows, shared=setup.top,
                         model=model, device=setup.device)
    finetuner.order_run = order_run
    return order_run


def _order_folder(scenario, setup: _RunSetup, index: int, num_orders: int, lock: bool = True) -> RunFolder:
    if num_orders == 1:
        return setup.top
    return RunFolder(setup.root / f"order-{index:02d}", scenario.fingerprint(), scenario.to_dict(), lock=lock)


def finetune_stage(scenario, options: RunOptions, stage_index: int, order_index: int = 0) -> Path:
    """Fine-tune one stage of the ``independent`` chain into the run folder
    and stop: one job of a cluster job array. Independent fine-tunes are
    shared by every order (``<run>/finetune/independent/<task>/``), so
    ``--order`` only picks which task stage ``stage_index`` is. ``cl-merge run``
    on the same folder afterwards finds these fine-tunes done and only merges
    and evaluates."""
    from cl_merge.errors import ConfigError

    orders = scenario.expand_orders()
    if not 0 <= order_index < len(orders):
        raise ConfigError(f"--order {order_index} is out of range: the scenario has {len(orders)} order(s)")
    stages = orders[order_index]
    if not 0 <= stage_index < len(stages):
        raise ConfigError(f"--stage {stage_index} is out of range: the scenario has {len(stages)} stages")
    # a job of an array: no run-wide lock, each fine-tune locks its own artifact
    setup = _setup(scenario, options, lock=False)
    folder = _order_folder(scenario, setup, order_index, len(orders), lock=False)
    order_run = _order_run(scenario, stages, folder, setup, options)
    if "independent" not in order_run.chains():
        raise ConfigError(
            f"scenario init is {scenario.init!r}: stage {stage_index} depends on the previous stage, "
            "so stages cannot be fine-tuned as independent jobs"
        )
    return order_run.finetuned("independent", stage_index)


def _quiet_lightning() -> None:
    """The runner prints its own one line per fine-tune; Lightning's per-fit
    banners (GPU available, tips) would bury the summary."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_scenario(scenario, options: RunOptions):
    """Run (or resume) ``scenario`` into ``options.out_dir``; returns the RunRecords."""
    _quiet_lightning()
    from cl_merge.report import aggregate_runs, print_summary

    fingerprint = scenario.fingerprint()
    setup = _setup(scenario, options)
    root = setup.root
    orders = scenario.expand_orders()
    logger = _RunLogger(scenario, root, options.wandb_mode)
    records = []
    for index, stages in enumerate(orders):
        folder = _order_folder(scenario, setup, index, len(orders))
        if len(orders) > 1:
            options.log(f"order {index + 1}/{len(orders)}: {' -> '.join(s.name for s in stages)}")
        order_run = _order_run(scenario, stages, folder, setup, options)
        raw = order_run.run()
        record = build_run_record(scenario, order_run, raw, index, fingerprint, folder.root)
        from cl_merge.report import write_run_folder

        write_run_folder(folder.root, record)
        write_plots(record, folder.root)
        logger.log_order(record)
        records.append(record)
    if len(orders) > 1:
        from cl_merge.report import write_csv, write_markdown
        from cl_merge.report.plots import plot_aggregate_curves

        aggregate = aggregate_runs(records)
        write_markdown(aggregate, root / "summary.md")
        write_csv(aggregate, root / "summary.csv")
        plot_aggregate_curves(aggregate, root / "plots" / "accuracy_vs_tasks.png", title=scenario.name)
        print_summary(aggregate, per_task=False)
    else:
        from cl_merge.report import write_csv, write_markdown

        write_markdown(records[0], root / "summary.md")
        write_csv(records[0], root / "summary.csv")
        print_summary(records[0], per_task=False)
    logger.finish()
    options.log(f"results in {root}")
    return records


def build_run_record(scenario, order_run: OrderRun, raw, order_index: int, fingerprint: str, folder: Path):
    from cl_merge.report import ResultRecord, RunRecord

    tasks = order_run.task_names
    matrices = accuracy_rows(raw, tasks)
    aware = accuracy_rows(raw, tasks, suffix="/task_aware") if scenario.setting == "class_incremental" else {}
    final_only = not order_run.eval_every_stage

    def per_task(row_name):
        matrix = matrices.get(row_name)
        if not matrix:
            return None
        return {task: matrix[-1][i] for i, task in enumerate(tasks) if not math.isnan(matrix[-1][i])}

    reference = per_task("zero_shot")
    individual = per_task("individual")
    results = []
    for row in order_run.rows:
        kind = "method" if row.kind == "method" else "baseline"
        views = [(matrices.get(row.name), None)]
        if scenario.setting == "class_incremental":
            views = [(matrices.get(row.name), "task_agnostic"), (aware.get(row.name), "task_aware")]
        for values, acc_type in views:
            if not values:
                continue
            hparams = dict(row.hparams)
            if row.kind == "method":
                last = raw[row.name][max(raw[row.name])]
                if last.get("scaling") is not None:
                    hparams["scaling"] = last["scaling"]
            if final_only or row.kind == "zero_shot":
                final = {t: values[-1][i] for i, t in enumerate(tasks) if not math.isnan(values[-1][i])}
                results.append(ResultRecord.from_per_task(row.name, final, kind=kind, method=row.method,
                                                          hyperparameters=hparams, individual=individual,
                                                          accuracy_type=acc_type))
                continue
            matrix = AccuracyMatrix.from_numpy(values, tasks, stages=list(tasks[:len(values)]))
            results.append(ResultRecord.from_matrix(row.name, matrix, kind=kind, method=row.method,
                                                    hyperparameters=hparams, reference=reference,
                                                    individual=individual, accuracy_type=acc_type))
        if raw.get(row.name) and any(rec.get("transductive") for rec in raw[row.name].values()):
            for res in results:
                if res.name == row.name:
                    res.metrics["transductive"] = True
    return RunRecord(scenario=scenario.name, tasks=list(tasks), results=results, order_index=order_index,
                     fingerprint=fingerprint, setting=scenario.setting, seed=scenario.seed, folder=folder)


def write_plots(record, folder: Path) -> None:
    from cl_merge.report.plots import plot_accuracy_curves, plot_accuracy_matrix

    curves = {}
    for res in record.results:
        if res.matrix is None:
            continue
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in res.label)
        plot_accuracy_matrix(res.matrix, folder / "plots" / f"accuracy_matrix.{safe}.png", title=res.label)
        curve = res.metrics.get("accuracy_curve")
        if curve is None:
            arr = res.matrix.to_numpy()
            curve = [float(sum(x for x in arr[t, : t + 1]) / (t + 1)) for t in range(arr.shape[0])]
        curves[res.label] = curve
    if curves:
        plot_accuracy_curves(curves, folder / "plots" / "accuracy_vs_tasks.png", title=record.scenario)


class _RunLogger:
    """wandb for the whole run (offline unless asked otherwise; never needs an
    API key) — the fine-tunes log through Lightning's own loggers."""

    def __init__(self, scenario, root: Path, mode: str):
        self.run = None
        if mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project="cl_merge", name=scenario.name, dir=str(root), mode=mode,
                              config=scenario.to_dict(), reinit="finish_previous")

    def log_order(self, record) -> None:
        if self.run is None:
            return
        for res in record.results:
            for key, value in res.metrics.items():
                if isinstance(value, (int, float)) and value is not None:
                    self.run.summary[f"order{record.order_index}/{res.label}/{key}"] = value

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
