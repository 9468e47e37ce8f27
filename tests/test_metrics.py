"""Tests of jaxsplit.metrics against a hand-computed confusion matrix."""

import numpy as np
import pytest

from jaxsplit import metrics

# 9 examples, 3 classes. By hand:
#   true\pred  0  1  2
#      0       2  1  0
#      1       0  1  1
#      2       1  1  2
LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
PREDS = np.array([0, 1, 0, 1, 2, 2, 2, 0, 1])
CM = np.array([[2, 1, 0], [0, 1, 1], [1, 1, 2]])


def test_confusion_matrix_hand_computed():
    cm = metrics.confusion_matrix(LABELS, PREDS, 3)
    np.testing.assert_array_equal(cm, CM)
    assert cm.dtype == np.int64


def test_per_class_scores_hand_computed():
    s = metrics.per_class_scores(CM)
    # precision = diag / column sums (3, 3, 3); recall = diag / row sums (3, 2, 4)
    np.testing.assert_allclose(s.precision, [2 / 3, 1 / 3, 2 / 3])
    np.testing.assert_allclose(s.recall, [2 / 3, 1 / 2, 1 / 2])
    np.testing.assert_allclose(s.f1, [2 / 3, 2 / 5, 4 / 7])
    np.testing.assert_array_equal(s.support, [3, 2, 4])


def test_accuracies_hand_computed():
    assert metrics.accuracy(CM) == pytest.approx(5 / 9)
    assert metrics.accuracy_excluding(CM, 2) == pytest.approx(3 / 5)  # rows 0, 1: (2 + 1) / 5
    assert metrics.accuracy_excluding(CM, 0) == pytest.approx(3 / 6)  # rows 1, 2: (1 + 2) / 6


def test_zero_division_gives_zero():
    # class 2 is never predicted and has no examples; class 1 is never predicted.
    cm = metrics.confusion_matrix([0, 0, 1], [0, 0, 0], 3)
    s = metrics.per_class_scores(cm)
    np.testing.assert_allclose(s.precision, [2 / 3, 0.0, 0.0])
    np.testing.assert_allclose(s.recall, [1.0, 0.0, 0.0])
    np.testing.assert_allclose(s.f1, [0.8, 0.0, 0.0])
    assert metrics.accuracy_excluding(cm, 0) == 0.0
    assert metrics.accuracy(np.zeros((2, 2), int)) == 0.0


def test_target_class_summary():
    out = metrics.target_class_summary(LABELS, PREDS, 3, target_class=2)
    assert out["tc_precision"] == pytest.approx(2 / 3)
    assert out["tc_recall"] == pytest.approx(1 / 2)
    assert out["tc_f1"] == pytest.approx(4 / 7)
    assert out["non_tc_accuracy"] == pytest.approx(3 / 5)
    assert out["accuracy"] == pytest.approx(5 / 9)
    assert out["num_tc"] == 4 and out["num_examples"] == 9
    assert out["confusion_matrix"] == CM.tolist()


def test_random_matches_counting_loop():
    for seed in range(10):
        rng = np.random.default_rng(seed)
        c = int(rng.integers(2, 6))
        n = int(rng.integers(0, 50))
        labels, preds = rng.integers(0, c, n), rng.integers(0, c, n)
        cm = metrics.confusion_matrix(labels, preds, c)
        expected = np.zeros((c, c), int)
        for t, p in zip(labels, preds):
            expected[t, p] += 1
        np.testing.assert_array_equal(cm, expected)
        s = metrics.per_class_scores(cm)
        for k in range(c):
            tp = np.sum((labels == k) & (preds == k))
            if np.sum(preds == k):
                assert s.precision[k] == pytest.approx(tp / np.sum(preds == k))
            if np.sum(labels == k):
                assert s.recall[k] == pytest.approx(tp / np.sum(labels == k))
        for k in range(c):
            mask = labels != k
            if mask.any():
                assert metrics.accuracy_excluding(cm, k) == pytest.approx(np.mean(labels[mask] == preds[mask]))


@pytest.mark.parametrize(
    "labels, preds, num_classes, match",
    [
        ([0, 3], [0, 1], 3, "labels\\[1\\] = 3"),
        ([0, 1], [0, -1], 3, "preds\\[1\\] = -1"),
        ([0, 1], [0], 3, "same shape"),
        ([[0, 1]], [[0, 1]], 3, "shape \\(N,\\)"),
        ([0.5], [0], 3, "integers"),
        ([0], [0], 0, "num_classes"),
    ],
)
def test_bad_inputs(labels, preds, num_classes, match):
    with pytest.raises(metrics.MetricsError, match=match):
        metrics.confusion_matrix(labels, preds, num_classes)


def test_bad_cm_and_class():
    with pytest.raises(metrics.MetricsError, match="shape"):
        metrics.per_class_scores(np.zeros((2, 3)))
    with pytest.raises(metrics.MetricsError, match="excluded_class"):
        metrics.accuracy_excluding(CM, 3)
