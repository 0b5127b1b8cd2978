"""Evaluate the store's production models (and their ensemble) on one split of a dataset.

The ensemble is the mean of the three probabilities; its threshold is chosen on `val`
(`calibrate_ensemble`) and stored beside the models, never chosen on the split reported.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ctscan import DISCLAIMER
from ctscan.data import CTDataset, Sample, load_arrays
from ctscan.errors import CTScanError, StoreError
from ctscan.metrics import choose_threshold, full_report
from ctscan.models import ENSEMBLE, architecture_names, get_spec
from ctscan.records import EnsembleRecord, ModelCard
from ctscan.store import ModelStore, load_keras_model
from ctscan.training import _subset, predict_probabilities


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


def predict_split(
    store: ModelStore, names: list[str], samples: list[Sample]
) -> tuple[dict[str, np.ndarray], dict[str, ModelCard], np.ndarray]:
    """Probabilities of each production model on `samples`, their cards, and the targets."""
    probabilities: dict[str, np.ndarray] = {}
    cards: dict[str, ModelCard] = {}
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    targets = np.array([s.target for s in samples], dtype=np.float32)
    for name in names:
        model, card = load_keras_model(store, name)
        size = card.input_size
        if size not in cache:
            cache[size] = load_arrays(samples, size)
        probabilities[name] = predict_probabilities(model, cache[size][0])
        cards[name] = card
    return probabilities, cards, targets


def calibrate_ensemble(
    *, store: ModelStore, data_dir: str, limit_per_class: int | None = None, rule: str = "youden"
) -> EnsembleRecord:
    """Choose the ensemble's threshold on the val split and store it with its members."""
    names = _resolve_models(store, "all")
    if len(names) < 2:
        raise CTScanError("an ensemble needs at least two production models")
    dataset = CTDataset(data_dir)
    samples = _subset(dataset.split("val"), limit_per_class, 42)
    probabilities, cards, targets = predict_split(store, names, samples)
    mean = np.mean([probabilities[n] for n in names], axis=0)
    threshold = choose_threshold(targets, mean, rule)
    record = EnsembleRecord(
        members={n: str(cards[n].version) for n in names},
        threshold=threshold,
        threshold_rule=rule,
        dataset_fingerprint=dataset.fingerprint(),
        metrics={"val": full_report(targets, mean, threshold)},
        created_at=datetime.now(UTC).isoformat(),
    )
    store.save_ensemble_record(record)
    return record


def ensemble_threshold(store: ModelStore, members: dict[str, str]) -> tuple[float, str]:
    """The stored val threshold when it was calibrated for exactly these member versions,
    else the mean of the members' own thresholds (and say which)."""
    record = store.ensemble_record()
    if record is not None and record.members == members:
        return record.threshold, "val-calibrated"
    thresholds = [store.card(n, v).threshold for n, v in members.items()]
    return float(np.mean(thresholds)), "mean-of-members"


def _save_plots(out_dir: Path, name: str, targets: np.ndarray, probabilities: np.ndarray,
                report: dict[str, Any]) -> None:
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


def evaluate_store(
    *,
    store: ModelStore,
    data_dir: str,
    models: str = "all",
    split: str = "test",
    out_dir: Path | None = None,
    resamples: int = 1000,
) -> dict[str, Any]:
    names = _resolve_models(store, models)
    dataset = CTDataset(data_dir)
    dataset.verify_checksums()
    samples = dataset.split(split)
    probabilities, cards, targets = predict_split(store, names, samples)
    report: dict[str, Any] = {
        "split": split,
        "dataset": {"path": str(dataset.root), "fingerprint": dataset.fingerprint(), "images": len(samples)},
        "positive_class": "covid",
        "intended_use": DISCLAIMER,
        "models": {},
    }
    for name in names:
        card = cards[name]
        metrics = full_report(targets, probabilities[name], card.threshold, resamples=resamples)
        metrics.update(version=card.version, init=card.init, input_size=card.input_size)
        report["models"][name] = metrics
        if out_dir is not None:
            _save_plots(Path(out_dir), name, targets, probabilities[name], metrics)
    if len(names) >= 2 and models == "all":
        members = {n: str(cards[n].version) for n in names}
        threshold, source = ensemble_threshold(store, members)
        mean = np.mean([probabilities[n] for n in names], axis=0)
        metrics = full_report(targets, mean, threshold, resamples=resamples)
        metrics.update(members=members, threshold_source=source)
        report["models"][ENSEMBLE] = metrics
        if out_dir is not None:
            _save_plots(Path(out_dir), ENSEMBLE, targets, mean, metrics)
    return report
