"""``cl-merge methods``: the merging strategies, their hyperparameters and papers."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the table as JSON")


def format_methods(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        mode = "incremental" if row["incremental"] else "batch"
        lines.append(f"{row['name']}  [{mode}]  {row['reference']}")
        if row.get("summary"):
            lines.append(f"    {row['summary']}")
        hparams = ", ".join(f"{k}={v!r}" for k, v in row["hparams"].items()) or "(no hyperparameters)"
        lines.append(f"    {hparams}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from cl_merge.merging import describe_methods

    rows = describe_methods()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        print(format_methods(rows))
    return 0
