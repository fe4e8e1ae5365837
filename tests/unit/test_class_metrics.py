"""Classifier metrics against a plain, loop-by-loop computation of the same definitions."""

from __future__ import annotations

import numpy as np
import pytest

from ftdist.objectives.class_metrics import classification_report, expected_calibration_error

LABELS = ["a", "b", "c", "d"]


def by_hand(probs, targets, num_classes):
    """Precision, recall, F1 per class and macro-F1 (over classes seen in targets or predictions)."""
    predicted = [max(range(num_classes), key=lambda c: p[c]) for p in probs]
    rows = {}
    for c in range(num_classes):
        tp = sum(1 for t, q in zip(targets, predicted) if t == c and q == c)
        fp = sum(1 for t, q in zip(targets, predicted) if t != c and q == c)
        fn = sum(1 for t, q in zip(targets, predicted) if t == c and q != c)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows[c] = (precision, recall, f1, tp + fn, tp + fp)
    seen = [c for c in range(num_classes) if rows[c][3] or rows[c][4]]
    macro = sum(rows[c][2] for c in seen) / len(seen)
    accuracy = sum(t == q for t, q in zip(targets, predicted)) / len(targets)
    return rows, macro, accuracy, predicted


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_report_matches_the_definitions(seed):
    rng = np.random.default_rng(seed)
    n = 200
    targets = rng.choice(3, size=n, p=[0.6, 0.3, 0.1])  # class d never occurs
    logits = rng.normal(size=(n, 4)) + 2.0 * np.eye(4)[targets] * rng.random((n, 1))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    report = classification_report(probs, targets, LABELS, majority_class=0)
    rows, macro, accuracy, predicted = by_hand(probs.tolist(), targets.tolist(), 4)
    assert report["accuracy"] == pytest.approx(accuracy)
    assert report["macro_f1"] == pytest.approx(macro)
    for c, name in enumerate(LABELS):
        precision, recall, f1, support, _ = rows[c]
        got = report["per_class"][name]
        assert (got["precision"], got["recall"], got["f1"], got["support"]) == pytest.approx((precision, recall, f1, support))
    matrix = report["confusion_matrix"]["rows_true_columns_predicted"]
    for t in range(4):
        for q in range(4):
            assert matrix[t][q] == sum(1 for a, b in zip(targets, predicted) if a == t and b == q)
    base = report["majority_baseline"]
    assert base["class"] == "a"
    assert base["accuracy"] == pytest.approx(float(np.mean(targets == 0)))
    # Always "a": F1 of a is 2p/(1+p) with p its share; b and c score 0; d is never seen.
    share = float(np.mean(targets == 0))
    assert base["macro_f1"] == pytest.approx((2 * share / (1 + share)) / 3)


def test_expected_calibration_error_by_hand():
    # Two bins used: confidences 0.95 (bin 14 of 15) and 0.55 (bin 8).
    probs = np.array([[0.95, 0.05]] * 4 + [[0.55, 0.45]] * 6)
    targets = np.array([0, 0, 0, 1] + [0, 0, 0, 1, 1, 1])
    # bin 0.95: accuracy 3/4, confidence 0.95; bin 0.55: accuracy 3/6, confidence 0.55.
    expected = 0.4 * abs(0.75 - 0.95) + 0.6 * abs(0.5 - 0.55)
    assert expected_calibration_error(probs, targets) == pytest.approx(expected)
    perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(perfect, np.array([0, 1])) == pytest.approx(0.0)


def test_a_class_never_predicted_scores_zero_not_nan():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
    report = classification_report(probs, np.array([0, 1, 1]), ["x", "y"], majority_class=1)
    assert report["per_class"]["y"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert report["per_class"]["x"]["precision"] == pytest.approx(1 / 3)
    assert report["macro_f1"] == pytest.approx((2 * (1 / 3) * 1 / (1 / 3 + 1)) / 2)
