"""Calibration fitted on one half of real-looking scores makes the other half's probabilities honest."""

from __future__ import annotations

import numpy as np
import pytest

from ctscan.calibration import (
    IDENTITY,
    Calibration,
    brier_score,
    expected_calibration_error,
    fit_calibration,
    reliability_plot,
)


def _overconfident_scores(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores of a network trained with class weights: right ranking, probabilities pushed
    to the extremes and shifted towards COVID."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 2, count)
    true_logit = rng.normal(0, 1.2, count) + np.where(targets == 1, 1.0, -1.0)
    scores = 1 / (1 + np.exp(-(3.0 * true_logit + 1.5)))
    return scores, targets


def test_calibration_lowers_ece_on_held_out_scores() -> None:
    fit_scores, fit_targets = _overconfident_scores(300, 0)
    held_scores, held_targets = _overconfident_scores(2000, 1)
    calibration, comparison = fit_calibration(fit_scores, fit_targets)
    assert calibration.method != "identity" and comparison["chosen"] == calibration.method
    before = expected_calibration_error(held_targets, held_scores)
    after = expected_calibration_error(held_targets, calibration.apply(held_scores))
    assert after < 0.5 * before
    assert brier_score(held_targets, calibration.apply(held_scores)) < brier_score(held_targets, held_scores)


def test_calibration_keeps_the_ranking_and_round_trips_through_the_card() -> None:
    scores, targets = _overconfident_scores(200, 2)
    for method in ("temperature", "platt", "isotonic"):
        calibration, _ = fit_calibration(scores, targets, methods=(method,))
        restored = Calibration.from_dict(calibration.as_dict())
        np.testing.assert_allclose(restored.apply(scores), calibration.apply(scores))
        order = np.argsort(scores)
        assert np.all(np.diff(calibration.apply(scores[order])) >= -1e-12)


def test_cards_without_calibration_are_served_as_they_are() -> None:
    assert Calibration.from_dict(None) is IDENTITY
    np.testing.assert_array_equal(IDENTITY.apply(np.array([0.2, 0.7])), [0.2, 0.7])
    with pytest.raises(ValueError, match="unknown calibration"):
        Calibration.from_dict({"method": "magic"})


def test_tiny_validation_sets_still_get_a_calibration() -> None:
    calibration, comparison = fit_calibration(np.array([0.2, 0.9, 0.8]), np.array([0, 1, 1]))
    assert calibration.method == "temperature" and "reason" in comparison


def test_reliability_diagram_is_written(tmp_path) -> None:
    scores, targets = _overconfident_scores(200, 3)
    path = tmp_path / "reliability.png"
    reliability_plot(path, {"raw": (targets, scores)}, title="test")
    assert path.read_bytes().startswith(b"\x89PNG")
