"""Lesion-true evaluation: numbers that no scanner, export or anatomy cue can win.

A data set may carry a slice table (`labels.csv`) beside its `split.csv`, naming each slice's
patient (or study), its slice number and, where known, its lung area and whether infection is
visible on it. From it:

- AUC **within each patient** that has infected and clean slices (the same scan, so the same
  scanner and export);
- **matched-pair concordance**: pairs of an infected and a clean slice of one patient with
  lung areas within 20 % of each other and heights within 10 % of the scan, scored as the share
  of pairs in which the infected slice scores higher (ties count half). Anatomy cannot win it;
- two baselines that need (almost) no learning, reported beside every model: the mean
  standardised intensity inside the lung mask (lesions are denser than air-filled lung) and a
  logistic regression on the 16-bin histogram of those intensities.
A network that does not beat the density score on a set has not learned the lesions there.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctscan.data.dataset import CTDataset, Sample
from ctscan.imaging.preprocessing import LUNG_V1, PreparedSlice

SLICE_TABLE = "labels.csv"
HISTOGRAM_BINS = 16
PAIR_LUNG_TOLERANCE = 0.20  # lung areas within 20 % of the larger
PAIR_HEIGHT_TOLERANCE = 0.10  # slice heights within 10 % of the scan's extent
DENSITY = "density-baseline"
HISTOGRAM = "histogram-baseline"
BASELINES = (DENSITY, HISTOGRAM)


@dataclass(frozen=True)
class SliceInfo:
    patient: str
    slice: float | None
    lung_pixels: float | None
    infection: int | None  # 1 infected, 0 clean, None unknown
    diagnosis: str | None


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def read_slice_table(root: Path) -> dict[str, SliceInfo]:
    """{relative path: SliceInfo} from the data set's `labels.csv`; {} when it has none or the
    table names no patient/study. Columns understood: patient or study, slice or slice_index,
    lung_pixels, infection (1/0), diagnosis."""
    path = Path(root) / SLICE_TABLE
    if not path.is_file():
        return {}
    table: dict[str, SliceInfo] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            patient = row.get("patient") or row.get("study") or row.get("case")
            if not row.get("path") or not patient:
                continue
            infection = _number(row.get("infection"))
            table[row["path"]] = SliceInfo(
                patient=patient, slice=_number(row.get("slice") or row.get("slice_index")),
                lung_pixels=_number(row.get("lung_pixels")),
                infection=None if infection is None else int(infection), diagnosis=row.get("diagnosis") or None)
    return table


@dataclass
class LesionSet:
    """The split's slices (`in_split`) and, for within-patient numbers, the clean slices of
    COVID-19 scans that the split leaves out (CT-MD lists its COVID-19 study's clean slices in
    its slice table only). `targets` on those come from the table's `infection`."""

    samples: list[Sample]
    targets: np.ndarray
    in_split: np.ndarray
    patients: list[str | None]
    slices: np.ndarray  # float, nan where unknown
    lung_pixels: np.ndarray  # float, nan where unknown
    extent: dict[str, float]  # per patient: the scan's slice-number range

    def subset(self, keep: np.ndarray) -> LesionSet:
        return LesionSet(samples=[s for s, k in zip(self.samples, keep, strict=True) if k],
                         targets=self.targets[keep], in_split=self.in_split[keep],
                         patients=[p for p, k in zip(self.patients, keep, strict=True) if k],
                         slices=self.slices[keep], lung_pixels=self.lung_pixels[keep], extent=self.extent)


def lesion_set(dataset: CTDataset, split: str) -> LesionSet:
    table = read_slice_table(dataset.root)
    samples = list(dataset.split(split))
    in_split = [True] * len(samples)
    targets = [float(s.target) for s in samples]
    listed = {s.relative_path for s in samples}
    split_patients = {table[s.relative_path].patient for s in samples if s.relative_path in table}
    # Clean slices of COVID-19 patients that the split does not list (they have no label there).
    for relative, info in table.items():
        if relative in listed or info.patient not in split_patients or info.infection is None:
            continue
        if info.diagnosis is not None and "covid" not in info.diagnosis.lower():
            continue
        path = (dataset.root / relative).resolve()
        if not path.is_file():
            continue
        samples.append(Sample(path, relative, "covid" if info.infection else "non_covid", split, dataset.name))
        in_split.append(False)
        targets.append(float(info.infection))
    infos = [table.get(s.relative_path) for s in samples]
    heights: dict[str, list[float]] = {}
    for info in table.values():
        if info.slice is not None:
            heights.setdefault(info.patient, []).append(info.slice)
    ranges = {patient: max(values) - min(values) for patient, values in heights.items()}
    return LesionSet(
        samples=samples, targets=np.array(targets, np.float32), in_split=np.array(in_split),
        patients=[i.patient if i else None for i in infos],
        slices=np.array([i.slice if i and i.slice is not None else np.nan for i in infos], np.float64),
        lung_pixels=np.array([i.lung_pixels if i and i.lung_pixels is not None else np.nan for i in infos],
                             np.float64),
        extent=ranges)


def _auc(targets: np.ndarray, scores: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(targets)) < 2:
        return None
    return float(roc_auc_score(targets.astype(int), scores))


def _finite_auc(targets: np.ndarray, scores: np.ndarray) -> float | None:
    finite = np.isfinite(scores)
    return _auc(targets[finite], scores[finite])


def within_patient(targets: np.ndarray, scores: np.ndarray, patients: Sequence[str | None]) -> dict[str, Any]:
    """AUC inside each patient with both classes, and their mean."""
    result: dict[str, Any] = {}
    for patient in sorted({p for p in patients if p is not None}):
        chosen = np.array([p == patient for p in patients])
        auc = _auc(targets[chosen], scores[chosen])
        if auc is not None:
            result[patient] = {"auc": auc, "infected": int(targets[chosen].sum()),
                               "clean": int((1 - targets[chosen]).sum())}
    if not result:
        return {}
    return {"patients": result, "mean_auc": float(np.mean([r["auc"] for r in result.values()]))}


def matched_pairs(lesions: LesionSet, scores: np.ndarray) -> dict[str, Any] | None:
    """Concordance over anatomy-matched (infected, clean) pairs of one patient; None where the
    table lacks slice numbers or lung areas."""
    if np.isnan(lesions.lung_pixels).all() or np.isnan(lesions.slices).all():
        return None
    concordant, pairs = 0.0, 0
    targets = lesions.targets
    for patient in sorted({p for p in lesions.patients if p is not None}):
        index = np.array([i for i, p in enumerate(lesions.patients) if p == patient])
        extent = lesions.extent.get(patient) or 0.0
        infected = index[targets[index] >= 0.5]
        clean = index[targets[index] < 0.5]
        for i in infected:
            for j in clean:
                lung_i, lung_j = lesions.lung_pixels[i], lesions.lung_pixels[j]
                if np.isnan(lung_i) or np.isnan(lung_j) or max(lung_i, lung_j) <= 0:
                    continue
                if abs(lung_i - lung_j) > PAIR_LUNG_TOLERANCE * max(lung_i, lung_j):
                    continue
                if abs(lesions.slices[i] - lesions.slices[j]) > PAIR_HEIGHT_TOLERANCE * extent:
                    continue
                pairs += 1
                concordant += 1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
    if pairs == 0:
        return {"pairs": 0, "concordance": None}
    return {"pairs": pairs, "concordance": concordant / pairs}


def score_report(lesions: LesionSet, scores: np.ndarray) -> dict[str, Any]:
    """Pooled AUC over the split, within-patient AUC and matched-pair concordance of one score."""
    split = lesions.in_split
    report: dict[str, Any] = {"pooled_auc": _auc(lesions.targets[split], scores[split])}
    inside = within_patient(lesions.targets, scores, lesions.patients)
    if inside:
        report["within_patient"] = inside
    pairs = matched_pairs(lesions, scores)
    if pairs is not None:
        report["matched_pairs"] = pairs
    return report


def outcome_report(targets: np.ndarray, outcomes: Sequence[str]) -> dict[str, Any]:
    """What the served answers were: the share of clean slices called COVID-19, recall on the
    infected ones and specificity on the clean ones, over classified answers (refusals and
    indeterminate answers counted apart)."""
    from ctscan.decision import COVID, INDETERMINATE, NON_COVID, REFUSALS

    outcomes = list(outcomes)
    report: dict[str, Any] = {"slices": len(outcomes)}
    for name, wanted in (("infected", 1.0), ("clean", 0.0)):
        chosen = [o for o, t in zip(outcomes, targets, strict=True) if t == wanted]
        if not chosen:
            continue
        classified = [o for o in chosen if o in (COVID, NON_COVID)]
        covid = sum(o == COVID for o in classified)
        entry: dict[str, Any] = {
            "slices": len(chosen), "classified": len(classified),
            "indeterminate": sum(o == INDETERMINATE for o in chosen),
            "refused": sum(o in REFUSALS for o in chosen), "called_covid": covid,
        }
        if classified:
            share = covid / len(classified)
            entry["recall" if wanted else "specificity"] = share if wanted else 1.0 - share
            if not wanted:
                entry["share_called_covid"] = share
        report[name] = entry
    return report


MASK_FOLDER = "lung_masks"


def dice(found: np.ndarray, truth: np.ndarray) -> float:
    total = int(found.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((found & truth).sum()) / total


def segmentation_report(dataset: CTDataset, split: str | None = None) -> dict[str, Any] | None:
    """Dice of the lung segmentation against the radiologists' lung masks (`lung_masks/`
    beside `images/`, same names), per mask kind of `ctscan.imaging.preprocessing.lung_masks`; None
    when the data set has no masks."""
    from PIL import Image

    from ctscan.data.dataset import decode_sample
    from ctscan.imaging.preprocessing import lung_masks

    folder = dataset.root / MASK_FOLDER
    if not folder.is_dir():
        return None
    samples = [s for s in dataset.samples if split is None or s.split == split]
    scores: dict[str, list[float]] = {}
    for sample in samples:
        mask_path = folder / sample.relative_path.split("/", 1)[-1]
        if not mask_path.is_file():
            continue
        truth = np.asarray(Image.open(mask_path).convert("L")) > 127
        for kind, found in lung_masks(decode_sample(sample)).items():
            if found.shape != truth.shape:
                found = np.asarray(Image.fromarray(found).resize(truth.shape[::-1], Image.Resampling.NEAREST))
            scores.setdefault(kind, []).append(dice(found, truth))
    return {"split": split, "slices": len(next(iter(scores.values()), [])),
            "dice": {kind: {"mean": float(np.mean(v)), "median": float(np.median(v)),
                            "below_0.8": float(np.mean(np.array(v) < 0.8))} for kind, v in scores.items()}}


def slice_cues(prepared: Sequence[PreparedSlice], lesions: LesionSet) -> dict[str, np.ndarray]:
    """What a score might follow instead of the lesions, per slice: the lungs' density (what
    lesions change), how much of the crop the lungs fill, the lung area against the body, the
    crop's sharpness (variance of the Laplacian inside the lungs: export and reconstruction
    kernel), and, from the slice table, the lung area and the height in the scan."""
    from scipy import ndimage

    def sharpness(item: PreparedSlice) -> float:
        if item.lung_mask is None or not item.lung_mask.any():
            return float("nan")
        return float(ndimage.laplace(item.grey.astype(np.float32) / 255.0)[item.lung_mask].var())

    cues = {
        "density": np.array([density_score(p) for p in prepared]),
        "crop_lung_share": np.array([float(p.lung_mask.mean()) if p.lung_mask is not None else np.nan
                                     for p in prepared]),
        "lung_fraction": np.array([p.findings.lung_fraction if p.findings else np.nan for p in prepared]),
        "sharpness": np.array([sharpness(p) for p in prepared]),
    }
    if not np.isnan(lesions.lung_pixels).all():
        cues["lung_pixels"] = lesions.lung_pixels
    if not np.isnan(lesions.slices).all():
        heights = [(s - np.nanmin(lesions.slices[[q == p for q in lesions.patients]])) / lesions.extent[p]
                   if p in lesions.extent and lesions.extent[p] > 0 else np.nan
                   for s, p in zip(lesions.slices, lesions.patients, strict=True)]
        cues["slice_height"] = np.array(heights, np.float64)
    return cues


def cue_correlations(scores: np.ndarray, cues: dict[str, np.ndarray], targets: np.ndarray) -> dict[str, Any]:
    """Spearman correlation of a score with each cue inside each class (the label fixed, so
    what is left is what the score follows besides the label), averaged over the classes."""
    from scipy.stats import spearmanr

    result: dict[str, Any] = {}
    for name, values in cues.items():
        per_class = []
        for label in (0.0, 1.0):
            chosen = (targets == label) & np.isfinite(values) & np.isfinite(scores)
            if chosen.sum() >= 5 and np.ptp(values[chosen]) > 0 and np.ptp(scores[chosen]) > 0:
                per_class.append(float(spearmanr(scores[chosen], values[chosen]).statistic))
        if per_class:
            result[name] = float(np.mean(per_class))
    return result


def lung_intensities(prepared: PreparedSlice) -> np.ndarray:
    """Standardised intensities (0..1) inside the lung mask of a lung-v1 slice."""
    if prepared.lung_mask is None or not prepared.lung_mask.any():
        return np.zeros(0, np.float32)
    return prepared.grey[prepared.lung_mask].astype(np.float32) / 255.0


def density_score(prepared: PreparedSlice) -> float:
    values = lung_intensities(prepared)
    return float(values.mean()) if values.size else 0.0


def histogram_features(prepared: PreparedSlice) -> np.ndarray:
    values = lung_intensities(prepared)
    counts, _ = np.histogram(values, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    return (counts / max(values.size, 1)).astype(np.float64)


class HistogramBaseline:
    """Logistic regression (standardised features, C 0.1) on the lung histogram, trained on
    the train splits of the sources the networks were trained on, weighted like them."""

    def __init__(self) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        self.trained_on: list[str] = []

    def fit(self, features: np.ndarray, targets: np.ndarray, weights: np.ndarray | None,
            sources: list[str]) -> HistogramBaseline:
        self.model.fit(features, targets.astype(int), logisticregression__sample_weight=weights)
        self.trained_on = sources
        return self

    def score(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict_proba(features)[:, 1])


def prepared_for_baselines(decoded: Sequence[Any]) -> list[PreparedSlice]:
    from ctscan.imaging.preprocessing import prepare

    return [prepare(d, LUNG_V1) for d in decoded]


# Untrained lung features (standardised lung-v1 intensities inside the lung mask) whose
# direction the feature audit compares across sources and splits. Lesions raise the first
# ones; the last two are texture and where in the lung the density sits.
LUNG_FEATURES = ("mean", "p10", "p50", "p90", "std", "above_0.3", "above_0.8", "texture", "rim_minus_core")
GROUND_GLASS_LEVEL = 0.3  # between aerated lung (AIR_LEVEL 0.08) and soft tissue (1.0)
CONSOLIDATION_LEVEL = 0.8


def lung_features(prepared: PreparedSlice) -> dict[str, float]:
    """LUNG_FEATURES of one lung-v1 slice (NaN without a lung mask)."""
    from scipy import ndimage

    values = lung_intensities(prepared)
    if values.size < 20 or prepared.lung_mask is None:
        return dict.fromkeys(LUNG_FEATURES, float("nan"))
    grey, mask = prepared.grey.astype(np.float32) / 255.0, prepared.lung_mask
    p10, p50, p90 = np.percentile(values, (10, 50, 90))
    depth = ndimage.distance_transform_edt(mask)
    rim = mask & (depth < np.percentile(depth[mask], 40))  # the outer 40 %: where COVID-19 GGO starts
    return {"mean": float(values.mean()), "p10": float(p10), "p50": float(p50), "p90": float(p90),
            "std": float(values.std()), "above_0.3": float((values > GROUND_GLASS_LEVEL).mean()),
            "above_0.8": float((values > CONSOLIDATION_LEVEL).mean()),
            "texture": float(np.abs(ndimage.gaussian_laplace(grey, 1.0))[mask].mean()),
            "rim_minus_core": float(grey[rim].mean() - grey[mask & ~rim].mean()) if (mask & ~rim).any() else 0.0}


def lung_feature_audit(data_dirs: Sequence[str], splits: Sequence[str] = ("train", "val", "test")) -> dict[str, Any]:
    """AUC of every untrained lung feature on each source's splits (above 0.5: higher on
    COVID-19 slices), and the features whose direction holds on all of them. A feature, or a
    network that learns it, cannot be selected on a split where it points the other way:
    this shows where the sources' labels disagree about what infection looks like."""
    from ctscan.data.dataset import decode_sample
    from ctscan.imaging.preprocessing import prepare

    table: dict[str, dict[str, Any]] = {}
    for folder in data_dirs:
        dataset = CTDataset(folder)
        for split in splits:
            if not any(s.split == split for s in dataset.samples):
                continue  # a test-only set (CT-MD) has no train or val split
            samples = dataset.split(split)
            prepared = [prepare(decode_sample(s), LUNG_V1) for s in samples]
            kept = [(s, p) for s, p in zip(samples, prepared, strict=True) if p.lungs_visible]
            targets = np.array([s.target for s, _ in kept], np.float64)
            features = [lung_features(p) for _, p in kept]
            table[f"{dataset.name}/{split}"] = {
                "slices": len(kept), "screened_out": len(samples) - len(kept),
                "auc": {name: _finite_auc(targets, np.array([f[name] for f in features], np.float64))
                        for name in LUNG_FEATURES}}
    directions = {name: {np.sign(row["auc"][name] - 0.5) for row in table.values() if row["auc"][name] is not None}
                  for name in LUNG_FEATURES}
    return {"features": list(LUNG_FEATURES), "splits": table,
            "consistent": [name for name, signs in directions.items() if len(signs) == 1],
            "note": "AUC of the untrained feature as a score; above 0.5 means higher on COVID-19 slices"}
