#!/usr/bin/env python
"""Data-based merging on the offline benchmark's six tasks (multi-task setting).

1. Runs ``scenarios/offline_default.yaml`` in the multi-task setting into
   ``--run-dir`` (the tiny CLIP θ0 is pretrained offline once and cached;
   each task is fine-tuned from θ0; a rerun finds everything done), with
   task arithmetic and the individual fine-tuned models as reference rows.
2. Merges the six task vectors with every method below through the strategy
   lifecycle and the merge context (encoder = the CLIP image tower, heads =
   the zero-shot heads), with calibration batches from each task's *train*
   split (Fisher, RegMean, RegMean++: ``--calib`` examples, batches of 32)
   or its unlabeled *test* inputs (AdaMerging, Surgery: transductive).
3. Reports the final average test accuracy, the wall time and the peak RSS
   above the level before the merge (sampled every 5 ms) of each merge.

    python scripts/bench_data_merging.py --run-dir /tmp/bench-data --steps 100
    python scripts/bench_data_merging.py --methods regmean,adamerging:granularity=task

A method spec is ``label=name:param=value:...`` or ``name:param=value``.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import cl_merge  # noqa: F401  (torchvision shim)
import torch
from _bench_runs import batches_of, open_order_run, split_tensors

DEFAULT_METHODS = (
    "task_arithmetic=task_arithmetic:scaling=0.3",
    "ties=ties:scaling=1.0:density=0.2",
    "fisher=fisher",
    "regmean=regmean",
    "regmean_plusplus=regmean_plusplus",
    "adamerging_task=adamerging:granularity=task",
    "adamerging_layer=adamerging:granularity=layer",
    "surgery=surgery:base_method=adamerging",
)


def parse_spec(spec: str, steps: int):
    label, _, rest = spec.partition("=") if "=" in spec.split(":")[0] else ("", "", spec)
    name, *params = rest.split(":")
    hparams = {}
    for p in params:
        k, v = p.split("=", 1)
        try:
            hparams[k] = json.loads(v)
        except json.JSONDecodeError:
            hparams[k] = v
    if name == "adamerging":
        hparams.setdefault("max_steps", steps)
    if name == "surgery":
        hparams.setdefault("steps", steps)
        base = dict(hparams.get("base_hyperparameters") or {})
        if hparams.get("base_method", "adamerging") == "adamerging":
            base.setdefault("max_steps", steps)
        hparams["base_hyperparameters"] = base or None
    return label or name, name, hparams


class PeakRSS:
    """Peak resident memory above the level at entry, sampled in a thread."""

    def __enter__(self):
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        return False

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/bench-data-merging"))
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--steps", type=int, default=100, help="AdaMerging / Surgery steps (papers: 1000)")
    parser.add_argument("--calib", type=int, default=256, help="calibration examples per task (Fisher, RegMean)")
    parser.add_argument("--fisher-estimator", default="exact", choices=["exact", "batch"])
    parser.add_argument("--finetune-steps", type=int, default=None, help="override train.max_steps (scenario: 100)")
    parser.add_argument("--max-train", type=int, default=None, help="override train.max_train (scenario: 2000)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    from cl_merge.merging import MergeContext, TaskInput, build_strategy, get_method
    from cl_merge.merging.base import PerTaskMergeResult
    from cl_merge.merging.surgery import SurgeryResult
    from cl_merge.runner.run import RunOptions, run_scenario
    from cl_merge.scenario.loader import find_scenario, scenario_from_dict
    import yaml

    raw = yaml.safe_load(find_scenario("offline_default").read_text())
    raw.update(setting="multi_task", merge=[{"method": "task_arithmetic", "hyperparameters": {"scaling": 0.3}}],
               baselines={"zero_shot": True, "individual": True, "sequential_finetune": False})
    if args.finetune_steps is not None:
        raw["train"]["max_steps"] = args.finetune_steps
    if args.max_train is not None:
        raw["train"]["max_train"] = args.max_train
    scenario = scenario_from_dict(raw, "offline_default (multi_task)", "offline_multi_task")
    options = RunOptions(out_dir=args.run_dir, data_root=args.data_root, wandb_mode="disabled", progress=False)
    t0 = time.perf_counter()
    run_scenario(scenario, options)  # prints zero-shot / individual / task arithmetic
    print(f"fine-tuning and reference rows: {time.perf_counter() - t0:.0f} s")

    order_run, stages = open_order_run(scenario, options)
    pool, model, theta0 = order_run.pool, order_run.model, order_run.theta0
    task_vectors = [dict(order_run.task_vector("independent", t)) for t in range(len(stages))]
    heads = [pool.head(stages, i, len(stages) - 1)[0] for i in range(len(stages))]
    # calibration: a seeded sample of each task's train split; test-time methods: its unlabeled test inputs
    train = [batches_of(split_tensors(order_run, stage, "train", args.calib, seed=scenario.seed + t)[0], 32)
             for t, stage in enumerate(stages)]
    test = [batches_of(split_tensors(order_run, stage, "test")[0], 16) for stage in stages]
    encoder = model.encoder.eval()
    context = MergeContext(module=encoder, heads=heads)

    def accuracy(result) -> list[float]:
        accs = []
        for i, stage in enumerate(stages):
            weights = result.task_state_dict(i) if isinstance(result, PerTaskMergeResult) else result
            wrap = (lambda head, i=i: result.wrap_head(i, head)) if isinstance(result, SurgeryResult) else None
            accs.append(100.0 * pool.accuracy(weights, stages, i, len(stages) - 1, wrap_head=wrap)[stage.name])
        model.load_encoder_state_dict(theta0)
        return accs

    rows = []
    for spec in args.methods.split(","):
        label, name, hparams = parse_spec(spec, args.steps)
        if name == "fisher":
            hparams.setdefault("estimator", args.fisher_estimator)
        if name in ("fisher", "regmean", "regmean_plusplus"):
            hparams.setdefault("num_examples", args.calib)
        method = get_method(name, **hparams)
        strategy = build_strategy(method)
        uses_test = strategy.data_split == "test"
        with PeakRSS() as memory:
            start = time.perf_counter()
            strategy.start(theta0, context if strategy.needs else None)
            for i, tv in enumerate(task_vectors):
                batches = (test[i] if uses_test else train[i]) if "data" in strategy.needs else None
                strategy.absorb(TaskInput(i, tv, name=stages[i].name, batches=batches, head=heads[i]))
            result = strategy.current()
            seconds = time.perf_counter() - start
        accs = accuracy(result)
        row = {"method": label, "hparams": method.hparams(), "accuracy": sum(accs) / len(accs),
               "per_task": dict(zip([s.name for s in stages], accs)), "merge_s": seconds,
               "peak_extra_mb": memory.extra_mb, "transductive": uses_test}
        history = getattr(strategy, "history", None)
        if history:
            row["loss_first_last"] = [history[0], history[-1]]
        rows.append(row)
        print(f"{label:18s} acc {row['accuracy']:5.1f}  merge {seconds:7.1f} s  peak +{memory.extra_mb:6.0f} MB"
              f"{'  (transductive)' if uses_test else ''}", flush=True)
    print()
    print("| method | final avg acc (%) | merge wall time (s) | peak extra RSS (MB) |")
    print("|---|---|---|---|")
    for row in rows:
        mark = " †" if row["transductive"] else ""
        print(f"| {row['method']}{mark} | {row['accuracy']:.1f} | {row['merge_s']:.1f} | {row['peak_extra_mb']:.0f} |")
    print("† transductive: learned on the unlabeled test inputs it is evaluated on")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "threads": torch.get_num_threads(),
                                         "cpu_count": os.cpu_count()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
