#!/usr/bin/env python
"""Paper-style tables from run folders: methods x tasks, mean ± std over orders.

    python scripts/make_table.py runs/ --out tables/ [--no-per-task] [--digits 1] [--plots]

Every folder under the given paths that holds a ``metrics.json`` is a run
(docs/run_folder.md); runs are grouped by scenario and aggregated over their
orders/seeds. Writes ``<scenario>.md`` and ``<scenario>.csv`` and prints the
Markdown.
"""

from __future__ import annotations

import argparse
import sys

from cl_merge.errors import ClMergeError
from cl_merge.report import make_tables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run folders, or folders containing run folders")
    parser.add_argument("--out", default="tables", help="output folder (default: tables)")
    parser.add_argument("--no-per-task", dest="per_task", action="store_false", help="leave out per-task columns")
    parser.add_argument("--digits", type=int, default=1, help="decimals shown (default: 1)")
    parser.add_argument("--ddof", type=int, default=0, help="std degrees of freedom (0: population, 1: sample)")
    parser.add_argument("--plots", action="store_true", help="also plot average accuracy vs number of tasks")
    args = parser.parse_args(argv)
    try:
        written = make_tables(args.paths, args.out, per_task=args.per_task, digits=args.digits,
                              ddof=args.ddof, plots=args.plots)
    except ClMergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        if path.suffix == ".md":
            print(path.read_text())
    print("wrote " + ", ".join(map(str, written)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
