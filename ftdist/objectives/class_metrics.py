"""Classifier metrics from predicted probabilities: accuracy, macro-F1, per-class precision,
recall and F1, the confusion matrix, expected calibration error, and the majority baseline.

Definitions (as scikit-learn computes them, so figures compare with other tools):
- precision of class c = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2PR / (P + R); a ratio
  with a zero denominator is 0;
- macro-F1: the unweighted mean of per-class F1 over the classes that occur in the targets or
  the predictions (a class neither present nor predicted says nothing either way);
- expected calibration error (Guo et al. 2017): predictions binned by confidence (the top
  probability) into ECE_BINS equal-width bins; sum over bins of (bin size / N) x |accuracy of
  the bin - mean confidence of the bin|;
- majority baseline: always answering the training split's most frequent class.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15


def classification_report(probabilities: np.ndarray, targets: np.ndarray, labels: list[str],
                          majority_class: int) -> dict:
    """Every figure of a classifier over N predictions: probabilities [N, C], targets [N]."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    num_classes = len(labels)
    predicted = probabilities.argmax(axis=1)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)  # rows: true class, columns: predicted
    np.add.at(confusion, (targets, predicted), 1)
    per_class, f1s = per_class_scores(confusion, labels)
    n = len(targets)
    majority = (targets == majority_class).astype(np.int64)
    majority_confusion = np.zeros_like(confusion)
    np.add.at(majority_confusion, (targets, np.full(n, majority_class)), 1)
    _, majority_f1s = per_class_scores(majority_confusion, labels)
    return {
        "accuracy": float(np.trace(confusion) / max(n, 1)),
        "macro_f1": macro(f1s, confusion),
        "ece": expected_calibration_error(probabilities, targets),
        "documents": int(n),
        "per_class": per_class,
        "confusion_matrix": {"labels": list(labels), "rows_true_columns_predicted": confusion.tolist()},
        "majority_baseline": {
            "class": labels[majority_class],
            "accuracy": float(majority.sum() / max(n, 1)),
            "macro_f1": macro(majority_f1s, majority_confusion),
        },
    }


def per_class_scores(confusion: np.ndarray, labels: list[str]) -> tuple[dict, np.ndarray]:
    tp = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    support = confusion.sum(axis=1).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(tp), where=denominator > 0)
    table = {
        name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
               "support": int(support[i])}
        for i, name in enumerate(labels)
    }
    return table, f1


def macro(f1s: np.ndarray, confusion: np.ndarray) -> float:
    """Mean F1 over the classes present in the targets or the predictions."""
    present = (confusion.sum(axis=0) + confusion.sum(axis=1)) > 0
    return float(f1s[present].mean()) if present.any() else 0.0


def expected_calibration_error(probabilities: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> float:
    if len(targets) == 0:
        return 0.0
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == targets).astype(np.float64)
    # Bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 cannot occur
    # (the top of C probabilities is at least 1/C) but would land in bin 0.
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            total += in_bin.sum() / len(targets) * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(total)


def describe_report(report: dict) -> list[str]:
    """The end-of-run lines: headline figures beside the majority baseline, then each class."""
    base = report["majority_baseline"]
    lines = [
        f"held-out accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f} over {report['documents']} "
        f"documents (majority baseline, always '{base['class']}': accuracy {base['accuracy']:.4f}, "
        f"macro-F1 {base['macro_f1']:.4f}); expected calibration error {report['ece']:.4f}",
    ]
    width = max(len(name) for name in report["per_class"])
    for name, s in report["per_class"].items():
        lines.append(f"  {name:<{width}}  precision {s['precision']:.4f}  recall {s['recall']:.4f}  "
                     f"f1 {s['f1']:.4f}  support {s['support']}")
    matrix = report["confusion_matrix"]["rows_true_columns_predicted"]
    lines.append("  confusion matrix (rows: true class, columns: predicted): "
                 + "; ".join(f"{name}: {row}" for name, row in zip(report["per_class"], matrix)))
    return lines
