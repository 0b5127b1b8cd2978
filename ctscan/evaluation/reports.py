"""Evaluate the store's production models (and their ensemble) on one split of a dataset.

Each model gets the preprocessing and input size its card names, and its probabilities
are calibrated as its card says. The ensemble is the mean of the members' calibrated
probabilities, calibrated again; its calibration and threshold are fitted on `val`
(`calibrate_ensemble`) for named member versions and stored beside the models, never
chosen on the split reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ctscan import DISCLAIMER
from ctscan.calibration import Calibration, calibration_metrics, fit_calibration, reliability_plot
from ctscan.data.dataset import CTDataset, Sample, decode_sample
from ctscan.decision import DEFAULT_BAND, choose_band
from ctscan.errors import CTScanError, StoreError
from ctscan.evaluation.robustness import attention_report, robustness_report
from ctscan.gradcam import make_gradcam
from ctscan.imaging.decoding import DecodedImage
from ctscan.imaging.preprocessing import LUNG_V1, card_preprocessing, get_preprocessor, prepare
from ctscan.metrics import choose_threshold, full_report
from ctscan.models import ENSEMBLE, architecture_names, get_spec, load_keras_model
from ctscan.serving.predictor import EnsembleNotCalibratedError, card_band, ensemble_record_for
from ctscan.settings import PromotionSettings
from ctscan.storage.records import EnsembleRecord, ModelCard
from ctscan.storage.store import ModelStore
from ctscan.training.runs import _subset, predict_probabilities

__all__ = ["ENSEMBLE", "calibrate_ensemble", "ensemble_record_for", "evaluate_store", "predict_split"]


def _resolve_models(store: ModelStore, models: str | list[str]) -> list[str]:
    names = list(architecture_names()) if models == "all" else ([models] if isinstance(models, str) else models)
    for name in names:
        get_spec(name)
    available = [n for n in names if store.production(n)]
    if not available:
        raise StoreError(f"no production model for {', '.join(names)} in {store.url}; "
                         "train one or run `ctscan models seed`")
    if models != "all" and len(available) != len(names):
        missing = sorted(set(names) - set(available))
        raise StoreError(f"no production version of {', '.join(missing)} in {store.url}")
    return available


@dataclass
class SplitPredictions:
    """One data set split seen by the production models: decoded slices (kept for the
    robustness and attention checks), whether lungs were found, and each model's raw and
    calibrated probabilities."""

    samples: list[Sample]
    targets: np.ndarray
    decoded: list[DecodedImage]
    lungs_visible: np.ndarray
    cards: dict[str, ModelCard] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, np.ndarray] = field(default_factory=dict)
    calibrated: dict[str, np.ndarray] = field(default_factory=dict)

    def inputs(self, preprocessing: str, size: int) -> np.ndarray:
        preprocessor = get_preprocessor(preprocessing)
        return np.stack([preprocessor(d).model_input(size) for d in self.decoded]).astype(np.float32)


def decode_samples(samples: list[Sample], *, workers: int = 4) -> list[DecodedImage]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(decode_sample, samples))


def predict_split(store: ModelStore, names: list[str], samples: list[Sample],
                  versions: dict[str, str] | None = None) -> SplitPredictions:
    """Probabilities of each production model (or the version `versions` names) on
    `samples`, each model fed its own preprocessing and input size, and calibrated as its
    card says."""
    decoded = decode_samples(samples)
    visible = np.array([prepare(d, LUNG_V1).lungs_visible for d in decoded])
    result = SplitPredictions(samples=samples, targets=np.array([s.target for s in samples], dtype=np.float32),
                              decoded=decoded, lungs_visible=visible)
    cache: dict[tuple[str, int], np.ndarray] = {}
    for name in names:
        model, card = load_keras_model(store, name, (versions or {}).get(name))
        key = (card_preprocessing(card), int(card["input_size"]))
        if key not in cache:
            cache[key] = result.inputs(*key)
        result.models[name], result.cards[name] = model, card
        result.raw[name] = predict_probabilities(model, cache[key])
        result.calibrated[name] = Calibration.from_dict(card.get("calibration")).apply(result.raw[name])
    return result


def ensemble_probabilities(calibrated_members: list[np.ndarray], record: EnsembleRecord | None) -> np.ndarray:
    """Mean of the members' calibrated probabilities, calibrated again as the record says."""
    mean = np.mean(calibrated_members, axis=0)
    return Calibration.from_dict(record.get("calibration") if record is not None else None).apply(mean)


class NoEnsembleMembersError(CTScanError):
    """No production model clears the promotion floors on every val source."""


@dataclass(frozen=True)
class MemberChoice:
    """Which production models the ensemble combines, and why the others are left out."""

    members: list[str]
    rule: Literal["floors", "explicit"]
    excluded: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, str] = field(default_factory=dict)  # explicit members below the floors


def choose_members(store: ModelStore, *, members: list[str] | None = None,
                   floors: PromotionSettings | None = None,
                   measured: Mapping[str, ModelCard] | None = None) -> MemberChoice:
    """The ensemble's members: `members` when given (explicit, an admin's override of the
    floors), else every production model that clears the promotion floors on every val
    source (`ctscan.publishing.below_floors`, the gate's own rule), both as its card says and,
    with `measured` (its card with val metrics measured on those of the ensemble's val sources
    its card has no numbers for), there too: a model validated on one source only cannot
    clear the floors by never having been judged on the others. Raises
    NoEnsembleMembersError naming each model's failure when none does."""
    from ctscan.publishing import below_floors

    production = _resolve_models(store, "all")

    def failure(name: str) -> str | None:
        reason = below_floors(store.card(name, str(store.production(name))), floors)
        if reason is None and measured is not None and name in measured:
            reason = below_floors(measured[name], floors)
            reason = None if reason is None else f"on the ensemble's val sources, {reason}"
        return reason

    failures = {name: reason for name in production if (reason := failure(name)) is not None}
    if members:
        chosen = _resolve_models(store, list(dict.fromkeys(members)))
        left_out = {name: "not among the explicit members (--members)" + (f"; {failures[name]}" if name in failures
                                                                          else "")
                    for name in production if name not in chosen}
        return MemberChoice(chosen, "explicit", left_out, {n: failures[n] for n in chosen if n in failures})
    passing = [name for name in production if name not in failures]
    if not passing:
        raise NoEnsembleMembersError(
            "no production model clears the promotion floors on every val source, so the ensemble would ship "
            "none: " + "; ".join(f"{name} {store.production(name)}: {reason}" for name, reason in failures.items())
            + ". Train better models, or name the members explicitly (--members a,b) to override the floors")
    return MemberChoice(passing, "floors", dict(failures))


def calibrate_ensemble(
    *, store: ModelStore, data_dir: str, limit_per_class: int | None = None, rule: str = "youden",
    members: list[str] | None = None, extra_data_dirs: list[str] | None = None,
    floors: PromotionSettings | None = None,
) -> EnsembleRecord:
    """Choose the ensemble's members (`choose_members`: `members` explicitly, else the
    production models that clear the promotion floors on every val source), fit its
    calibration and threshold on the val split for their current production versions, and
    store them with those versions (which the ensemble then serves, pinned, until it is
    calibrated again) and the models left out with why. With `extra_data_dirs`, on the val
    splits of every source together (each source's numbers recorded apart, as for a model).
    One member is allowed: the ensemble is then that model with its own val calibration."""
    from ctscan.training.runs import combined_fingerprint

    datasets = [CTDataset(folder) for folder in [data_dir, *(extra_data_dirs or [])]]
    samples = [s for dataset in datasets for s in _subset(dataset.split("val"), limit_per_class, 42)]
    fingerprints = {d.name: d.fingerprint() for d in datasets}  # read once: every candidate is checked on them
    candidates = list(dict.fromkeys([*_resolve_models(store, "all"), *(members or [])]))
    split = predict_split(store, candidates, samples)
    targets = split.targets
    measured = {name: card for name in candidates
                if (card := _measured_on_unseen_sources(split, name, fingerprints)) is not None}
    choice = choose_members(store, members=members, floors=floors, measured=measured)
    names = choice.members
    mean = np.mean([split.calibrated[n] for n in names], axis=0)
    calibration, comparison = fit_calibration(mean, targets)
    probabilities = calibration.apply(mean)
    threshold = choose_threshold(targets, probabilities, rule)
    record = EnsembleRecord(
        members={n: str(split.cards[n].version) for n in names},
        members_rule=choice.rule,
        excluded=choice.excluded,
        overrides=choice.overrides or None,
        threshold=threshold,
        threshold_rule=rule,
        dataset_fingerprint=next(iter(fingerprints.values())) if len(fingerprints) == 1 else combined_fingerprint(
            [{"fingerprint": f} for f in fingerprints.values()]),
        metrics={"val": full_report(targets, probabilities, threshold), **_by_source(samples, targets, probabilities,
                                                                                     threshold)},
        created_at=datetime.now(UTC).isoformat(),
        uncertainty={**choose_band(targets, probabilities, threshold), "fitted_on": "val"},
        calibration={**calibration.as_dict(), "fitted_on": "val", "comparison": comparison,
                     "before": calibration_metrics(targets, mean),
                     "after": calibration_metrics(targets, probabilities)},
    )
    store.save_ensemble_record(record)
    return record


def _measured_on_unseen_sources(split: SplitPredictions, name: str, fingerprints: dict[str, str]) -> ModelCard | None:
    """`name`'s card with its val metrics measured on those of the ensemble's val sources its
    card has no numbers for (a model trained and validated on UCSD alone has never been judged
    on Radiopaedia val); None when its card covers them all. Its own threshold and calibration."""
    card = split.cards[name]
    recorded = card.dataset or {}
    seen = {recorded.get("fingerprint")} | {s.get("fingerprint") for s in recorded.get("sources") or []}
    unseen = sorted(source for source, fingerprint in fingerprints.items() if fingerprint not in seen)
    sources = np.array([s.source for s in split.samples])
    chosen = np.isin(sources, unseen)
    if not chosen.any():
        return None
    targets, probabilities = split.targets, split.calibrated[name]
    return card.model_copy(update={"metrics": {  # per source even for one: the refusal names it
        "val": full_report(targets[chosen], probabilities[chosen], card.threshold),
        "val_sources": {source: full_report(targets[sources == source], probabilities[sources == source],
                                            card.threshold) for source in unseen}}})


def _by_source(samples: list[Sample], targets: np.ndarray, probabilities: np.ndarray,
               threshold: float) -> dict[str, Any]:
    sources = np.array([s.source for s in samples])
    names = sorted(set(sources.tolist()))
    if len(names) < 2:
        return {}
    return {"val_sources": {name: full_report(targets[sources == name], probabilities[sources == name], threshold)
                            for name in names}}


def _save_plots(out_dir: Path, name: str, targets: np.ndarray, probabilities: np.ndarray,
                report: dict[str, Any], raw: np.ndarray | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

    out_dir.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    RocCurveDisplay.from_predictions(targets.astype(int), probabilities, ax=axis, name=name)
    axis.set_title(f"ROC - {name}")
    figure.tight_layout()
    figure.savefig(out_dir / f"roc_{name}.png", dpi=100)
    plt.close(figure)
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    ConfusionMatrixDisplay(np.array(report["confusion_matrix"]),
                           display_labels=["non-COVID", "COVID"]).plot(ax=axis, colorbar=False)
    axis.set_title(f"{name} (threshold {report['threshold']:.3f})")
    figure.tight_layout()
    figure.savefig(out_dir / f"confusion_{name}.png", dpi=100)
    plt.close(figure)
    curves = {"calibrated": (targets, probabilities)}
    if raw is not None:
        curves = {"raw score": (targets, raw), **curves}
    reliability_plot(out_dir / f"reliability_{name}.png", curves, title=f"Reliability - {name}")


def uncertainty_summary(targets: np.ndarray, probabilities: np.ndarray, threshold: float,
                        band: float = DEFAULT_BAND) -> dict[str, Any]:
    """How often an answer falls in the indeterminate band around the threshold, and how
    accurate the answers outside it are."""
    inside = np.abs(probabilities - threshold) < band
    outside = ~inside
    accuracy = float(np.mean((probabilities[outside] >= threshold) == (targets[outside] >= 0.5))) \
        if outside.any() else None
    return {"band": band, "indeterminate_share": float(inside.mean()), "accuracy_outside_band": accuracy}


def _model_report(split: SplitPredictions, probabilities: np.ndarray, threshold: float, *,
                  raw: np.ndarray | None, resamples: int, band: float) -> dict[str, Any]:
    targets = split.targets
    metrics = full_report(targets, probabilities, threshold, resamples=resamples)
    metrics["calibration"] = {"after": calibration_metrics(targets, probabilities)}
    if raw is not None:
        metrics["calibration"]["before"] = calibration_metrics(targets, raw)
    metrics["uncertainty"] = uncertainty_summary(targets, probabilities, threshold, band)
    visible = split.lungs_visible
    metrics["lung_gate"] = {"slices_with_lungs": int(visible.sum()), "slices": len(visible),
                            "coverage": float(visible.mean())}
    if 0 < visible.sum() < len(visible) and len(np.unique(targets[visible])) == 2:
        metrics["lung_gate"]["metrics"] = full_report(targets[visible], probabilities[visible], threshold,
                                                      resamples=resamples)
    return metrics


def evaluate_store(
    *,
    store: ModelStore,
    data_dir: str,
    models: str = "all",
    split: str = "test",
    out_dir: Path | None = None,
    resamples: int = 1000,
    robustness: bool = False,
    attention: bool = False,
) -> dict[str, Any]:
    """Metrics of each production model and the ensemble on one split of a data set, with
    calibration (ECE, Brier before and after), the indeterminate band, the lung gate's
    coverage and, when asked, robustness to benign changes and Grad-CAM attention."""
    names = _resolve_models(store, models)
    dataset = CTDataset(data_dir)
    dataset.verify_checksums()
    samples = dataset.split(split)
    predictions = predict_split(store, names, samples)
    targets = predictions.targets
    report: dict[str, Any] = {
        "split": split,
        "dataset": {"path": str(dataset.root), "fingerprint": dataset.fingerprint(), "images": len(samples)},
        "positive_class": "covid",
        "intended_use": DISCLAIMER,
        "models": {},
    }
    for name in names:
        card = predictions.cards[name]
        threshold = float(card["threshold"])
        metrics = _model_report(predictions, predictions.calibrated[name], threshold,
                                raw=predictions.raw[name] if card.get("calibration") else None, resamples=resamples,
                                band=card_band(card))
        preprocessing, size = card_preprocessing(card), int(card["input_size"])
        metrics.update(version=card["version"], init=card.get("init"), input_size=size, preprocessing=preprocessing)
        model = predictions.models[name]
        calibration = Calibration.from_dict(card.get("calibration"))
        if robustness:
            def predict(batch: np.ndarray, model: Any = model, calibration: Calibration = calibration) -> np.ndarray:
                return calibration.apply(predict_probabilities(model, batch))

            metrics["robustness"] = robustness_report(
                predict, predictions.decoded, targets, preprocessing=preprocessing, size=size, threshold=threshold,
                baseline=predictions.calibrated[name])
        if attention:
            covid = [d for d, t in zip(predictions.decoded, targets, strict=True) if t >= 0.5]
            metrics["attention"] = attention_report(make_gradcam(model), covid, preprocessing=preprocessing,
                                                    size=size)
        report["models"][name] = metrics
        if out_dir is not None:
            _save_plots(Path(out_dir), name, targets, predictions.calibrated[name], metrics,
                        raw=predictions.raw[name] if card.get("calibration") else None)
    if models == "all":
        try:
            record = ensemble_record_for(store)
        except EnsembleNotCalibratedError as exc:
            if len(names) >= 2:  # one model and no record: there is no ensemble to speak of
                report["models"][ENSEMBLE] = {"error": str(exc)}
            return report
        members = dict(record.members)
        calibrated = _member_probabilities(store, predictions, members)
        probabilities = ensemble_probabilities(calibrated, record)
        mean = np.mean(calibrated, axis=0)
        metrics = _model_report(predictions, probabilities, float(record["threshold"]),
                                raw=mean if record.get("calibration") else None, resamples=resamples,
                                band=card_band(record))
        metrics.update(members=members, threshold_source="val-calibrated", members_rule=record.members_rule,
                       excluded=record.excluded or {})
        report["models"][ENSEMBLE] = metrics
        if out_dir is not None:
            _save_plots(Path(out_dir), ENSEMBLE, targets, probabilities, metrics,
                        raw=mean if record.get("calibration") else None)
    return report


def _member_probabilities(store: ModelStore, predictions: SplitPredictions, members: dict[str, str]
                          ) -> list[np.ndarray]:
    """Each ensemble member's calibrated probabilities on the split, from its pinned version:
    the production model's where the versions agree, else the pinned version run apart."""
    pinned = {n: v for n, v in members.items()
              if n not in predictions.cards or predictions.cards[n].version != v}
    apart = predict_split(store, list(pinned), predictions.samples, versions=pinned) if pinned else None
    return [apart.calibrated[n] if apart is not None and n in pinned else predictions.calibrated[n]
            for n in members]


def baseline_sources(store: ModelStore, names: list[str]) -> list[str]:
    """The data folders the production models were trained on (their cards' sources), where
    they exist on this machine: the histogram baseline is trained on the same train splits."""
    folders: list[str] = []
    for name in names:
        card = store.card(name, str(store.production(name)))
        data = card.dataset or {}
        for source in data.get("sources") or [{"path": data.get("path")}]:
            path = source.get("path")
            if path and (Path(path) / "split.csv").is_file() and path not in folders:
                folders.append(str(path))
    return folders


def fit_histogram_baseline(folders: list[str]) -> Any:
    """The lung-histogram logistic regression on the train splits of `folders`, each slice
    weighted like the networks' (classes balanced within each source, sources alike)."""
    from ctscan.data.dataset import source_weights
    from ctscan.evaluation.lesion_metrics import HistogramBaseline, histogram_features, prepared_for_baselines

    samples = [s for folder in folders for s in CTDataset(folder).split("train")]
    if not samples:
        return None
    prepared = prepared_for_baselines(decode_samples(samples))
    targets = np.array([s.target for s in samples], np.float32)
    weights = source_weights(targets, np.array([s.source for s in samples]))
    features = np.stack([histogram_features(p) for p in prepared])
    return HistogramBaseline().fit(features, targets, weights, [Path(f).name for f in folders])


def _served_scores(results: list[Any], rule: Any) -> np.ndarray:
    """The served probability of each slice; for slices a model's gate refused, the one it
    would have given (the members' outputs exist); NaN where the lung screening refused
    (no model saw the slice)."""
    scores = []
    for result in results:
        if result.decision.probability_covid is not None:
            scores.append(float(result.decision.probability_covid))
        elif result.members:
            mean = float(np.mean([o.probability for o in result.members]))
            scores.append(float(rule.calibration.apply(np.array([mean]))[0]) if rule is not None else mean)
        else:
            scores.append(np.nan)
    return np.array(scores, np.float64)


def _served_rows(predictor: Any, decoded: list[DecodedImage], served: list[str]) -> dict[str, Any]:
    """Each served model's scores and outcomes. The members run once: a member's own answer
    is the decision rule applied to its output alone, as the service does for that model."""
    from ctscan.serving.predictor import slice_decision

    model = ENSEMBLE if ENSEMBLE in served else served[0]
    results = predictor.classify(decoded, model=model)
    rule = predictor.ensemble if model == ENSEMBLE else None
    rows = {model: {"scores": _served_scores(results, rule), "outcomes": [r.decision.outcome for r in results]}}
    # The ensemble's outputs stand for a single model only where it ran that model's
    # production version (its pinned versions may lag production; a subset leaves some out).
    shared = {m.name for m in predictor.ensemble_members if predictor.models.get(m.name) is m} \
        if model == ENSEMBLE else {model}
    for name in served:
        if name == model:
            continue
        if name not in shared:
            alone = predictor.classify(decoded, model=name)
            rows[name] = {"scores": _served_scores(alone, None), "outcomes": [r.decision.outcome for r in alone]}
            continue
        outcomes, scores = [], []
        for result in results:
            output = next((m for m in result.members if m.name == name), None)
            if output is None:  # refused before any model ran
                outcomes.append(result.decision.outcome)
                scores.append(np.nan)
                continue
            outcomes.append(slice_decision([output], ensemble=None).outcome)
            scores.append(output.probability)
        rows[name] = {"scores": np.array(scores, np.float64), "outcomes": outcomes}
    return rows


def lesion_evaluation(*, store: ModelStore, data_dirs: list[str], split: str = "test", models: str = "all",
                      baseline_folders: list[str] | None = None) -> dict[str, Any]:
    """Lesion-true numbers (`ctscan.evaluation.lesion_metrics`) of each served model, the ensemble and
    the two baselines on each data set: pooled AUC, AUC within each patient, matched-pair
    concordance, and what the served answers were (share of clean slices called COVID-19,
    recall, specificity; refusals and indeterminate answers apart). Scores are the served
    probabilities (screening, gate, calibration as the service applies them)."""
    from ctscan.evaluation.lesion_metrics import (
        DENSITY,
        HISTOGRAM,
        cue_correlations,
        density_score,
        histogram_features,
        lesion_set,
        outcome_report,
        prepared_for_baselines,
        score_report,
        segmentation_report,
        slice_cues,
    )
    from ctscan.serving.predictor import Predictor

    names = _resolve_models(store, models)
    predictor = Predictor.from_store(store, names)
    served = [*predictor.models, *([ENSEMBLE] if predictor.ensemble is not None and len(names) > 1 else [])]
    folders = baseline_folders if baseline_folders is not None else baseline_sources(store, names)
    histogram = fit_histogram_baseline(folders) if folders else None
    report: dict[str, Any] = {
        "split": split, "intended_use": DISCLAIMER,
        "models": {n: {"version": m.version, "init": m.card.get("init"), "input_size": m.input_size,
                       "preprocessing": m.preprocessing} for n, m in predictor.models.items()},
        "baselines": {DENSITY: "mean lung-v1 intensity inside the lung mask (no training)",
                      HISTOGRAM: f"logistic regression on the {16}-bin lung histogram, trained on the train "
                                 f"split of {', '.join(Path(f).name for f in folders) or 'nothing (not fitted)'}"},
        "datasets": {},
    }
    for folder in data_dirs:
        dataset = CTDataset(folder)
        dataset.verify_checksums()
        lesions = lesion_set(dataset, split)
        decoded = decode_samples(lesions.samples)
        screened = np.ones(len(decoded), bool)
        rows = _served_rows(predictor, decoded, served)
        for row in rows.values():
            screened &= np.isfinite(row["scores"])
        prepared = prepared_for_baselines(decoded)
        baseline_scores = {DENSITY: np.array([density_score(p) for p in prepared])}
        if histogram is not None:
            baseline_scores[HISTOGRAM] = histogram.score(np.stack([histogram_features(p) for p in prepared]))
        scored = lesions.subset(screened)
        cues = {name: values[screened] for name, values in slice_cues(prepared, lesions).items()}
        entry: dict[str, Any] = {
            "path": str(dataset.root), "fingerprint": dataset.fingerprint(),
            "slices": int(lesions.in_split.sum()), "extra_within_patient_slices": int((~lesions.in_split).sum()),
            "screened_out": int((~screened).sum()), "rows": {},
        }
        for model, row in rows.items():
            entry["rows"][model] = {**score_report(scored, row["scores"][screened]),
                                    "follows": cue_correlations(row["scores"][screened], cues, scored.targets),
                                    "served": outcome_report(lesions.targets[lesions.in_split],
                                                             [o for o, keep in zip(row["outcomes"], lesions.in_split,
                                                                                   strict=True) if keep])}
        for name, scores in baseline_scores.items():
            entry["rows"][name] = score_report(scored, scores[screened])
        segmentation = segmentation_report(dataset, split)
        if segmentation is not None:
            entry["segmentation"] = segmentation
        report["datasets"][dataset.name] = entry
    return report

