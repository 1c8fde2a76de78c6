"""The ``cl-merge`` command. Each subcommand lives in its own module with
``add_arguments(parser)`` and ``main(args) -> int``; imports are lazy so
``cl-merge merge`` never pays for Lightning or open_clip."""

from __future__ import annotations

import argparse
import importlib
import sys

DESCRIPTION = ("cl-merge: continual and multi-task learning by model merging "
               "(fine-tune, merge task vectors, evaluate).")

SUBCOMMANDS = {
    "merge": ("cl_merge.cli.merge_cmd", "merge checkpoints (safetensors, sharded or not) with any strategy"),
    "finetune": ("cl_merge.cli.finetune_cmd", "fine-tune one model on one task; write encoder + task vector"),
    "run": ("cl_merge.cli.run_cmd", "run a scenario (no argument: the offline default benchmark)"),
    "methods": ("cl_merge.cli.methods_cmd", "list merging strategies with their hyperparameters"),
    "convert": ("cl_merge.cli.convert_cmd", "rewrite a checkpoint (pickled modules too) as safetensors, optionally in another CLIP layout"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cl-merge", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sp = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sp)
        sp.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    from cl_merge.errors import ClMergeError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._module.main(args) or 0)
    except ClMergeError as exc:
        print(f"cl-merge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        from cl_merge.core.io import disk_full

        if not disk_full(exc):
            raise
        # a write outside the atomic writers (a Lightning checkpoint, a log): one line, not a traceback
        where = getattr(exc, "filename", None)
        print(f"cl-merge {args.command}: error: {where + ': ' if where else ''}no space left on device",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cl-merge {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
