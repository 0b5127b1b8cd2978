"""Classification metrics (scikit-learn), bootstrap intervals and the decision threshold.

`covid` (target 1) is the positive class for precision, recall and F1.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

THRESHOLD_RULES = ("youden", "f1", "accuracy")
SOURCE_AUC_PREFIX = "val_auc_of_"  # a training epoch's logs hold floats only: one key per val source


def choose_threshold(targets: np.ndarray, probabilities: np.ndarray, rule: str = "youden") -> float:
    """Pick the decision threshold on validation data only.

    youden: maximises sensitivity + specificity - 1 (balanced errors); f1 / accuracy maximise
    those scores. Candidates are the ROC thresholds; ties go to the one closest to 0.5.
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule must be one of {THRESHOLD_RULES}, got {rule!r}")
    targets = np.asarray(targets).astype(int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if len(np.unique(targets)) < 2:
        return 0.5
    _, _, candidates = roc_curve(targets, probabilities)
    candidates = np.clip(candidates[np.isfinite(candidates)], 0.0, 1.0)
    best_score, best_threshold = -np.inf, 0.5
    for threshold in np.unique(candidates):
        predicted = (probabilities >= threshold).astype(int)
        if rule == "youden":
            tn, fp, fn, tp = confusion_matrix(targets, predicted, labels=[0, 1]).ravel()
            score = tp / max(tp + fn, 1) + tn / max(tn + fp, 1) - 1.0
        elif rule == "f1":
            score = f1_score(targets, predicted, zero_division=0)
        else:
            score = accuracy_score(targets, predicted)
        closer = abs(threshold - 0.5) < abs(best_threshold - 0.5)
        if score > best_score + 1e-12 or (abs(score - best_score) <= 1e-12 and closer):
            best_score, best_threshold = score, float(threshold)
    return best_threshold


def point_metrics(targets: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict[str, Any]:
    targets = np.asarray(targets).astype(int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    predicted = (probabilities >= threshold).astype(int)
    both_classes = len(np.unique(targets)) == 2
    return {
        "accuracy": float(accuracy_score(targets, predicted)),
        "precision": float(precision_score(targets, predicted, zero_division=0)),
        "recall": float(recall_score(targets, predicted, zero_division=0)),
        "f1": float(f1_score(targets, predicted, zero_division=0)),
        "auc": float(roc_auc_score(targets, probabilities)) if both_classes else float("nan"),
        "threshold": float(threshold),
        "n": len(targets),
        # rows: true non_covid, covid; columns: predicted non_covid, covid
        "confusion_matrix": confusion_matrix(targets, predicted, labels=[0, 1]).tolist(),
    }


def bootstrap_intervals(
    targets: np.ndarray,
    probabilities: np.ndarray,
    threshold: float,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, list[float]]:
    """95 % percentile bootstrap intervals (resampling images) for each scalar metric."""
    targets = np.asarray(targets).astype(int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    rng = np.random.default_rng(seed)
    names = ("accuracy", "precision", "recall", "f1", "auc")
    samples: dict[str, list[float]] = {name: [] for name in names}
    n = len(targets)
    for _ in range(resamples):
        index = rng.integers(0, n, n)
        if len(np.unique(targets[index])) < 2:
            continue
        result = point_metrics(targets[index], probabilities[index], threshold)
        for name in names:
            samples[name].append(result[name])
    return {
        name: [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
        for name, values in samples.items()
        if values
    }


def full_report(
    targets: np.ndarray, probabilities: np.ndarray, threshold: float, *, resamples: int = 1000
) -> dict[str, Any]:
    report = point_metrics(targets, probabilities, threshold)
    report["ci95"] = bootstrap_intervals(targets, probabilities, threshold, resamples=resamples)
    return report
