"""Time to resume a *finished* 20-stage run: every artifact is on disk, so a
rerun should only check files and rewrite the summary (seconds), whatever the
number of stages.

    PYTHONPATH=. python scripts/bench_resume.py --out /tmp/bench_resume [--stages 20] [--train]

A tiny continual scenario (the tiny CLIP config) with an independent and a
sequential chain (task arithmetic, TIES and the sequential fine-tuning
baseline), in the multi-task setting so that the rows are evaluated once. By default its stages bring synthetic fine-tuned checkpoints
(θ0 plus seeded noise), so building the finished run costs no training and the
rerun measures the runner alone; ``--train`` fine-tunes every stage for one
step instead (on a 2-core machine shared with others that takes long). The
script runs the scenario once untimed, then times a rerun into the same
folder, profiles it, and counts the entries into the fine-tune function and
the checkpoint loads. Only the public API is used, so the same script
measures an older checkout (point PYTHONPATH at it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import time
from pathlib import Path

import yaml


def scenario_body(num_stages: int, checkpoints: list[str] | None) -> dict:
    stages = [{"dataset": "digits", "name": f"digits{i:02d}"} for i in range(num_stages)]
    if checkpoints:
        for stage, path in zip(stages, checkpoints):
            stage["checkpoint"] = path
    return {
        "description": "resume benchmark",
        # multi-task: the rows are evaluated once, at the end, so building the finished run is cheap
        # on a shared 2-core machine; the chains (independent + sequential) are those of a continual run
        "setting": "multi_task",
        "model": {"family": "clip", "name": "clmerge-tiny-clip", "pretrained": None},
        "stages": stages,
        "init": "pretrained",
        "merge": [{"method": "task_arithmetic", "hyperparameters": {"scaling": 0.3}},
                  {"method": "ties", "hyperparameters": {"scaling": 1.0, "density": 0.5}}],
        "baselines": {"zero_shot": False, "individual": False, "sequential_finetune": True},
        "train": {"lr": 1.0e-3, "max_steps": 1, "batch_size": 8, "warmup_steps": 0, "max_train": 40},
        "eval": {"batch_size": 64, "max_test": 20},
        "seed": 0,
    }


def synthetic_checkpoints(folder: Path, num_stages: int) -> list[str]:
    import torch

    import cl_merge  # noqa: F401
    from cl_merge.core.io import save_state_dict
    from cl_merge.models import create_model

    theta0 = create_model("clip", "clmerge-tiny-clip", None, init_seed=0).encoder_state_dict()
    paths = []
    for i in range(num_stages):
        gen = torch.Generator().manual_seed(i)
        state = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                 for k, v in theta0.items()}
        paths.append(str(save_state_dict(state, folder / f"ft{i:02d}.safetensors")))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stages", type=int, default=20)
    parser.add_argument("--keep", action="store_true", help="reuse a finished run in --out instead of rebuilding it")
    parser.add_argument("--train", action="store_true", help="fine-tune every stage instead of synthetic checkpoints")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")

    import cl_merge  # noqa: F401  (torchvision shim first)
    from cl_merge.runner import RunOptions, run_scenario
    from cl_merge.scenario import load_scenario

    out = args.out
    if out.exists() and not args.keep:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}_scenario.yaml"
    checkpoints = None if args.train else synthetic_checkpoints(out, args.stages)
    path.write_text(yaml.safe_dump(scenario_body(args.stages, checkpoints)))
    scenario = load_scenario(path)
    calls = {"finetune": 0, "finetune_step": 0, "merge": 0, "evaluate": 0}

    def hook(kind, name):
        if kind in calls:
            calls[kind] += 1

    def options(**kw):
        return RunOptions(out_dir=out / "run", progress=False, wandb_mode="disabled", log=lambda m: None, **kw)

    started = time.perf_counter()
    if not (out / "run" / "metrics.json").exists():
        run_scenario(scenario, options())
    first = time.perf_counter() - started

    # the entry point is hashing + file reads: the profile says where the time goes
    import cProfile
    import pstats

    calls = dict.fromkeys(calls, 0)
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    run_scenario(scenario, options(hook=hook))
    profile.disable()
    resume = time.perf_counter() - started
    stats = pstats.Stats(profile)
    def entries(func: str, file_tail: str) -> int:
        return sum(v[0] for k, v in stats.stats.items() if k[2] == func and k[0].endswith(file_tail))

    finetune_entries = entries("finetune", os.path.join("lit", "finetune.py"))
    checkpoint_loads = entries("load_state_dict", os.path.join("core", "io.py"))
    result = {
        "stages": args.stages,
        "first_run_s": round(first, 2),
        "resume_s": round(resume, 2),
        "finetune_function_entries_on_resume": finetune_entries,
        "checkpoint_loads_on_resume": checkpoint_loads,
        "trained": args.train,
        "hook_calls_on_resume": calls,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "code": os.path.dirname(cl_merge.__file__),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
