"""Lesion-true evaluation (ctscan.evaluation.lesion_metrics) on constructed scores and on the real data
sets' slice tables: within-patient AUC, anatomy-matched pairs, served outcome shares, baselines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ctscan.data.dataset import CTDataset
from ctscan.evaluation.lesion_metrics import (
    LesionSet,
    density_score,
    lesion_set,
    matched_pairs,
    outcome_report,
    score_report,
    within_patient,
)


def _set(targets: list[int], patients: list[str], slices: list[float], lungs: list[float]) -> LesionSet:
    return LesionSet(samples=[], targets=np.array(targets, np.float32), in_split=np.ones(len(targets), bool),
                     patients=list(patients), slices=np.array(slices, float), lung_pixels=np.array(lungs, float),
                     extent={p: 100.0 for p in patients})


def test_within_patient_auc_is_read_inside_each_scan_not_across_them() -> None:
    # Patient b's slices all score higher than patient a's: pooled AUC is fooled, within is not.
    targets = np.array([1, 0, 1, 0], np.float32)
    scores = np.array([0.2, 0.1, 0.9, 0.8])
    result = within_patient(targets, scores, ["a", "a", "b", "b"])
    assert result["patients"]["a"]["auc"] == 1.0 and result["patients"]["b"]["auc"] == 1.0
    assert result["mean_auc"] == 1.0
    lesions = _set([1, 0, 1, 0], ["a", "a", "b", "b"], [10, 12, 50, 52], [1000, 1000, 1000, 1000])
    assert score_report(lesions, np.array([0.2, 0.1, 0.9, 0.8]))["pooled_auc"] == 0.75


def test_matched_pairs_only_pair_slices_alike_in_anatomy() -> None:
    # Infected slice 0 matches clean slice 1 (same height, lung area within 20 %); clean slice 2
    # lies far up the scan and clean slice 3 shows half the lung: neither is a pair.
    lesions = _set([1, 0, 0, 0], ["p"] * 4, [40, 45, 90, 41], [1000, 900, 1000, 500])
    right = matched_pairs(lesions, np.array([0.9, 0.1, 0.99, 0.99]))
    assert right == {"pairs": 1, "concordance": 1.0}
    wrong = matched_pairs(lesions, np.array([0.1, 0.9, 0.0, 0.0]))
    assert wrong == {"pairs": 1, "concordance": 0.0}
    assert matched_pairs(lesions, np.array([0.5, 0.5, 0.5, 0.5])) == {"pairs": 1, "concordance": 0.5}


def test_outcome_report_counts_refusals_and_indeterminate_apart() -> None:
    targets = np.array([0, 0, 0, 0, 1, 1], np.float32)
    outcomes = ["covid", "non_covid", "indeterminate", "no_lungs_visible", "covid", "non_covid"]
    report = outcome_report(targets, outcomes)
    clean, infected = report["clean"], report["infected"]
    assert clean == {"slices": 4, "classified": 2, "indeterminate": 1, "refused": 1, "called_covid": 1,
                     "specificity": 0.5, "share_called_covid": 0.5}
    assert infected["recall"] == 0.5 and infected["classified"] == 2


def test_radiopaedia_test_split_has_two_patients_and_228_matched_pairs(radiopaedia_dir: Path) -> None:
    lesions = lesion_set(CTDataset(radiopaedia_dir), "test")
    assert lesions.in_split.all() and len(lesions.samples) == 187
    assert sorted(set(lesions.patients)) == ["patient3", "patient7"]  # type: ignore[type-var]
    pairs = matched_pairs(lesions, np.zeros(len(lesions.samples)))
    # 228 over every slice; 227 once the lung screening has refused its 10 (issue 22 counts 227).
    assert pairs is not None and pairs["pairs"] == 228


def test_ctmd_within_study_adds_the_covid_study_s_clean_slices(ctmd_dir: Path) -> None:
    lesions = lesion_set(CTDataset(ctmd_dir), "test")
    extra = [s for s, inside in zip(lesions.samples, lesions.in_split, strict=True) if not inside]
    # P001's 33 clean slices are not in split.csv (no COVID label); CAP and normal add none.
    assert len(extra) == 33 and all(s.relative_path.startswith("P001/") for s in extra)
    assert not lesions.targets[~lesions.in_split].any()
    infected = lesions.targets[lesions.in_split].sum()
    assert infected == 41
    assert matched_pairs(lesions, np.zeros(len(lesions.samples))) is None  # no lung areas listed


def test_the_untrained_density_score_ranks_radiopaedia_val_slices(radiopaedia_dir: Path) -> None:
    from ctscan.data.dataset import load_prepared

    samples = CTDataset(radiopaedia_dir).split("val")
    scores = np.array([density_score(load_prepared(s, "lung-v1")) for s in samples])
    targets = np.array([s.target for s in samples])
    from sklearn.metrics import roc_auc_score

    # Measured 0.895: the yardstick a network must beat there.
    assert roc_auc_score(targets, scores) > 0.85


@pytest.mark.parametrize("name", ["sirm-covid-ct", "ccccii-pneumonia-sample"])
def test_one_class_sets_report_no_auc(name: str, sirm_dir: Path, ccccii_dir: Path) -> None:
    folder = sirm_dir if name.startswith("sirm") else ccccii_dir
    lesions = lesion_set(CTDataset(folder), "test")
    report = score_report(lesions, np.linspace(0, 1, len(lesions.samples)))
    assert report["pooled_auc"] is None and "within_patient" not in report


def test_lung_segmentation_matches_the_radiologists_masks(radiopaedia_dir: Path, data_dir: Path) -> None:
    from ctscan.evaluation.lesion_metrics import dice, segmentation_report

    assert dice(np.ones((2, 2), bool), np.zeros((2, 2), bool)) == 0.0
    report = segmentation_report(CTDataset(radiopaedia_dir), "val")
    assert report is not None and report["slices"] == 72
    # Measured: lungs 0.951, lung-v2's closed lungs 0.941, lung-v1's per-lung hulls 0.881.
    assert report["dice"]["lungs"]["mean"] > 0.92
    assert report["dice"]["closed"]["mean"] > 0.92
    assert report["dice"]["hull"]["mean"] > 0.85
    assert segmentation_report(CTDataset(data_dir), "val") is None  # UCSD has no masks


def test_cue_correlations_name_what_a_score_follows_besides_the_label() -> None:
    from ctscan.evaluation.lesion_metrics import cue_correlations

    rng = np.random.default_rng(1)
    targets = np.repeat([0.0, 1.0], 40)
    lung_area = rng.uniform(0, 1, 80)
    noise = rng.uniform(0, 1, 80)
    scores = 0.3 * targets + lung_area  # reads the lung area, whatever the lesions
    follows = cue_correlations(scores, {"lung_area": lung_area, "noise": noise}, targets)
    assert follows["lung_area"] > 0.95 and abs(follows["noise"]) < 0.35


@pytest.mark.slow
def test_the_lung_feature_audit_shows_where_the_sources_disagree(data_dir: Path, radiopaedia_dir: Path) -> None:
    """`ctscan audit --lung-features`: on Radiopaedia val (clean and infected slices of the same
    scans) the lungs' density ranks infected slices high; on UCSD val, whose non-COVID class holds
    other lung diseases, it ranks them low (measured: 0.889 and 0.415), so no density-reading
    network can clear a floor on both."""
    def ctscan(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ctscan.cli", *args], capture_output=True, text=True,
                              timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})

    result = ctscan("audit", "--lung-features", "--data", str(data_dir), "--data", str(radiopaedia_dir),
                    "--split", "val", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    ucsd, radiopaedia = report["splits"]["ucsd-covid-ct/val"], report["splits"]["radiopaedia-covid-seg/val"]
    assert ucsd["slices"] + ucsd["screened_out"] == 118 and radiopaedia["slices"] > 60
    assert radiopaedia["auc"]["mean"] > 0.8 and ucsd["auc"]["mean"] < 0.5
    assert "mean" not in report["consistent"]
    assert set(report["features"]) == set(ucsd["auc"])
    table = ctscan("audit", "--lung-features", "--data", str(radiopaedia_dir), "--split", "val")
    assert table.returncode == 0 and "radiopaedia-covid-seg/val" in table.stdout, table.stderr
    # The shortcut audit reads one data set: two are refused with one clear line.
    refused = ctscan("audit", "--data", str(data_dir), "--data", str(radiopaedia_dir))
    assert refused.returncode == 2 and "reads one data set" in refused.stderr, refused.stderr
