"""Reporting: run-folder results, mean ± std over orders, tables and plots.

No Lightning here: everything works from ``metrics.json`` and
``accuracy_matrix*.csv`` files (see ``docs/run_folder.md``).
"""

from cl_merge.report.aggregate import Aggregate, AggregateRow, aggregate_runs, group_by_scenario, mean_std
from cl_merge.report.collect import collect, make_tables
from cl_merge.report.run_folder import (
    METRICS_FILE,
    ResultRecord,
    RunFolderError,
    RunRecord,
    find_run_folders,
    read_run_folder,
    write_run_folder,
)
from cl_merge.report.table import csv_text, markdown_table, print_summary, rich_table, write_csv, write_markdown

__all__ = [
    "Aggregate",
    "AggregateRow",
    "METRICS_FILE",
    "ResultRecord",
    "RunFolderError",
    "RunRecord",
    "aggregate_runs",
    "collect",
    "csv_text",
    "find_run_folders",
    "group_by_scenario",
    "make_tables",
    "markdown_table",
    "mean_std",
    "print_summary",
    "read_run_folder",
    "rich_table",
    "write_csv",
    "write_markdown",
    "write_run_folder",
]
