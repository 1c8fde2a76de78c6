"""What a run of a scenario will do, found without touching data or weights.

``build_plan(scenario, accelerator)`` resolves the scenario into the objects
a run builds — every merging strategy through ``cl_merge.merging.get_method``,
the fine-tuning recipe as a ``TrainConfig``, the model family and name (the
encoder is built on the ``meta`` device: shapes, no weights), the stages of
every order — and counts the work: fine-tunes, merges, evaluations, and the
disk the artifacts take. A problem is a ``ConfigError`` naming the field.

``cl-merge run S --dry-run`` prints ``plan.format()``; a real run calls
``validate_run`` first, so an invalid config fails before the run folder exists.
"""

from __future__ import annotations

import json

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from cl_merge.errors import ClMergeError, ConfigError

# artifacts each step leaves, in copies of the encoder (see cl_merge/runner/loop.py's layout)
# a fine-tune is stored once, as its encoder (the task vector is derived from it and θ0)
FINETUNE_COPIES = {"encoder.safetensors": 1}
_ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu")


@dataclasses.dataclass
class RunPlan:
    scenario: Any
    train: Any  # TrainConfig
    orders: list[list[Any]]
    chains: list[str]
    encoder_numel: int | None
    encoder_bytes: int | None
    finetunes: dict[str, int]  # chain kind -> fine-tunes over the whole run
    imported: int
    merges: dict[str, int]  # row -> merge steps over the whole run
    incremental: dict[str, bool]
    state_copies: dict[str, float]  # row -> strategy-state size over all stages of one order, in encoder copies
    evaluations: int  # (row, stage) records over the whole run
    task_evaluations: int
    missing_inputs: list[str]

    # ------------------------------------------------------------ disk
    def disk_bytes(self) -> dict[str, int] | None:
        """Bytes per artifact kind (None when the encoder size is unknown)."""
        if self.encoder_bytes is None:
            return None
        copy = self.encoder_bytes
        keep = self.scenario.keep
        n_finetunes = sum(self.finetunes.values()) + self.imported
        # keep.merged: last -> one merged model per method and order; all -> one per merge
        merged_files = sum(self.merges.values()) if keep.merged == "all" else len(self.merges) * len(self.orders)
        merged = merged_files * copy
        # keep.states: last -> the latest state per method and order (the peak while running; a finished
        # run keeps none); all -> every stage's state
        stages = max(1, len(self.scenario.stages))
        per_order = sum(self.state_copies.values()) if keep.states == "all" else \
            sum(c / stages for c in self.state_copies.values())
        states = per_order * len(self.orders) * copy
        return {
            "fine-tunes": int(n_finetunes * sum(FINETUNE_COPIES.values()) * copy),
            "merged models": int(merged),
            "strategy states": int(states),
        }

    def format(self) -> str:
        sc = self.scenario
        lines = [f"scenario {sc.name} ({_where(sc)}), fingerprint {sc.fingerprint()}"]
        lines.append(f"setting {sc.setting}, init {sc.init}, {len(self.orders)} order(s) of {len(sc.stages)} stages")
        model = f"model {sc.model.family} {sc.model.name} (pretrained {sc.model.pretrained})"
        if self.encoder_numel is not None:
            model += f": encoder {self.encoder_numel / 1e6:.1f}M parameters, {_size(self.encoder_bytes)} per copy"
        lines.append(model)
        t = self.train
        clip = "off" if t.grad_clip is None else t.grad_clip
        opt = f"{t.optimizer}" + (f" (momentum {t.momentum})" if t.optimizer == "sgd" else "")
        lines.append(f"training: {opt}, lr {t.lr:g}, weight decay {t.weight_decay:g}, batch {t.batch_size}, "
                     f"{t.max_steps} steps, {t.scheduler} (warm-up {t.warmup_steps}), grad clip {clip}, "
                     f"accelerator {t.accelerator}, precision {t.precision}")
        lines.append("orders:")
        shown = self.orders if len(self.orders) <= 12 else self.orders[:10]
        for k, stages in enumerate(shown):
            lines.append(f"  {k}: " + " -> ".join(s.name for s in stages))
        if len(shown) < len(self.orders):
            lines.append(f"  ... {len(self.orders) - len(shown)} more")
        parts = []
        for kind, n in self.finetunes.items():
            if n == 0:
                continue
            if kind == "independent":
                parts.append(f"{n} independent (from θ0, shared by every order)")
            else:
                parts.append(f"{n} {kind} ({n // max(1, len(self.orders))} per order)")
        total = sum(self.finetunes.values())
        lines.append(f"fine-tunes: {total}" + (f" = {' + '.join(parts)}" if parts else "")
                     + (f"; {self.imported} imported checkpoint(s)" if self.imported else ""))
        if self.merges:
            merges = ", ".join(f"{row} {n}" + ("" if self.incremental[row] else " (batch)")
                               for row, n in self.merges.items())
            lines.append(f"merges: {sum(self.merges.values())} ({merges})")
        else:
            lines.append("merges: none")
        lines.append(f"evaluations: {self.evaluations} (row, stage) records, {self.task_evaluations} task evaluations")
        disk = self.disk_bytes()
        if disk is None:
            lines.append("disk: not estimated (encoder size unknown for this model family)")
        else:
            detail = ", ".join(f"{kind} {_size(b)}" for kind, b in disk.items())
            lines.append(f"disk (estimate): {_size(sum(disk.values()))} ({detail})")
            every = self.train.checkpoint_every_n_steps
            if every and every <= self.train.max_steps:
                # weights + the optimizer's per-parameter state (Adam(W): two moments, SGD: momentum)
                optimizer_copies = {"adam": 2, "adamw": 2}.get(t.optimizer, 1 if t.momentum > 0 else 0)
                lines.append(f"  + while a fine-tune runs: its last.ckpt (weights and optimizer state) ≈ "
                             f"{_size(self.encoder_bytes * (1 + optimizer_copies))}, removed when it finishes")
        for problem in self.missing_inputs:
            lines.append(f"warning: {problem}")
        return "\n".join(lines)


def _size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# ---------------------------------------------------------------------- checks
def check_accelerator(accelerator: str) -> None:
    """``--accelerator gpu`` on a machine without one fails here, not after the run folder exists."""
    import torch

    name = str(accelerator).lower()
    if name not in _ACCELERATORS:
        raise ConfigError(f"accelerator: unknown accelerator {accelerator!r} (valid: {', '.join(_ACCELERATORS)})")
    if name in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"accelerator: {accelerator!r} asked for, but torch sees no CUDA GPU on this machine "
                          "(use --accelerator cpu or auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"accelerator: {accelerator!r} asked for, but MPS is not available on this machine")


def encoder_size(model_spec) -> tuple[int, int] | None:
    """(parameter count, bytes) of the family's mergeable encoder, built on
    the meta device (no weights read); None for a family this cannot build."""
    import torch

    import cl_merge  # noqa: F401  (torchvision shim before open_clip / timm)

    family, name = model_spec.family, model_spec.name
    try:
        with torch.device("meta"), _quiet_root_logger():
            if family == "clip":
                import open_clip

                from cl_merge.models import clip as _clip  # noqa: F401  (registers the toolkit configs)

                encoder = open_clip.create_model(name, pretrained=None, device="meta").visual
            elif family == "vit":
                import timm

                from cl_merge.models.vit import VIT_PRESETS

                arch, kwargs = VIT_PRESETS.get(name, (name, {}))
                encoder = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
            else:
                return None
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"model: cannot build {family} model {name!r}: {first[:200]}") from None
    state = encoder.state_dict()
    floats = [v for v in state.values() if v.is_floating_point()]
    return sum(v.numel() for v in floats), sum(v.numel() * v.element_size() for v in floats)


@contextlib.contextmanager
def _quiet_root_logger():
    """open_clip warns "No pretrained weights loaded" through the root logger; here that is the point."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def check_model(model_spec) -> None:
    """Family known, model name known, pretrained tag known — no weights read."""
    from cl_merge.models.base import ModelConfig

    try:
        ModelConfig(family=model_spec.family, name=model_spec.name)  # unknown family -> UnknownNameError
    except ClMergeError as exc:
        raise ConfigError(f"model.family: {exc}") from None
    if model_spec.family == "clip":
        import open_clip

        from cl_merge.models.clip import _is_hub_name, _known_tags
        from cl_merge.pretrain import OFFLINE_TAG

        if _is_hub_name(model_spec.name):
            return
        from cl_merge.errors import close_matches

        models = open_clip.list_models()
        if model_spec.name not in models:
            raise ConfigError(f"model.name: unknown CLIP model {model_spec.name!r}{close_matches(model_spec.name, models)}")
        tag = model_spec.pretrained
        if tag and tag != OFFLINE_TAG and not Path(str(tag)).expanduser().is_file():
            tags = _known_tags(model_spec.name)
            if tag not in tags:
                raise ConfigError(f"model.pretrained: unknown tag {tag!r} for CLIP model {model_spec.name!r} and "
                                  f"no such file{close_matches(str(tag), tags)} (available: {', '.join(tags) or 'none'})")
    elif model_spec.family == "vit":
        import timm

        from cl_merge.models.vit import VIT_PRESETS

        arch = VIT_PRESETS.get(model_spec.name, (model_spec.name, {}))[0]
        if not timm.is_model(arch):
            raise ConfigError(f"model.name: unknown timm model {model_spec.name!r} (see timm.list_models())")
        if model_spec.name in VIT_PRESETS and model_spec.pretrained:
            raise ConfigError(f"model.pretrained: {model_spec.name!r} is a toolkit preset with random init only")


# ---------------------------------------------------------------------- counting
def _chains(scenario, rows) -> dict[str, str]:
    """row name -> the fine-tune chain it merges (the rule of ``OrderRun._method_chain``)."""
    out = {}
    for row in rows:
        if row.kind != "method":
            continue
        if scenario.init == "pretrained" or scenario.setting == "multi_task":
            out[row.name] = "independent"
        elif scenario.init == "previous_finetuned":
            out[row.name] = "sequential"
        else:
            out[row.name] = f"merged-{row.name}"
    return out


def _stage_key(stage) -> tuple:
    # a user dataset is a mapping ({folder: ...} / {hf: ...}): key it by its sorted items
    dataset = json.dumps(stage.dataset, sort_keys=True) if isinstance(stage.dataset, dict) else stage.dataset
    return (dataset, tuple(sorted(stage.classes)) if stage.classes is not None else None,
            stage.variant, stage.k_shot)


def _state_copies(method, num_stages: int) -> float:
    """Size of an incremental strategy's saved states over ``num_stages``
    stages, in copies of the model: measured on a small stand-in model (the
    state's layout is per entry, so the ratio carries over). Data-based
    strategies need a model to run, so theirs is estimated at two copies per
    stage (Fisher's weighted sum and normaliser; RegMean's Gram sums are
    larger for wide layers)."""
    import torch

    from cl_merge.merging import build_strategy
    from cl_merge.merging.base import builds_own_strategy

    strategy = build_strategy(method)
    if "model" in strategy.needs:
        return 2.0 * num_stages
    generator = torch.Generator().manual_seed(0)
    # block-indexed keys, so depth-aware strategies (LiNeS) find their layers
    theta0 = {"blocks.0.w": torch.zeros(16, 8), "blocks.0.b": torch.zeros(16)}
    base_bytes = sum(v.numel() * v.element_size() for v in theta0.values())
    if not builds_own_strategy(method):
        from cl_merge.merging import IncrementalMerger

        if not method.supports_incremental():
            return 0.0
        strategy = IncrementalMerger(method, theta0)  # the state alone, without a strategy's bookkeeping
    else:
        strategy.start(theta0)
    total = 0.0
    for _ in range(num_stages):
        strategy.update({k: torch.randn(v.shape, generator=generator) for k, v in theta0.items()})
        state = strategy.state_dict() or {}
        total += sum(v.numel() * v.element_size() for v in state.values()) / base_bytes
    return total


def build_plan(scenario, accelerator: str = "auto") -> RunPlan:
    """Validate ``scenario`` as the run would build it and count its work (see
    module doc); a problem is a ``ConfigError`` naming the file and the field."""
    try:
        return _build_plan(scenario, accelerator)
    except ConfigError as exc:
        raise ConfigError(f"{_where(scenario)}: {exc}") from None


def _where(scenario) -> str:
    from cl_merge.scenario.loader import _display

    source = getattr(scenario, "source", None)
    return _display(Path(source)) if source is not None else f"scenario {scenario.name}"


def _build_plan(scenario, accelerator: str) -> RunPlan:
    from cl_merge.merging import get_method
    from cl_merge.runner.loop import scenario_rows
    from cl_merge.scenario import checkpoint_path

    try:
        train = scenario.train.to_train_config(seed=scenario.seed, accelerator=accelerator)
    except ClMergeError as exc:
        raise ConfigError(f"train: {exc}") from None
    check_accelerator(train.accelerator)
    check_model(scenario.model)
    size = encoder_size(scenario.model)
    orders = scenario.expand_orders()
    rows = scenario_rows(scenario)
    methods = {}
    for row in rows:
        if row.kind == "method":
            try:
                methods[row.name] = get_method(row.method, **row.hparams)
            except ClMergeError as exc:
                raise ConfigError(f"merge {row.name!r}: {exc}") from None
    chain_of = _chains(scenario, rows)
    chains = set(chain_of.values())
    if any(r.kind == "individual" for r in rows):
        chains.add("independent")
    if any(r.kind == "sequential_finetune" for r in rows):
        chains.add("sequential")
    multi_task = scenario.setting == "multi_task"
    num_stages = len(scenario.stages)

    trained = [[s for s in stages if s.checkpoint is None] for stages in orders]
    finetunes: dict[str, int] = {}
    for chain in sorted(chains):
        if chain == "independent":  # one per (task, seed), whatever the order
            finetunes[chain] = len({_stage_key(s) for stages in trained for s in stages})
        else:
            kind = "sequential" if chain == "sequential" else "merged-chain"
            finetunes[kind] = finetunes.get(kind, 0) + sum(len(stages) for stages in trained)
    imported = len({s.checkpoint for s in scenario.stages if s.checkpoint is not None})

    merge_steps = 1 if multi_task else num_stages
    merges = {name: merge_steps * len(orders) for name in methods}
    from cl_merge.merging import build_strategy

    incremental = {name: build_strategy(m).incremental and not multi_task for name, m in methods.items()}
    state_copies = {name: (_state_copies(methods[name], num_stages) if incremental[name] else 0.0)
                    for name in methods}

    eval_stages = [num_stages - 1] if multi_task else list(range(num_stages))
    records = len(rows) * len(eval_stages) * len(orders)
    task_evals = 0
    for row in rows:
        for t in eval_stages:
            if row.kind == "individual":
                task_evals += num_stages if multi_task else 1
            elif scenario.eval.forward_transfer or t == num_stages - 1:
                task_evals += num_stages
            else:
                task_evals += t + 1
    task_evals *= len(orders)

    missing = []
    for i, stage in enumerate(scenario.stages):
        path = checkpoint_path(scenario, stage)
        # a hub id (hf_clip) is looked up in the HF cache when the stage is imported
        if isinstance(path, Path) and not path.exists():
            missing.append(f"stages[{i}].checkpoint: {path} does not exist (the run would stop at this stage)")
    return RunPlan(scenario=scenario, train=train, orders=orders, chains=sorted(chains),
                   encoder_numel=size[0] if size else None, encoder_bytes=size[1] if size else None,
                   finetunes=finetunes, imported=imported, merges=merges, incremental=incremental,
                   state_copies=state_copies, evaluations=records, task_evaluations=task_evals,
                   missing_inputs=missing)


def _check_against_data(scenario, data_root) -> None:
    """What only the labels can tell, found before anything is written (no
    image is decoded): a ``k_shot`` larger than a class of the training split,
    a ``calibration:`` request larger than the split it samples. Data that is
    not there yet (``--download`` fetches it at the fine-tune) is not checked."""
    from cl_merge.data import load_task
    from cl_merge.errors import DataError
    from cl_merge.runner.evaluation import stage_task_spec
    from cl_merge.runner.loop import check_calibration_request

    cal = scenario.calibration
    for i, stage in enumerate(scenario.stages):
        if stage.k_shot is None and cal is None:
            continue
        spec = stage_task_spec(stage, scenario)
        # one label-only load per stage: the splits before k-shot and max_train (validation and test are
        # the run's own; only a train-split calibration under k_shot/max_train needs the run's exact view)
        full = dataclasses.replace(spec, k_shot=None, max_train=None)
        try:
            task = load_task(full, data_root, seed=scenario.seed)
            if stage.k_shot is not None:  # never set on an imported checkpoint's stage
                counts = np.bincount(task.train.labels, minlength=len(task.classnames))
                smallest = int(np.argmin(counts))
                if counts[smallest] < stage.k_shot:
                    raise ConfigError(f"{_where(scenario)}: stages[{i}].k_shot: {stage.k_shot} is larger than class "
                                      f"{smallest} ({task.classnames[smallest]!r}) of {stage.name}, which has "
                                      f"{int(counts[smallest])} training examples")
            if cal is not None:
                split = {"validation": "val"}.get(cal.split, cal.split)
                if split == "train" and full != spec:
                    task = load_task(spec, data_root, seed=scenario.seed)
                data = getattr(task, split, None)
                if data is not None:  # a missing split is refused at the scenario's load
                    check_calibration_request(cal, data, stage.name)
        except DataError:
            continue


def validate_run(scenario, accelerator: str = "auto", data_root=None) -> RunPlan:
    """``build_plan`` plus what a run needs to exist (stage checkpoints) and
    what only the labels can tell (``k_shot``, ``calibration:`` sizes): called
    before the run folder is created."""
    plan = build_plan(scenario, accelerator)
    _check_against_data(scenario, data_root)
    if plan.missing_inputs:
        raise ConfigError(f"{_where(scenario)}: {plan.missing_inputs[0].split(' (the run')[0]}")
    from cl_merge.core.io import CheckpointReader
    from cl_merge.scenario import checkpoint_path

    for i, stage in enumerate(scenario.stages):
        path = checkpoint_path(scenario, stage)
        # a safetensors header is read in microseconds: a truncated file fails now, not after earlier stages trained
        if isinstance(path, Path) and path.is_file() and path.suffix == ".safetensors":
            try:
                CheckpointReader(path).close()
            except ClMergeError as exc:
                raise ConfigError(f"{_where(scenario)}: stages[{i}].checkpoint: {exc}") from None
    return plan
