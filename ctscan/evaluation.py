"""Evaluate the store's production models (and their ensemble) on one split of a dataset.

Each model gets the preprocessing and input size its card names, and its probabilities
are calibrated as its card says. The ensemble is the mean of the members' calibrated
probabilities, calibrated again; its calibration and threshold are fitted on `val`
(`calibrate_ensemble`) for named member versions and stored beside the models, never
chosen on the split reported.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ctscan import DISCLAIMER
from ctscan.calibration import Calibration, calibration_metrics, fit_calibration, reliability_plot
from ctscan.data import CTDataset, Sample, decode_sample
from ctscan.decision import DEFAULT_BAND, choose_band
from ctscan.errors import CTScanError, StoreError
from ctscan.gradcam import make_gradcam
from ctscan.imaging import DecodedImage
from ctscan.metrics import choose_threshold, full_report
from ctscan.models import ENSEMBLE, architecture_names, get_spec, load_keras_model
from ctscan.predictor import EnsembleNotCalibratedError, card_band, ensemble_record_for
from ctscan.preprocessing import LUNG_V1, card_preprocessing, get_preprocessor, prepare
from ctscan.robustness import attention_report, robustness_report
from ctscan.storage.records import EnsembleRecord, ModelCard
from ctscan.storage.store import ModelStore
from ctscan.training import _subset, predict_probabilities

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


def predict_split(store: ModelStore, names: list[str], samples: list[Sample]) -> SplitPredictions:
    """Probabilities of each production model on `samples`, each model fed its own
    preprocessing and input size, and calibrated as its card says."""
    decoded = decode_samples(samples)
    visible = np.array([prepare(d, LUNG_V1).lungs_visible for d in decoded])
    result = SplitPredictions(samples=samples, targets=np.array([s.target for s in samples], dtype=np.float32),
                              decoded=decoded, lungs_visible=visible)
    cache: dict[tuple[str, int], np.ndarray] = {}
    for name in names:
        model, card = load_keras_model(store, name)
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


def calibrate_ensemble(
    *, store: ModelStore, data_dir: str, limit_per_class: int | None = None, rule: str = "youden",
    models: list[str] | None = None,
) -> EnsembleRecord:
    """Fit the ensemble's calibration and threshold on the val split for the current
    production versions of its members (`models`, default every architecture with one), and
    store them with the member versions."""
    names = _resolve_models(store, models or "all")
    if len(names) < 2:
        raise CTScanError("an ensemble needs at least two production models")
    dataset = CTDataset(data_dir)
    samples = _subset(dataset.split("val"), limit_per_class, 42)
    split = predict_split(store, names, samples)
    targets = split.targets
    mean = np.mean([split.calibrated[n] for n in names], axis=0)
    calibration, comparison = fit_calibration(mean, targets)
    probabilities = calibration.apply(mean)
    threshold = choose_threshold(targets, probabilities, rule)
    record = EnsembleRecord(
        members={n: str(split.cards[n].version) for n in names},
        threshold=threshold,
        threshold_rule=rule,
        dataset_fingerprint=dataset.fingerprint(),
        metrics={"val": full_report(targets, probabilities, threshold)},
        created_at=datetime.now(UTC).isoformat(),
        uncertainty={**choose_band(targets, probabilities, threshold), "fitted_on": "val"},
        calibration={**calibration.as_dict(), "fitted_on": "val", "comparison": comparison,
                     "before": calibration_metrics(targets, mean),
                     "after": calibration_metrics(targets, probabilities)},
    )
    store.save_ensemble_record(record)
    return record


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
    if len(names) >= 2 and models == "all":
        members = {n: predictions.cards[n]["version"] for n in names}
        try:
            record = ensemble_record_for(store, members)
        except EnsembleNotCalibratedError as exc:
            report["models"][ENSEMBLE] = {"error": str(exc), "members": members}
            return report
        probabilities = ensemble_probabilities([predictions.calibrated[n] for n in names], record)
        mean = np.mean([predictions.calibrated[n] for n in names], axis=0)
        metrics = _model_report(predictions, probabilities, float(record["threshold"]),
                                raw=mean if record.get("calibration") else None, resamples=resamples,
                                band=card_band(record))
        metrics.update(members=members, threshold_source="val-calibrated")
        report["models"][ENSEMBLE] = metrics
        if out_dir is not None:
            _save_plots(Path(out_dir), ENSEMBLE, targets, probabilities, metrics,
                        raw=mean if record.get("calibration") else None)
    return report
