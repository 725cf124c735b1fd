"""Classification metrics (scikit-learn) and the Fisher ratio of embeddings.

Undefined values (F1 with no positive labels or predictions, ROC-AUC on a single class) are
NaN here and `null` in JSON, never an exception: a single-class validation split is a fact
worth reporting, not a crash.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
)

NAN = float("nan")


def binary_report(labels, probs, threshold: float = 0.5) -> dict:
    """accuracy, precision, recall, f1 (of class 'open'), roc_auc; NaN where undefined."""
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    if len(labels) == 0:
        return {k: NAN for k in ("accuracy", "precision", "recall", "f1", "roc_auc")}
    preds = (probs >= threshold).astype(int)
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, preds, labels=[1], average=None, zero_division=np.nan
    )
    single_class = len(np.unique(labels)) < 2
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "precision": float(precision[0]),
        "recall": float(recall[0]),
        # without an open label, recall and so F1 are undefined (scikit-learn would say 0.0)
        "f1": NAN if not labels.any() else float(f1[0]),
        "roc_auc": NAN if single_class else float(roc_auc_score(labels, probs)),
    }


def full_report(labels, probs, threshold: float = 0.5) -> dict:
    """binary_report plus PR-AUC, the F1-maximising threshold and the confusion matrix."""
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    report = binary_report(labels, probs, threshold)
    single_class = len(np.unique(labels)) < 2
    report["pr_auc"] = NAN if single_class or len(labels) == 0 else float(average_precision_score(labels, probs))
    report["best_threshold"], report["best_f1"] = best_threshold(labels, probs)
    report["threshold"] = threshold
    matrix = confusion_matrix(labels, (probs >= threshold).astype(int), labels=[0, 1])
    report["confusion_matrix"] = {
        "tn": int(matrix[0, 0]),
        "fp": int(matrix[0, 1]),
        "fn": int(matrix[1, 0]),
        "tp": int(matrix[1, 1]),
    }
    report["samples"] = int(len(labels))
    return report


MIN_THRESHOLD_GAIN = 0.005  # F1 a threshold must gain over 0.5 to replace it


def best_threshold(labels, probs) -> tuple[float, float]:
    """The probability threshold that maximises F1, and that F1 (NaN, NaN without positives), chosen so that
    it does not jump between epochs for nothing: 0.5 unless another threshold gains at least
    MIN_THRESHOLD_GAIN of F1, and otherwise the midpoint between the lowest score called open and the
    highest called closed (the same decisions on val, but not sitting on one image's score)."""
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    if labels.sum() == 0:
        return NAN, NAN
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        precision, recall, thresholds = precision_recall_curve(labels, probs)
        at_half = float(f1_score(labels, probs >= 0.5, zero_division=0.0))
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)[:-1]
    best = int(np.argmax(f1))
    if f1[best] - at_half < MIN_THRESHOLD_GAIN:
        return 0.5, at_half
    cut = thresholds[best]
    below = probs[probs < cut]
    return float((cut + below.max()) / 2 if len(below) else cut / 2), float(f1[best])


def fisher_ratio(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """trace(between-class scatter) / trace(within-class scatter) of L2-normalised embeddings.

    Larger means the two classes are further apart relative to their spread. Normalised first
    because cosine heads classify by direction, and so the ratio is comparable across models.
    """
    x = torch.nn.functional.normalize(embeddings.double(), dim=1)
    labels = labels.long()
    if len(x) < 3 or labels.min() == labels.max():
        return NAN
    mean = x.mean(0)
    between = within = 0.0
    for cls in (0, 1):
        xc = x[labels == cls]
        mc = xc.mean(0)
        between += len(xc) * float(((mc - mean) ** 2).sum())
        within += float(((xc - mc) ** 2).sum())
    return between / within if within > 0 else math.inf


def is_defined(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))
