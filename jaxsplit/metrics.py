"""Classification metrics from a confusion matrix (host-side numpy; used by the patch stage).

Axes: N examples, C classes. The confusion matrix has true classes on rows and predicted classes
on columns: ``cm[t, p]`` counts the examples of class ``t`` predicted as ``p`` (scikit-learn's
convention, which the reference calls through ``sklearn.metrics.confusion_matrix``).

Zero divisions follow scikit-learn's ``zero_division=0``: the precision of a class never
predicted, the recall of a class with no examples, and an F1 with precision + recall = 0 are 0.

Hand-written rather than scikit-learn: these are a few lines of numpy, and scikit-learn is not a
dependency of jaxsplit.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from jaxsplit.errors import JaxsplitError


class MetricsError(JaxsplitError, ValueError):
    """Labels, predictions or a confusion matrix that cannot be scored."""


class ClassScores(NamedTuple):
    """Per-class scores, each ``(C,)`` float64 (``support`` int64)."""

    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray  # number of true examples of each class


def _as_int_vector(x: Any, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise MetricsError(f"{what} must have shape (N,), got {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise MetricsError(f"{what} must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def confusion_matrix(labels: Any, preds: Any, num_classes: int) -> np.ndarray:
    """Counts of (true class, predicted class) pairs.

    Args:
      labels: ``(N,)`` integer true classes in ``[0, C)``.
      preds: ``(N,)`` integer predicted classes in ``[0, C)``.
      num_classes: C.

    Returns:
      ``(C, C)`` int64, ``cm[true, pred]``; its sum is N.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise MetricsError(f"num_classes must be an int >= 1, got {num_classes!r}")
    labels = _as_int_vector(labels, "labels")
    preds = _as_int_vector(preds, "preds")
    if labels.shape != preds.shape:
        raise MetricsError(f"labels {labels.shape} and preds {preds.shape} must have the same shape")
    for what, arr in (("labels", labels), ("preds", preds)):
        bad = (arr < 0) | (arr >= num_classes)
        if bad.any():
            i = int(np.argmax(bad))
            raise MetricsError(
                f"{what}[{i}] = {int(arr[i])} is out of range; expected 0..{num_classes - 1}"
            )
    flat = np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def _check_cm(cm: Any) -> np.ndarray:
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        raise MetricsError(f"confusion matrix must have shape (C, C) with C >= 1, got {cm.shape}")
    if np.any(cm < 0):
        raise MetricsError("confusion matrix has negative counts")
    return cm


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, np.float64)
    den = np.asarray(den, np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def per_class_scores(cm: Any) -> ClassScores:
    """Precision, recall and F1 of every class, one-vs-rest.

    Args:
      cm: ``(C, C)`` confusion matrix, ``cm[true, pred]``.

    Returns:
      `ClassScores` with ``(C,)`` arrays: precision = TP / predicted, recall = TP / support,
      F1 = harmonic mean (0 where undefined).
    """
    cm = _check_cm(cm)
    tp = np.diag(cm)
    predicted = cm.sum(axis=0)
    support = cm.sum(axis=1)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return ClassScores(precision, recall, f1, support.astype(np.int64))


def accuracy(cm: Any) -> float:
    """Fraction of examples on the diagonal (0 for an empty matrix)."""
    cm = _check_cm(cm)
    total = cm.sum()
    return float(np.trace(cm) / total) if total else 0.0


def accuracy_excluding(cm: Any, excluded_class: int) -> float:
    """Accuracy on the examples whose true class is not ``excluded_class``.

    A non-TC example predicted as the excluded class counts as wrong (the reference's non-TC
    accuracy): rows other than ``excluded_class``, their diagonal over their total.
    """
    cm = _check_cm(cm)
    num_classes = cm.shape[0]
    if isinstance(excluded_class, bool) or not isinstance(excluded_class, (int, np.integer)) or not (
        0 <= excluded_class < num_classes
    ):
        raise MetricsError(
            f"excluded_class must be an int in [0, {num_classes}), got {excluded_class!r}"
        )
    keep = np.arange(num_classes) != excluded_class
    total = cm[keep].sum()
    return float(np.diag(cm)[keep].sum() / total) if total else 0.0


def target_class_summary(labels: Any, preds: Any, num_classes: int, target_class: int) -> dict:
    """The patching metrics of one classifier on one labelled set (SPEC §8).

    Args:
      labels: ``(N,)`` true classes in ``[0, C)``.
      preds: ``(N,)`` predicted classes.
      num_classes: C.
      target_class: the TC's class id (column).

    Returns:
      JSON-ready dict: ``tc_precision``, ``tc_recall``, ``tc_f1``, ``non_tc_accuracy``,
      ``accuracy``, ``num_examples``, ``num_tc`` and ``confusion_matrix`` (a list of lists).
    """
    cm = confusion_matrix(labels, preds, num_classes)
    scores = per_class_scores(cm)
    non_tc = accuracy_excluding(cm, target_class)
    return {
        "tc_precision": float(scores.precision[target_class]),
        "tc_recall": float(scores.recall[target_class]),
        "tc_f1": float(scores.f1[target_class]),
        "non_tc_accuracy": non_tc,
        "accuracy": accuracy(cm),
        "num_examples": int(cm.sum()),
        "num_tc": int(scores.support[target_class]),
        "confusion_matrix": cm.tolist(),
    }
