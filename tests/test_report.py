"""Run folders, aggregation over orders, tables, plots and scripts/make_table.py."""

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

import cl_merge  # noqa: F401
from cl_merge.metrics import AccuracyMatrix
from cl_merge.report import (
    ResultRecord,
    RunFolderError,
    RunRecord,
    aggregate_runs,
    collect,
    csv_text,
    make_tables,
    markdown_table,
    mean_std,
    print_summary,
    read_run_folder,
    write_run_folder,
)
from cl_merge.report.plots import plot_accuracy_curves, plot_accuracy_matrix, plot_aggregate_curves

TASKS = ["a", "b", "c"]
ZERO_SHOT = {"a": 0.10, "b": 0.15, "c": 0.25}
INDIVIDUAL = {"a": 0.95, "b": 0.90, "c": 1.00}
REPO = Path(cl_merge.__file__).parent.parent


def make_run(order, values, order_index=0, fingerprint="f" * 16):
    """A run whose tasks come in ``order``; ``values`` is the 3x3 matrix in that order."""
    matrix = AccuracyMatrix.from_numpy(values, order)
    results = [
        ResultRecord.from_matrix("ties", matrix, method="ties", hyperparameters={"density": 0.2},
                                 reference=ZERO_SHOT, individual=INDIVIDUAL),
        ResultRecord.from_per_task("zero_shot", {t: ZERO_SHOT.get(t, 0.1) for t in order}),
        ResultRecord.from_per_task("individual", {t: INDIVIDUAL.get(t, 0.9) for t in order}, individual=INDIVIDUAL),
    ]
    return RunRecord(scenario="toy", tasks=list(order), results=results, order_index=order_index,
                     fingerprint=fingerprint, setting="task_incremental", seed=0)


A3 = [[0.90, 0.20, 0.30], [0.80, 0.85, 0.35], [0.70, 0.75, 0.95]]
# same accuracies per task name, in the order c, a, b; task c now ends at 0.65
A3_OTHER = [[0.95, 0.30, 0.20], [0.85, 0.90, 0.30], [0.65, 0.80, 0.85]]


def test_write_and_read_run_folder(tmp_path):
    run = make_run(TASKS, A3)
    metrics_path = write_run_folder(tmp_path / "run0", run)
    body = json.loads(metrics_path.read_text())
    assert body["format"] == "cl_merge.run/1" and body["tasks"] == TASKS
    assert [r["name"] for r in body["results"]] == ["ties", "zero_shot", "individual"]
    ties = body["results"][0]
    assert ties["accuracy_matrix"] == "accuracy_matrix.csv"  # only one result has a matrix
    assert ties["metrics"]["final_accuracy"] == pytest.approx(0.8)
    assert ties["metrics"]["forward_transfer"] == pytest.approx(0.075)
    assert ties["per_task"] == pytest.approx({"a": 0.70, "b": 0.75, "c": 0.95})
    assert body["results"][2]["metrics"]["normalized_accuracy"] == pytest.approx(1.0)
    back = read_run_folder(tmp_path / "run0")
    assert back.result("ties").matrix.get(1, "b") == 0.85
    assert back.result("zero_shot").kind == "baseline"
    assert back.result("zero_shot").matrix is None


def test_several_matrices_and_task_aware(tmp_path):
    run = make_run(TASKS, A3)
    matrix = AccuracyMatrix.from_numpy(A3, TASKS)
    run.results.append(ResultRecord.from_matrix("ties", matrix, accuracy_type="task_aware"))
    write_run_folder(tmp_path, run)
    names = sorted(p.name for p in tmp_path.glob("accuracy_matrix*.csv"))
    assert names == ["accuracy_matrix.ties.csv", "accuracy_matrix.ties.task_aware.csv"]
    back = read_run_folder(tmp_path)
    assert [r.label for r in back.results] == ["ties", "zero_shot", "individual", "ties [task-aware]"]


def test_single_method_form_is_read(tmp_path):
    AccuracyMatrix.from_numpy(A3, TASKS).to_csv(tmp_path / "accuracy_matrix.csv")
    (tmp_path / "metrics.json").write_text(json.dumps({
        "scenario": "toy", "method": "magmax", "order_index": 2, "tasks": TASKS,
        "metrics": {"final_accuracy": 0.8}, "per_task": {"a": 0.7, "b": 0.75, "c": 0.95},
        "baselines": {"zero_shot": {"per_task": ZERO_SHOT, "metrics": {"final_accuracy": 0.1667}}},
    }))
    run = read_run_folder(tmp_path)
    assert run.order_index == 2
    assert run.result("magmax").matrix.shape == (3, 3)
    assert run.result("zero_shot").kind == "baseline"


@pytest.mark.parametrize(
    "body, message",
    [
        ({"tasks": TASKS, "results": []}, "missing field 'scenario'"),
        ({"scenario": "toy", "tasks": TASKS}, "needs 'results'"),
        ({"scenario": "toy", "tasks": TASKS, "results": [{"name": "x", "per_task": {"a": 72.4}}]},
         "outside [0, 1] (store fractions, not percent)"),
        ({"scenario": "toy", "tasks": TASKS, "results": [{"name": "x", "accuracy_matrix": "nope.csv"}]},
         "nope.csv: accuracy matrix file not found"),
    ],
)
def test_bad_run_folders(tmp_path, body, message):
    (tmp_path / "metrics.json").write_text(json.dumps(body))
    with pytest.raises(RunFolderError) as info:
        read_run_folder(tmp_path)
    assert message in str(info.value) and "metrics.json" in str(info.value)


def test_mean_std():
    assert mean_std([0.5, 0.7]) == pytest.approx((0.6, 0.1))
    assert mean_std([0.5, 0.7], ddof=1) == pytest.approx((0.6, np.std([0.5, 0.7], ddof=1)))
    assert mean_std([None, float("nan")]) == (None, None)
    assert mean_std([0.4]) == (0.4, 0.0)


def test_aggregate_matches_tasks_by_name():
    runs = [make_run(TASKS, A3, 0), make_run(["c", "a", "b"], A3_OTHER, 1)]
    agg = aggregate_runs(runs)
    assert agg.tasks == TASKS and agg.num_runs == 2
    ties = agg.row("ties")
    # final accuracies: run 0 -> a .70 b .75 c .95; run 1 (order c, a, b) -> c .65 a .80 b .85
    assert ties.per_task["a"] == pytest.approx((0.75, 0.05))
    assert ties.per_task["c"] == pytest.approx((0.80, 0.15))
    assert ties.metrics["final_accuracy"] == pytest.approx(((0.8 + 2.3 / 3) / 2, abs(0.8 - 2.3 / 3) / 2))
    assert ties.curve_mean == pytest.approx([(0.90 + 0.95) / 2, (0.825 + 0.875) / 2, (0.8 + 2.3 / 3) / 2])
    assert [r.label for r in agg.rows] == ["ties", "zero_shot", "individual"]
    with pytest.raises(RunFolderError, match="different config fingerprints"):
        aggregate_runs([make_run(TASKS, A3, 0), make_run(TASKS, A3, 1, fingerprint="0" * 16)])
    with pytest.raises(RunFolderError, match="differ"):
        aggregate_runs([make_run(TASKS, A3, 0), make_run(["a", "b", "d"], A3, 1)])


def test_tables_contents():
    runs = [make_run(TASKS, A3, 0), make_run(["c", "a", "b"], A3_OTHER, 1)]
    md = markdown_table(runs)
    lines = md.splitlines()
    assert lines[0] == "| Method | ACC | AIA | Forgetting | BWT | FWT | Norm. ACC | a | b | c |"
    ties = next(line for line in lines if line.startswith("| ties |"))
    assert "| 75.0 ± 5.0 |" in ties and "| 80.0 ± 15.0 |" in ties  # tasks a and c
    assert "78.3 ± 1.7" in ties  # final ACC: mean of 0.8 and 0.7667
    zs = next(line for line in lines if line.startswith("| zero_shot (baseline)"))
    assert "| – |" in zs  # no forgetting for a baseline without history
    single = markdown_table(runs[0], per_task=False)
    assert "| ties | 80.0 | 84.2 | 15.0 | -15.0 | 7.5 | 84.0 |" in single
    text = csv_text(runs)
    header = text.splitlines()[0].split(",")
    assert header[:5] == ["method", "kind", "runs", "final_accuracy_mean", "final_accuracy_std"]
    row = text.splitlines()[1].split(",")
    assert row[0] == "ties" and float(row[header.index("a_mean")]) == pytest.approx(0.75)


def test_rich_summary_prints():
    from rich.console import Console

    console = Console(record=True, width=200)
    print_summary(make_run(TASKS, A3), console=console)
    out = console.export_text()
    assert "ties" in out and "80.0" in out and "Forgetting" in out


def test_plots_written(tmp_path):
    matrix = AccuracyMatrix.from_numpy([[0.9, np.nan], [0.8, 0.85]], ["mnist", "svhn"])
    heat = plot_accuracy_matrix(matrix, tmp_path / "plots" / "matrix.png", title="toy")
    assert heat.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and heat.stat().st_size > 1000
    curves = plot_accuracy_curves({"ties": [0.9, 0.8, 0.7], "ta": [0.9, 0.85]}, tmp_path / "curves.png",
                                  std={"ties": [0.0, 0.05, 0.02]})
    assert curves.stat().st_size > 1000
    agg = aggregate_runs([make_run(TASKS, A3, 0), make_run(["c", "a", "b"], A3_OTHER, 1)])
    assert plot_aggregate_curves(agg, tmp_path / "agg.png").stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agg.png", "curves.png", "plots"]  # no temp files
    with pytest.raises(cl_merge.ClMergeError, match="task names"):
        plot_accuracy_matrix(np.zeros((2, 2)), tmp_path / "x.png", tasks=["only"])


def _fake_runs(root):
    write_run_folder(root / "toy" / "order0", make_run(TASKS, A3, 0))
    write_run_folder(root / "toy" / "order1", make_run(["c", "a", "b"], A3_OTHER, 1))
    other = make_run(TASKS, A3, 0)
    other.scenario = "toy2"
    write_run_folder(root / "toy2" / "order0", other)


def test_make_tables(tmp_path):
    _fake_runs(tmp_path / "runs")
    assert [a.scenario for a in collect([tmp_path / "runs"])] == ["toy", "toy2"]
    written = make_tables([tmp_path / "runs"], tmp_path / "tables", plots=True)
    assert sorted(p.name for p in written) == ["toy.csv", "toy.md", "toy2.csv", "toy2.md", "toy2_curves.png",
                                               "toy_curves.png"]
    md = (tmp_path / "tables" / "toy.md").read_text()
    assert "Mean ± std over 2 runs" in md and "75.0 ± 5.0" in md
    with pytest.raises(RunFolderError, match="no metrics.json"):
        make_tables([tmp_path / "tables"], tmp_path / "out")


def test_make_table_script(tmp_path, capsys, monkeypatch):
    _fake_runs(tmp_path / "runs")
    script = str(REPO / "scripts" / "make_table.py")
    monkeypatch.setattr(sys, "argv", [script, str(tmp_path / "runs"), "--out", str(tmp_path / "t"), "--digits", "2"])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(script, run_name="__main__")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "| ties |" in out and "75.00 ± 5.00" in out
    assert (tmp_path / "t" / "toy.csv").exists()
    monkeypatch.setattr(sys, "argv", [script, str(tmp_path / "missing")])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(script, run_name="__main__")
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err
