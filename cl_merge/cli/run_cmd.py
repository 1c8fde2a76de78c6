"""``cl-merge run [SCENARIO] [key=value ...]``: run or resume a scenario.

With no scenario, runs the offline default benchmark (``scenarios/offline_default.yaml``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_SCENARIO = "offline_default"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", nargs="?", default=DEFAULT_SCENARIO,
                        help="scenario name (file in scenarios/) or path to a YAML file; default: %(default)s")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="scenario overrides, e.g. train.max_steps=100 eval.max_test=200")
    parser.add_argument("--out", type=Path, default=None,
                        help="run folder (default: runs/<scenario>); rerunning into it resumes")
    parser.add_argument("--data-root", default=None, help="dataset root (default: $CL_MERGE_DATA or ~/.cache/cl_merge/data)")
    parser.add_argument("--download", action="store_true", help="let torchvision download missing datasets")
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator for fine-tunes (cpu, gpu, auto)")
    parser.add_argument("--wandb", choices=["offline", "online", "disabled"], default="offline",
                        help="wandb mode (offline by default: no account or network needed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--list", action="store_true", help="list the available scenarios and exit")
    parser.add_argument("--stage", type=int, default=None,
                        help="only fine-tune this stage (0-based) from θ0 into the run folder and exit: "
                             "one job of a cluster job array (e.g. --stage $SLURM_ARRAY_TASK_ID); "
                             "a later plain run merges and evaluates")
    parser.add_argument("--order", type=int, default=0, help="with --stage: which order (0-based)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the scenario as the run would build it and print the plan (stages, "
                             "fine-tunes, merges, evaluations, disk); touches no data or weights, writes nothing")


def main(args: argparse.Namespace) -> int:
    from cl_merge.scenario import list_scenarios, load_scenario

    if args.list:
        for name in list_scenarios():
            print(name)
        return 0
    scenario = load_scenario(args.scenario, overrides=args.overrides)
    if args.dry_run:  # a real run validates the same way (runner.plan.validate_run) before writing anything
        from cl_merge.runner.plan import build_plan

        print(build_plan(scenario, args.accelerator).format())
        return 0
    from cl_merge.runner import RunOptions, run_scenario
    from cl_merge.runner.run import finetune_stage

    out = args.out or Path("runs") / scenario.name
    options = RunOptions(out_dir=out, data_root=args.data_root, download=args.download,
                         accelerator=args.accelerator, wandb_mode=args.wandb, progress=not args.no_progress)
    if args.stage is not None:
        where = finetune_stage(scenario, options, args.stage, args.order)
        print(f"stage {args.stage} fine-tuned into {where}")
        return 0
    run_scenario(scenario, options)
    return 0
