"""The input gate and the outcome rules: what is refused, what is indeterminate, what is labelled."""

from __future__ import annotations

import numpy as np
import pytest

from ctscan.calibration import IDENTITY, Calibration
from ctscan.decision import BAND_STEPS, COVID, INDETERMINATE, NON_COVID, choose_band, decide, refuse
from ctscan.gate import OUTCOME_NO_LUNGS, OUTCOME_NOT_CHEST_CT, FeatureGate, fit_gate
from ctscan.serving.predictor import EnsembleRule, MemberOutput, SliceResult, slice_decision, study_decision


def _features(count: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(99).normal(size=(4, 64))
    return rng.normal(size=(count, 4)) @ basis + 0.1 * rng.normal(size=(count, 64)) + shift


def test_gate_accepts_its_own_distribution_and_refuses_far_inputs() -> None:
    gate = fit_gate(_features(300, 0), _features(100, 1))
    assert gate.accepts(_features(1000, 2)).mean() > 0.95
    assert not gate.accepts(_features(50, 3, shift=3.0)).any()
    off_manifold = np.random.default_rng(4).normal(size=(50, 64))  # right scale, wrong structure
    assert gate.accepts(off_manifold).mean() < 0.1
    restored = FeatureGate.from_dict(gate.to_dict())
    np.testing.assert_allclose(restored.distance(_features(10, 5)), gate.distance(_features(10, 5)), rtol=1e-4)


def test_outcomes_near_the_threshold_are_indeterminate() -> None:
    assert decide(probability=0.9, threshold=0.5).outcome == COVID
    assert decide(probability=0.1, threshold=0.5).outcome == NON_COVID
    near = decide(probability=0.55, threshold=0.5, band=0.1)
    assert near.outcome == INDETERMINATE and "within 10%" in near.reasons[0]
    assert decide(probability=0.95, threshold=0.5, members_disagree=True).outcome == INDETERMINATE
    with pytest.raises(ValueError):
        refuse(COVID, "not a refusal")


def _member(name: str, probability: float, distance: float | None = None) -> MemberOutput:
    return MemberOutput(name, "v1", probability, 0.5, distance, 1.0 if distance is not None else None)


def test_ensemble_refuses_when_most_members_find_the_input_foreign() -> None:
    rule = EnsembleRule(members={"a": "v1", "b": "v1", "c": "v1"}, threshold=0.5, calibration=IDENTITY)
    foreign = slice_decision([_member("a", 0.9, 3.0), _member("b", 0.9, 2.0), _member("c", 0.9, 0.5)],
                             ensemble=rule)
    assert foreign.outcome == OUTCOME_NOT_CHEST_CT and foreign.probability_covid is None
    one_odd = slice_decision([_member("a", 0.9, 3.0), _member("b", 0.9, 0.2), _member("c", 0.9, 0.5)],
                             ensemble=rule)
    assert one_odd.outcome == COVID
    disagree = slice_decision([_member("a", 0.9), _member("b", 0.9), _member("c", 0.1)], ensemble=rule)
    assert disagree.outcome == INDETERMINATE and "disagree" in disagree.reasons[-1]


def test_the_ensemble_probability_is_calibrated_again() -> None:
    rule = EnsembleRule(members={"a": "v1", "b": "v1"}, threshold=0.5,
                        calibration=Calibration("platt", slope=1.0, offset=-2.0), band=0.0)
    decision = slice_decision([_member("a", 0.8), _member("b", 0.8)], ensemble=rule)
    assert decision.probability_covid == pytest.approx(1 / (1 + np.exp(-(np.log(4) - 2))))


def test_the_band_is_chosen_on_val_as_narrow_as_the_accuracy_target_allows() -> None:
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, 400)
    probabilities = np.clip(0.5 + (targets - 0.5) * 0.6 + rng.normal(0, 0.2, 400), 0, 1)
    chosen = choose_band(targets, probabilities, 0.5)
    assert chosen["target_met"] and chosen["accuracy_outside"] >= 0.85
    assert chosen["band"] == min(b for b in BAND_STEPS if b >= chosen["band"])
    hopeless = choose_band(targets, rng.uniform(0, 1, 400), 0.5)  # no signal: the widest band allowed, target missed
    assert not hopeless["target_met"] and hopeless["indeterminate_share"] <= 0.5


def test_a_study_of_only_refused_slices_is_refused() -> None:
    slices = [SliceResult(refuse(OUTCOME_NO_LUNGS, "abdomen")) for _ in range(3)]
    decision, k = study_decision(slices, threshold=0.5)
    assert decision.outcome == OUTCOME_NO_LUNGS and k is None
    slices += [SliceResult(decide(probability=p, threshold=0.5)) for p in (0.9, 0.8, 0.7, 0.2, 0.1)]
    decision, k = study_decision(slices, threshold=0.5)
    assert k == 3 and decision.probability_covid == pytest.approx(0.8) and decision.outcome == COVID
