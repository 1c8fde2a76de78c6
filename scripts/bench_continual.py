#!/usr/bin/env python
"""Continual merging strategies side by side: accuracy, BWT and memory.

``accuracy``: the offline benchmark (``scenarios/offline_default.yaml``, a
tiny CLIP on six offline tasks). Its six independent fine-tunes (from θ0) are
taken from the run folder (``--run``, default ``runs/offline_default``, the
folder ``cl-merge run offline_default`` writes; missing ones are fine-tuned
into it first). Every strategy then absorbs the task vectors one stage at a
time in several task orders (order 0: the scenario's; the others seeded
permutations) through the strategy lifecycle (``build_strategy`` /
``absorb`` / ``current``), and the merged encoder is evaluated on the tasks
seen so far after each stage: final average accuracy and backward transfer
(mean ± std over orders), and the size of each strategy's saved state
relative to the model. CoFiMA gets the encoder as its model, each task's
zero-shot head and labeled calibration batches from the task's training
split (``--calibration`` examples).

``memory``: synthetic task vectors with the shapes of open_clip's ViT-B/32
visual tower (``--layers`` blocks of width 768; 12 is the full model), one
generated per stage and absorbed, for 20 stages; per stage the peak RSS
above the level before the first stage (VmHWM, reset each stage) and the
saved state's size. Flat for incremental strategies; a batch strategy (WUDI,
which keeps every task vector) grows. DOP runs one Adam step per matrix
here (its memory does not depend on the number of steps).

    python scripts/bench_continual.py accuracy --orders 3
    python scripts/bench_continual.py accuracy --run runs/bench_small --set train.max_steps=30
    python scripts/bench_continual.py memory --layers 2 --stages 20
    python scripts/bench_continual.py all --json results.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

ACCURACY_METHODS = [
    ("continual TA", "task_arithmetic", {"scaling": 0.3}),
    ("continual TIES", "ties", {"scaling": 1.0, "density": 0.2}),
    ("MagMax", "magmax", {"scaling": 0.5}),
    ("OPCM", "opcm", {"alpha": 0.5}),
    ("DOP", "dop", {}),
    ("CoFiMA", "cofima", {}),
]
MEMORY_METHODS = [
    ("continual TA", "task_arithmetic", {}),
    ("continual TIES", "ties", {}),
    ("MagMax", "magmax", {}),
    ("OPCM", "opcm", {}),
    ("DOP (1 step)", "dop", {"num_steps": 1}),
    ("WUDI (batch, 1 step)", "wudi", {"num_steps": 1}),
]


# ----------------------------------------------------------------- accuracy
def calibration_batches(order_run, stage, examples: int, batch_size: int = 32):
    from _bench_runs import batches_of, split_tensors

    inputs, labels = split_tensors(order_run, stage, "train", examples)
    return batches_of(inputs, batch_size), batches_of(labels, batch_size)


def run_accuracy(args) -> dict:
    import torch

    import cl_merge  # noqa: F401
    from cl_merge.merging import MergeContext, TaskInput, build_strategy, get_method
    from cl_merge.metrics import backward_transfer, final_average_accuracy
    from _bench_runs import open_order_run
    from cl_merge.runner import RunOptions
    from cl_merge.scenario import load_scenario
    from cl_merge.scenario.orders import seeded_permutation

    torch.set_num_threads(args.threads)
    scenario = load_scenario(args.scenario, overrides=args.set)
    options = RunOptions(out_dir=Path(args.run), data_root=args.data_root, wandb_mode="disabled", progress=False,
                         log=lambda msg: print(msg, flush=True))
    order_run, stages = open_order_run(scenario, options)
    model = order_run.model
    t0 = time.time()
    vectors = {stage.name: order_run.task_vector("independent", t) for t, stage in enumerate(stages)}
    print(f"task vectors ready ({time.time() - t0:.0f} s)", flush=True)
    pool = order_run.pool
    theta0 = order_run.theta0
    model_numel = sum(v.numel() for v in theta0.values() if v.is_floating_point())
    calib = {s.name: calibration_batches(order_run, s, args.calibration) for s in stages}

    orders = [list(range(len(stages)))] + [seeded_permutation(len(stages), "bench_continual", k)
                                           for k in range(1, args.orders)]
    results = {}
    for label, method, hp in ACCURACY_METHODS:
        if args.methods and method not in args.methods:
            continue
        finals, bwts, seconds, state_ratio = [], [], 0.0, None
        for order in orders:
            ordered = [stages[i] for i in order]
            strategy = build_strategy(get_method(method, **hp), continual=True)
            context = MergeContext(module=model.encoder, device=model.device)
            strategy.start(theta0, context if strategy.needs else None)
            matrix = [[math.nan] * len(ordered) for _ in ordered]
            for t, stage in enumerate(ordered):
                batches, labels = calib[stage.name]
                head = pool.head(ordered, t, t)[0]
                start = time.time()
                strategy.absorb(TaskInput(t, vectors[stage.name], name=stage.name, batches=batches, labels=labels,
                                          head=head))
                weights = strategy.current()
                seconds += time.time() - start
                for i in range(t + 1):
                    matrix[t][i] = pool.accuracy(weights, ordered, i, t)[ordered[i].name]
            state = strategy.state_dict()
            if state is not None:
                state_ratio = sum(v.numel() for k, v in state.items() if v.dim() > 0) / model_numel
            finals.append(final_average_accuracy(matrix))
            bwts.append(backward_transfer(matrix))
        results[label] = {"method": method, "hyperparameters": hp, "final_accuracy": finals,
                          "backward_transfer": bwts, "merge_seconds": seconds, "state_x_model": state_ratio}
        print(f"{label:16s} final {_mean_std(finals)}  BWT {_mean_std(bwts)}  "
              f"merge {seconds:.1f} s  state {state_ratio if state_ratio is None else round(state_ratio, 2)}x",
              flush=True)
    return {"scenario": scenario.name, "tasks": [s.name for s in stages],
            "orders": [[stages[i].name for i in o] for o in orders], "results": results}


def _mean_std(values) -> str:
    values = [100 * v for v in values]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return f"{mean:5.1f} ± {std:4.1f}"


# ----------------------------------------------------------------- memory (worker)
def memory_worker(method: str, hp: dict, layers: int, stages: int, threads: int, seed: int = 0) -> dict:
    import torch

    import cl_merge  # noqa: F401
    from bench_merge import _status_kb, vit_visual_shapes
    from cl_merge.merging import build_strategy, get_method

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)
    theta0 = {k: 0.02 * torch.randn(s, generator=gen) for k, s in vit_visual_shapes(768, layers).items()}
    strategy = build_strategy(get_method(method, **hp), continual=True)
    strategy.start(theta0)
    base_kb = _status_kb("VmRSS")
    rows = []
    for t in range(stages):
        with open("/proc/self/clear_refs", "w") as handle:  # resets VmHWM to the current RSS
            handle.write("5")
        tv = {k: 1e-3 * torch.randn(v.shape, generator=gen) for k, v in theta0.items()}
        start = time.time()
        strategy.update(tv)
        del tv
        merged = strategy.current()
        seconds = time.time() - start
        del merged
        state = strategy.state_dict()
        state_bytes = (sum(v.numel() * v.element_size() for v in state.values())
                       if state is not None else None)
        del state
        rows.append({"stage": t + 1, "peak_mb": (_status_kb("VmHWM") - base_kb) / 1024, "seconds": seconds,
                     "state_mb": None if state_bytes is None else state_bytes / 2 ** 20})
    model_mb = sum(v.numel() * v.element_size() for v in theta0.values()) / 2 ** 20
    return {"model_mb": model_mb, "rows": rows}


def run_memory(args) -> dict:
    out = {}
    for label, method, hp in MEMORY_METHODS:
        if args.methods and method not in args.methods:
            continue
        cmd = [sys.executable, __file__, "_memory_worker", method, json.dumps(hp), str(args.layers), str(args.stages),
               str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
        if proc.returncode != 0:
            print(f"{label}: failed\n{proc.stderr[-2000:]}", flush=True)
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        out[label] = result
        picks = [r for r in result["rows"] if r["stage"] in (2, 5, 10, 20)]
        print(f"{label:22s} model {result['model_mb']:.0f} MB | peak above start at stage "
              + ", ".join(f"{r['stage']}: {r['peak_mb']:.0f} MB" for r in picks)
              + f" | state {picks[-1]['state_mb'] if picks[-1]['state_mb'] is None else round(picks[-1]['state_mb'])} MB"
              + f" | {sum(r['seconds'] for r in result['rows']) / len(result['rows']):.1f} s/stage", flush=True)
    return out


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_memory_worker":
        _, _, method, hp, layers, stages, threads = sys.argv
        print(json.dumps(memory_worker(method, json.loads(hp), int(layers), int(stages), int(threads))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["accuracy", "memory", "all"])
    parser.add_argument("--scenario", default="offline_default")
    parser.add_argument("--run", default="runs/offline_default", help="run folder holding (or receiving) the fine-tunes")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="scenario override, e.g. train.max_steps=30 (a new fingerprint: a new run folder)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--orders", type=int, default=3)
    parser.add_argument("--calibration", type=int, default=256, help="CoFiMA: labeled train examples per task")
    parser.add_argument("--layers", type=int, default=2, help="memory: ViT-B/32 blocks (12 = the full tower)")
    parser.add_argument("--stages", type=int, default=20)
    parser.add_argument("--methods", type=lambda s: s.split(","), default=None, help="registry names to run")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 on a shared machine: more spin against each other when oversubscribed)")
    parser.add_argument("--json", type=Path, default=None, help="write all numbers here")
    args = parser.parse_args(argv)
    report = {}
    if args.what in ("accuracy", "all"):
        report["accuracy"] = run_accuracy(args)
    if args.what in ("memory", "all"):
        report["memory"] = run_memory(args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
