"""Probability calibration, fitted on the validation split only.

A network trained with class weights, mixup and early stopping on AUC gives scores that
rank well but are not probabilities: "0.62" need not mean 62 % of such slices are COVID.
`fit_calibration` tries temperature scaling (one parameter), Platt scaling (slope and
offset on the logit) and isotonic regression, scores each by out-of-fold log loss over a
5-fold split of val, and keeps the best (refitted on all of val). The result is a small
JSON-able record stored in the model card; `Calibration.apply` maps raw scores to
calibrated probabilities at serving time. Calibration is monotonic: it never changes the
ranking (AUC), only what the numbers mean, so the decision threshold is chosen on the
calibrated val probabilities afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

METHODS = ("identity", "temperature", "platt", "isotonic")
_EPSILON = 1e-6


def _logit(probabilities: np.ndarray) -> np.ndarray:
    clipped = np.clip(np.asarray(probabilities, dtype=np.float64), _EPSILON, 1 - _EPSILON)
    return np.log(clipped / (1 - clipped))


def _sigmoid(values: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-values))


@dataclass(frozen=True)
class Calibration:
    """A fitted map from a model's raw score to a calibrated probability."""

    method: str
    slope: float = 1.0  # temperature: 1/T; platt: a
    offset: float = 0.0  # platt: b
    knots_x: tuple[float, ...] = field(default_factory=tuple)  # isotonic: step function
    knots_y: tuple[float, ...] = field(default_factory=tuple)

    def apply(self, probabilities: np.ndarray | float) -> np.ndarray:
        raw = np.asarray(probabilities, dtype=np.float64)
        if self.method == "identity":
            return raw.copy()
        if self.method == "isotonic":
            return np.interp(raw, self.knots_x, self.knots_y)
        return _sigmoid(self.slope * _logit(raw) + self.offset)

    def as_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {"method": self.method}
        if self.method in ("temperature", "platt"):
            record.update(slope=self.slope, offset=self.offset)
        if self.method == "isotonic":
            record.update(knots_x=list(self.knots_x), knots_y=list(self.knots_y))
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any] | None) -> Calibration:
        """The card's calibration; cards without one are served as they are (identity)."""
        if not record:
            return IDENTITY
        method = str(record.get("method", "identity"))
        if method not in METHODS:
            raise ValueError(f"unknown calibration method {method!r}")
        return cls(method=method, slope=float(record.get("slope", 1.0)), offset=float(record.get("offset", 0.0)),
                   knots_x=tuple(float(v) for v in record.get("knots_x", ())),
                   knots_y=tuple(float(v) for v in record.get("knots_y", ())))


IDENTITY = Calibration("identity")


def fit_method(method: str, scores: np.ndarray, targets: np.ndarray) -> Calibration:
    from scipy.optimize import minimize
    from sklearn.isotonic import IsotonicRegression

    if method == "identity":
        return IDENTITY
    if method == "isotonic":
        regression = IsotonicRegression(y_min=_EPSILON, y_max=1 - _EPSILON, out_of_bounds="clip")
        regression.fit(scores, targets)
        return Calibration("isotonic", knots_x=tuple(float(v) for v in regression.X_thresholds_),
                           knots_y=tuple(float(v) for v in regression.y_thresholds_))
    logits = _logit(scores)

    def loss(parameters: np.ndarray) -> float:
        slope, offset = (parameters[0], 0.0) if method == "temperature" else (parameters[0], parameters[1])
        return log_loss(targets, _sigmoid(slope * logits + offset))

    start = np.array([1.0] if method == "temperature" else [1.0, 0.0])
    bounds = [(1e-3, 100.0)] if method == "temperature" else [(1e-3, 100.0), (-20.0, 20.0)]
    result = minimize(loss, start, method="L-BFGS-B", bounds=bounds)
    slope = float(result.x[0])
    offset = float(result.x[1]) if method == "platt" else 0.0
    return Calibration(method, slope=slope, offset=offset)


def log_loss(targets: np.ndarray, probabilities: np.ndarray) -> float:
    clipped = np.clip(np.asarray(probabilities, dtype=np.float64), _EPSILON, 1 - _EPSILON)
    targets = np.asarray(targets, dtype=np.float64)
    return float(-np.mean(targets * np.log(clipped) + (1 - targets) * np.log(1 - clipped)))


def brier_score(targets: np.ndarray, probabilities: np.ndarray) -> float:
    return float(np.mean((np.asarray(probabilities, dtype=np.float64) - np.asarray(targets, dtype=np.float64)) ** 2))


def expected_calibration_error(targets: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> float:
    """ECE with equal-width bins: mean |observed frequency - mean probability|, weighted by
    each bin's share of the samples."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(probabilities, edges[1:-1]), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        chosen = index == b
        if chosen.any():
            error += chosen.mean() * abs(targets[chosen].mean() - probabilities[chosen].mean())
    return float(error)


def calibration_metrics(targets: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    return {"ece": expected_calibration_error(targets, probabilities), "brier": brier_score(targets, probabilities),
            "log_loss": log_loss(targets, probabilities)}


def fit_calibration(scores: np.ndarray, targets: np.ndarray, *, folds: int = 5, seed: int = 0,
                    methods: tuple[str, ...] = METHODS) -> tuple[Calibration, dict[str, Any]]:
    """Choose and fit the calibration on validation scores; returns it and the comparison
    (out-of-fold log loss and ECE of each method)."""
    from sklearn.model_selection import StratifiedKFold

    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets).astype(int)
    per_class = np.bincount(targets, minlength=2)
    folds = int(min(folds, per_class.min()))
    comparison: dict[str, Any] = {}
    if folds < 2:  # too few of one class to compare: the simplest fit
        calibration = fit_method("temperature", scores, targets) if per_class.min() else IDENTITY
        return calibration, {"chosen": calibration.method, "reason": "too few validation images to compare"}
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for method in methods:
        out_of_fold = np.empty_like(scores)
        for train_index, test_index in splitter.split(scores, targets):
            fitted = fit_method(method, scores[train_index], targets[train_index])
            out_of_fold[test_index] = fitted.apply(scores[test_index])
        comparison[method] = {"log_loss": log_loss(targets, out_of_fold),
                              "ece": expected_calibration_error(targets, out_of_fold)}
    chosen = min(comparison, key=lambda m: (comparison[m]["log_loss"], METHODS.index(m)))
    return fit_method(chosen, scores, targets), {"chosen": chosen, "out_of_fold": comparison}


def reliability_plot(path: Any, curves: dict[str, tuple[np.ndarray, np.ndarray]], *, title: str,
                     bins: int = 10) -> None:
    """Reliability diagram: observed COVID frequency against mean predicted probability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.8, 4.8))
    axis.plot([0, 1], [0, 1], "k:", label="perfectly calibrated")
    edges = np.linspace(0.0, 1.0, bins + 1)
    for label, (targets, probabilities) in curves.items():
        index = np.clip(np.digitize(probabilities, edges[1:-1]), 0, bins - 1)
        xs, ys = [], []
        for b in range(bins):
            chosen = index == b
            if chosen.any():
                xs.append(float(np.mean(probabilities[chosen])))
                ys.append(float(np.mean(targets[chosen])))
        ece = expected_calibration_error(targets, probabilities, bins)
        axis.plot(xs, ys, "o-", label=f"{label} (ECE {ece:.3f})")
    axis.set_xlabel("predicted probability of COVID-19")
    axis.set_ylabel("observed share of COVID-19")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_title(title)
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
