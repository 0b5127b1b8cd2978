"""The shipped release on real and foreign images: it refuses what is not a chest-CT slice,
rarely refuses one that is, calls borderline slices indeterminate, and its calibration makes
held-out probabilities more honest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ctscan.calibration import Calibration, calibration_metrics, fit_method
from ctscan.data.dataset import CTDataset
from ctscan.decision import INDETERMINATE, REFUSALS
from ctscan.evaluation.reports import card_band, decode_samples, predict_split
from ctscan.evaluation.safety import generated_patterns, outcome_counts, skimage_samples
from ctscan.models import ensemble_members
from ctscan.serving.predictor import Predictor
from ctscan.storage.store import ModelStore, open_store

RELEASE = Path(__file__).resolve().parents[2] / "models"
pytestmark = pytest.mark.slow
KNOWN_GAPS = {"skimage:gravel"}


@pytest.fixture(scope="module")
def release() -> ModelStore:
    return open_store(RELEASE)


@pytest.fixture(scope="module")
def guarded(release: ModelStore) -> list[str]:
    """The release's models that carry an input gate and a calibration (lung-v1 cards)."""
    names = [n for n in ensemble_members()
             if (card := release.card(n, release.production(n) or "")).get("gate") and card.get("calibration")]
    assert names, "no model of the release has an input gate and a calibration"
    return names


@pytest.fixture(scope="module")
def predictor(release: ModelStore) -> Predictor:
    # All production models, as served (the ensemble: the member versions its record pins);
    # the tests look at the guarded ones.
    return Predictor.from_store(release, ensemble_members())


def test_images_that_are_not_chest_ct_are_refused(predictor: Predictor, guarded: list[str]) -> None:
    foreign = [(name, decoded) for name, decoded in [*skimage_samples(), *generated_patterns()]]
    for model in guarded:
        results = predictor.classify([d for _, d in foreign], model=model)
        accepted = [name for (name, _), r in zip(foreign, results, strict=True) if r.decision.outcome not in REFUSALS]
        # Photographs, micrographs, text and synthetic patterns are refused; the one known gap
        # (a grey gravel texture: smooth enough, grey, and near the training slices in the
        # model's feature space) is listed in the README's gate numbers.
        assert set(accepted) <= KNOWN_GAPS, f"{model} classified non-CT images: {accepted}"


def test_chest_ct_slices_of_ucsd_test_are_rarely_refused(predictor: Predictor, guarded: list[str],
                                                         data_dir: Path) -> None:
    decoded = decode_samples(CTDataset(data_dir).split("test"))
    for model in guarded:
        counts = outcome_counts(predictor, decoded, model=model)
        refused = sum(counts[o] for o in REFUSALS)
        assert refused / len(decoded) <= 0.05, (model, counts)
        # The band catches some borderline slices without swallowing most answers.
        assert 0 < counts[INDETERMINATE] < 0.6 * len(decoded), (model, counts)


def test_answers_outside_the_band_are_more_often_right(release: ModelStore, guarded: list[str],
                                                       data_dir: Path) -> None:
    split = predict_split(release, guarded, CTDataset(data_dir).split("test"))
    for model in guarded:
        card = split.cards[model]
        probabilities, threshold = split.calibrated[model], float(card["threshold"])
        right = (probabilities >= threshold) == (split.targets >= 0.5)
        outside = np.abs(probabilities - threshold) >= card_band(card)
        assert right[outside].mean() > right.mean(), model


def test_calibration_lowers_the_error_on_held_out_validation_slices(release: ModelStore, guarded: list[str],
                                                                   data_dir: Path) -> None:
    """Fit on one half of val, measure on the other (and the other way round): the release's
    own calibration method must beat the raw probabilities on slices it was not fitted on."""
    split = predict_split(release, guarded, CTDataset(data_dir).split("val"))
    order = np.random.default_rng(0).permutation(len(split.targets))
    halves = (order[: len(order) // 2], order[len(order) // 2:])
    for model in guarded:
        method = split.cards[model]["calibration"]["method"]
        raw, targets = split.raw[model], split.targets
        before, after = [], []
        for fit, held in (halves, halves[::-1]):
            calibration: Calibration = fit_method(method, raw[fit], targets[fit])
            before.append(calibration_metrics(targets[held], raw[held]))
            after.append(calibration_metrics(targets[held], calibration.apply(raw[held])))
        for metric in ("ece", "brier"):
            assert np.mean([a[metric] for a in after]) < np.mean([b[metric] for b in before]), (model, metric)


@pytest.fixture(scope="module")
def lesion_report(release: ModelStore, data_dir: Path, radiopaedia_dir: Path, sirm_dir: Path,
                  ccccii_dir: Path) -> dict:
    from ctscan.evaluation.reports import lesion_evaluation

    return lesion_evaluation(store=release, data_dirs=[str(radiopaedia_dir), str(sirm_dir), str(ccccii_dir)],
                             split="test", baseline_folders=[str(data_dir), str(radiopaedia_dir)])


def test_the_release_screens_the_other_sites_chest_slices_in(lesion_report: dict) -> None:
    datasets = lesion_report["datasets"]
    # Measured: 10 of 187 Radiopaedia slices (neck and abdomen ends), none of SIRM's 16; CC-CCII's
    # export (every 3rd slice of whole scans) loses 49 of 144 slices at the scan's ends.
    assert datasets["radiopaedia-covid-seg"]["screened_out"] <= 0.08 * datasets["radiopaedia-covid-seg"]["slices"]
    assert datasets["sirm-covid-ct"]["screened_out"] <= 1
    assert datasets["ccccii-pneumonia-sample"]["screened_out"] <= 0.4 * datasets["ccccii-pneumonia-sample"]["slices"]
    density = datasets["radiopaedia-covid-seg"]["rows"]["density-baseline"]
    assert density["matched_pairs"]["concordance"] > 0.9  # the yardstick every release is read against


@pytest.mark.xfail(strict=True, reason="known gap (issue 22): the release ranks clean lungs above infected ones "
                                       "on anatomy-matched Radiopaedia pairs; strict, so a release that fixes it "
                                       "turns this into a failure that asks for the test to be updated")
def test_the_release_ranks_infected_above_clean_slices_of_one_scan(lesion_report: dict) -> None:
    rows = lesion_report["datasets"]["radiopaedia-covid-seg"]["rows"]
    assert rows["ensemble"]["matched_pairs"]["concordance"] >= 0.75
    assert rows["ensemble"]["pooled_auc"] > rows["density-baseline"]["pooled_auc"]
