"""Metrics come from scikit-learn; thresholds are chosen on the data given (val only)."""

from __future__ import annotations

import numpy as np
import pytest

from ctscan.metrics import bootstrap_intervals, choose_threshold, full_report, point_metrics


def test_point_metrics_use_covid_as_positive_class() -> None:
    targets = np.array([1, 1, 1, 0, 0, 0])
    probabilities = np.array([0.9, 0.8, 0.3, 0.6, 0.2, 0.1])
    report = point_metrics(targets, probabilities, 0.5)
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["precision"] == pytest.approx(2 / 3)
    assert report["recall"] == pytest.approx(2 / 3)
    assert report["confusion_matrix"] == [[2, 1], [1, 2]]
    assert report["auc"] == pytest.approx(8 / 9)


def test_threshold_separates_perfectly_separable_scores() -> None:
    targets = np.array([0, 0, 0, 1, 1, 1])
    probabilities = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.45])
    for rule in ("youden", "f1", "accuracy"):
        threshold = choose_threshold(targets, probabilities, rule)
        assert 0.3 < threshold <= 0.35
        assert point_metrics(targets, probabilities, threshold)["accuracy"] == 1.0
    with pytest.raises(ValueError):
        choose_threshold(targets, probabilities, "magic")


def test_bootstrap_interval_brackets_the_point_estimate() -> None:
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, 200)
    probabilities = np.clip(targets * 0.3 + rng.uniform(0, 0.7, 200), 0, 1)
    report = full_report(targets, probabilities, 0.5, resamples=100)
    for name in ("accuracy", "f1", "auc"):
        low, high = report["ci95"][name]
        assert low <= report[name] <= high and high - low < 0.3
    assert bootstrap_intervals(targets, probabilities, 0.5, resamples=50, seed=1) == \
        bootstrap_intervals(targets, probabilities, 0.5, resamples=50, seed=1)
