"""Continual-learning metrics on small matrices worked out by hand."""

import math

import numpy as np
import pytest

import cl_merge  # noqa: F401  (runs the torchvision compat shim first)
from cl_merge.errors import ClMergeError, UnknownNameError
from cl_merge.metrics import (
    AccuracyMatrix,
    MetricsInputError,
    average_accuracy_curve,
    average_incremental_accuracy,
    backward_transfer,
    final_average_accuracy,
    forgetting,
    forward_transfer,
    normalized_accuracy,
    summarize,
)

# a[t][i]: accuracy on task i after stage t. The upper triangle holds accuracies
# on tasks not trained yet (forward transfer).
A3 = [
    [0.90, 0.20, 0.30],
    [0.80, 0.85, 0.35],
    [0.70, 0.75, 0.95],
]
ZERO_SHOT = [0.10, 0.15, 0.25]
INDIVIDUAL = [0.95, 0.90, 1.00]


def test_worked_3x3_example():
    # ACC = (0.70 + 0.75 + 0.95) / 3 = 2.40 / 3 = 0.80
    assert final_average_accuracy(A3) == pytest.approx(0.80)
    # A_1 = 0.90, A_2 = (0.80 + 0.85) / 2 = 0.825, A_3 = 0.80
    assert average_accuracy_curve(A3) == pytest.approx([0.90, 0.825, 0.80])
    # AIA = (0.90 + 0.825 + 0.80) / 3 = 2.525 / 3
    assert average_incremental_accuracy(A3) == pytest.approx(2.525 / 3)
    # forgetting: task 0: max(0.90, 0.80) - 0.70 = 0.20; task 1: 0.85 - 0.75 = 0.10 -> 0.30 / 2
    assert forgetting(A3) == pytest.approx(0.15)
    # BWT: (0.70 - 0.90) + (0.75 - 0.85) = -0.30 -> / (T - 1) = -0.15  (FusionBench's /T would give -0.10)
    assert backward_transfer(A3) == pytest.approx(-0.15)
    # FWT: (a[0][1] - b_1) + (a[1][2] - b_2) = (0.20 - 0.15) + (0.35 - 0.25) = 0.15 -> / 2
    assert forward_transfer(A3, ZERO_SHOT) == pytest.approx(0.075)
    # normalized: (0.70/0.95 + 0.75/0.90 + 0.95/1.00) / 3
    assert normalized_accuracy(A3, INDIVIDUAL) == pytest.approx((0.70 / 0.95 + 0.75 / 0.90 + 0.95) / 3)


def test_forgetting_uses_the_max_and_bwt_the_diagonal():
    # Task 0 improves after stage 0 and then drops: forgetting and -BWT differ.
    a = [
        [0.5, np.nan, np.nan],
        [0.8, 0.9, np.nan],
        [0.6, 0.7, 0.9],
    ]
    # forgetting: (max(0.5, 0.8) - 0.6) + (0.9 - 0.7) = 0.2 + 0.2 -> 0.2
    assert forgetting(a) == pytest.approx(0.2)
    # BWT: (0.6 - 0.5) + (0.7 - 0.9) = -0.1 -> -0.05
    assert backward_transfer(a) == pytest.approx(-0.05)
    # no upper triangle: FWT cannot be computed
    assert forward_transfer(a, [0.1, 0.1, 0.1]) is None


def test_forgetting_ignores_accuracy_measured_before_training():
    # a[0][1] = 0.99 is forward transfer (task 1 not trained yet): not a maximum to forget from.
    a = [[0.9, 0.99], [0.9, 0.8]]
    assert forgetting(a) == pytest.approx(0.0)
    assert forward_transfer(a, [0.0, 0.5]) == pytest.approx(0.49)


def test_single_stage_has_no_forgetting_bwt_fwt():
    a = [[0.7, 0.1]]
    assert final_average_accuracy(a) == pytest.approx(0.7)
    assert forgetting(a) is None
    assert backward_transfer(a) is None
    assert forward_transfer(a, [0.2, 0.2]) is None
    out = summarize(a, reference=[0.2, 0.2], individual=[0.7, 0.8])
    assert out["forgetting"] is None and out["backward_transfer"] is None and out["forward_transfer"] is None
    assert out["normalized_accuracy"] == pytest.approx(1.0)


def test_multi_task_merge_in_one_stage():
    # One stage bringing three tasks at once.
    a = [[0.6, 0.7, 0.8]]
    assert final_average_accuracy(a, tasks_seen=[3]) == pytest.approx(0.7)
    assert forgetting(a, tasks_seen=[3]) is None


def test_tasks_seen_two_per_stage():
    # stage 0 brings tasks 0 and 1, stage 1 brings task 2
    a = [[0.8, 0.6, 0.2], [0.7, 0.5, 0.9]]
    # forgetting: (0.8 - 0.7) + (0.6 - 0.5) over 2 tasks seen before the last stage
    assert forgetting(a, tasks_seen=[2, 3]) == pytest.approx(0.1)
    # FWT only for task 2 (first seen at stage 1): a[0][2] - b_2 = 0.2 - 0.1
    assert forward_transfer(a, [0.0, 0.0, 0.1], tasks_seen=[2, 3]) == pytest.approx(0.1)
    assert average_accuracy_curve(a, tasks_seen=[2, 3]) == pytest.approx([0.7, 0.7])


def test_summarize_keys_and_values():
    out = summarize(A3, reference=ZERO_SHOT, individual=INDIVIDUAL)
    assert out["final_accuracy"] == pytest.approx(0.8)
    assert out["forward_transfer"] == pytest.approx(0.075)
    assert out["num_stages"] == 3
    assert summarize(A3)["forward_transfer"] is None
    assert summarize(A3)["normalized_accuracy"] is None


@pytest.mark.parametrize(
    "matrix, message",
    [
        ([0.5, 0.6], "1-D"),
        ([[0.5], [0.6]], "columns must be >= stages"),
        ([[0.5, 0.2], [0.6]], "different lengths"),
        ([], "empty"),
        ([[np.nan, 0.1], [0.5, 0.5]], "missing"),
        ([[[0.1]]], "2-D"),
    ],
)
def test_bad_matrices_raise_clear_errors(matrix, message):
    with pytest.raises(MetricsInputError, match=message):
        final_average_accuracy(matrix)


def test_bad_references():
    with pytest.raises(MetricsInputError, match="reference"):
        forward_transfer(A3, [0.1, 0.2])
    with pytest.raises(MetricsInputError, match="individual"):
        normalized_accuracy(A3, [0.9, 0.0, 0.9])
    with pytest.raises(MetricsInputError, match="tasks_seen"):
        forgetting(A3, tasks_seen=[1, 3, 2])
    assert issubclass(MetricsInputError, ClMergeError)


def test_accuracy_matrix_roundtrip(tmp_path):
    m = AccuracyMatrix(["a", "b", "c"])
    m.set(0, "a", 0.9)
    m.set("b", "a", 0.8)
    m.set(1, 1, 0.85)
    m.set(2, "a", 0.7)
    m.set(2, "b", 0.75)
    m.set(2, "c", 0.95)
    path = m.to_csv(tmp_path / "accuracy_matrix.csv")
    lines = path.read_text().splitlines()
    assert lines[0] == "stage,a,b,c"
    assert lines[1] == "a,0.9,,"
    assert [p.name for p in tmp_path.iterdir()] == ["accuracy_matrix.csv"]  # no temp file left
    back = AccuracyMatrix.from_csv(path)
    assert back.tasks == ["a", "b", "c"] and back.stages == ["a", "b", "c"]
    np.testing.assert_array_equal(np.isnan(back.to_numpy()), np.isnan(m.to_numpy()))
    assert back.get(2, "c") == 0.95
    assert back.summarize()["final_accuracy"] == pytest.approx(0.8)
    assert back.summarize(individual={"a": 0.95, "b": 0.9, "c": 1.0})["normalized_accuracy"] == pytest.approx(
        normalized_accuracy(A3, INDIVIDUAL))


def test_accuracy_matrix_errors(tmp_path):
    m = AccuracyMatrix(["mnist", "svhn"])
    with pytest.raises(UnknownNameError, match="did you mean: mnist"):
        m.set(0, "mnistt", 0.5)
    with pytest.raises(MetricsInputError, match="out of range"):
        m.set(5, 0, 0.5)
    with pytest.raises(MetricsInputError, match="nan"):
        m.set(0, 0, math.nan)
    with pytest.raises(MetricsInputError, match="duplicate"):
        AccuracyMatrix(["a", "a"])
    bad = tmp_path / "bad.csv"
    bad.write_text("stage,a,b\ns0,0.5\n")
    with pytest.raises(MetricsInputError, match="bad.csv: line 2"):
        AccuracyMatrix.from_csv(bad)
    bad.write_text("stage,a\ns0,high\n")
    with pytest.raises(MetricsInputError, match="not a number"):
        AccuracyMatrix.from_csv(bad)
    bad.write_text("task,a\n")
    with pytest.raises(MetricsInputError, match="header"):
        AccuracyMatrix.from_csv(bad)
