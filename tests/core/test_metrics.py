"""Metrics: scikit-learn based reports, the F1-optimal threshold, undefined values, the Fisher ratio."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from ocec.core.metrics import best_threshold, binary_report, fisher_ratio, full_report


def test_report_equals_scikit_learn_on_known_predictions():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    probs = np.clip(labels * 0.35 + rng.random(200) * 0.65, 0, 1)
    rep = full_report(labels, probs)
    preds = (probs >= 0.5).astype(int)
    assert rep["accuracy"] == pytest.approx(accuracy_score(labels, preds))
    assert rep["precision"] == pytest.approx(precision_score(labels, preds))
    assert rep["recall"] == pytest.approx(recall_score(labels, preds))
    assert rep["f1"] == pytest.approx(f1_score(labels, preds))
    assert rep["roc_auc"] == pytest.approx(roc_auc_score(labels, probs))
    assert rep["pr_auc"] == pytest.approx(average_precision_score(labels, probs))
    cm = rep["confusion_matrix"]
    assert cm["tp"] == int(((preds == 1) & (labels == 1)).sum()) and sum(cm.values()) == 200


def test_best_threshold_maximises_f1():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    probs = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.45, 0.9, 0.6])
    threshold, best = best_threshold(labels, probs)
    brute = max(f1_score(labels, (probs >= t).astype(int)) for t in probs)
    assert best == pytest.approx(brute) and best > f1_score(labels, (probs >= 0.5).astype(int))
    assert f1_score(labels, (probs >= threshold).astype(int)) == pytest.approx(best)
    assert 0.3 < threshold < 0.35  # between the highest score called closed and the lowest called open


def test_the_threshold_stays_at_half_unless_another_gains_enough():
    labels = np.array([0] * 50 + [1] * 50)
    probs = np.concatenate([np.linspace(0.0, 0.45, 50), np.linspace(0.55, 1.0, 50)])
    probs[49] = 0.52  # one closed image above 0.5: the best cut gains 0.0099 of F1 (1 of 101 errors)
    assert best_threshold(labels, probs)[0] != 0.5
    probs = np.concatenate([np.linspace(0.0, 0.45, 500), np.linspace(0.55, 1.0, 500)])
    labels = np.array([0] * 500 + [1] * 500)
    probs[499] = 0.52  # the same one image among 1,000: a gain of 0.001, kept at 0.5
    threshold, f1 = best_threshold(labels, probs)
    assert threshold == 0.5 and f1 == pytest.approx(f1_score(labels, probs >= 0.5))


def test_single_class_metrics_are_undefined_not_errors_or_zero():
    rep = binary_report(np.zeros(10), np.linspace(0, 1, 10))
    assert np.isnan(rep["roc_auc"]) and np.isnan(rep["recall"]) and rep["accuracy"] == 0.5
    assert np.isnan(rep["f1"])  # not 0.0: with no open label there is no F1 to be bad at
    only_open = binary_report(np.ones(10), np.linspace(0, 1, 10))
    assert only_open["f1"] == pytest.approx(f1_score(np.ones(10), np.linspace(0, 1, 10) >= 0.5))


def test_fisher_ratio_grows_with_separation():
    rng = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 2
    noise = torch.randn(200, 8, generator=rng)
    direction = torch.zeros(8)
    direction[0] = 1.0
    near = fisher_ratio(noise + 0.5 * direction * (2 * labels[:, None] - 1), labels)
    far = fisher_ratio(noise + 3.0 * direction * (2 * labels[:, None] - 1), labels)
    assert far > near > 0
    assert math.isnan(fisher_ratio(noise, torch.zeros(200, dtype=torch.long)))
