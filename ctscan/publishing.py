"""How a trained model becomes a version in the store and, maybe, production: the one path.

`publish_version` saves the weights and card and attaches the ONNX copy, converted and
checked against TensorFlow on real images here, once (servers only load it).
`decide_promotion` is the promotion gate and `promote_with_reason` the policy, used by
`ctscan train` (`train_and_store`) and by the trainer service's jobs alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ctscan.errors import CTScanError, StoreError
from ctscan.models import pack_weights
from ctscan.settings import PROMOTION_METRICS, PromotionSettings
from ctscan.storage.records import ModelCard
from ctscan.storage.store import ModelStore

if TYPE_CHECKING:
    import keras

    from ctscan.data.dataset import Sample
    from ctscan.training.runs import EpochReport, TrainConfig

logger = logging.getLogger(__name__)

PROMOTE_POLICIES = ("auto", "always", "never")
VERIFICATION_IMAGES = 8


def pick_verification_images(images: np.ndarray, targets: np.ndarray, count: int = VERIFICATION_IMAGES) -> np.ndarray:
    """Up to `count` images, taking the classes in turn (both kinds of slice are checked)."""
    by_class = [np.flatnonzero(targets == value) for value in np.unique(targets)]
    order = [int(index) for group in zip(*(list(g) for g in by_class), strict=False) for index in group]
    order += [i for i in range(len(images)) if i not in set(order)]
    return images[order[:count]]


def publish_version(
    store: ModelStore,
    *,
    name: str,
    model: keras.Model,
    weights: bytes,
    card: ModelCard | Mapping[str, Any],
    verification_images: np.ndarray,
    verified_on: str,
    version: str | None = None,
) -> tuple[str, ModelCard]:
    """Save a new version (`weights`, packed from `model`) with its ONNX copy.

    The ONNX copy is only a speed-up: when conversion or the check against TensorFlow fails,
    or storing it fails, the version is saved without one (servers then use TensorFlow and
    say why) and a warning is logged."""
    from ctscan.models import unpack_weights
    from ctscan.serving.onnx_runtime import OnnxConversionError, export_onnx

    unpack_weights(model, weights)  # the copy is made from exactly the weights stored
    export = None
    try:
        export = export_onnx(model, verification_images, verified_on=verified_on)
    except OnnxConversionError as exc:
        logger.warning("%s: no ONNX copy for the new version: %s", name, exc)
    version = store.save(name, weights=weights, card=card, version=version)
    saved = store.card(name, version)
    if export is not None:
        try:
            manifest = export.manifest(weights_sha256=saved.weights_sha256 or "")
            store.attach_onnx(name, version, export.onnx_bytes, manifest)
        except StoreError as exc:
            logger.warning("%s %s saved without its ONNX copy: %s", name, version, exc)
    return version, saved


def balanced_accuracy(metrics: Mapping[str, Any]) -> float | None:
    """Mean of sensitivity and specificity, from the confusion matrix of a card's report."""
    if metrics.get("balanced_accuracy") is not None:
        return float(metrics["balanced_accuracy"])
    matrix = metrics.get("confusion_matrix")
    try:
        (tn, fp), (fn, tp) = matrix  # type: ignore[misc]
        return (tn / (tn + fp) + tp / (tp + fn)) / 2
    except (TypeError, ValueError, ZeroDivisionError):
        return None


def validation_set(card: ModelCard) -> dict[str, Any] | None:
    """What a card's val metrics were measured on: the dataset version (its fingerprint names
    the exact split.csv and checksums), the split and the images taken from it. None when
    the card does not say."""
    data = card.dataset or {}
    if not data.get("fingerprint"):
        return None
    hyperparameters = card.hyperparameters or {}
    limit = hyperparameters.get("limit_per_class")
    return {"dataset_fingerprint": data["fingerprint"],
            "split": (card.split or {}).get("model_selection_and_threshold", "val"),
            "images": data.get("val_images"), "limit_per_class": limit,
            "seed": hyperparameters.get("seed") if limit else None}


@dataclass(frozen=True)
class PromotionDecision:
    """The gate's answer for one candidate, with the numbers it compared and why."""

    promote: bool
    reason: str
    metric: str
    candidate: float | None = None
    production_version: str | None = None
    production: float | None = None
    floors: dict[str, Any] = field(default_factory=dict)

    def as_record(self) -> dict[str, Any]:
        """For the job record (`JobRecord.promotion`): the console shows it."""
        return {"metric": self.metric, "split": "val", "candidate": self.candidate,
                "production_version": self.production_version, "production": self.production,
                "promoted": self.promote, "reason": self.reason, "floors": self.floors}


def floor_measurements(card: ModelCard, floors: PromotionSettings) -> dict[str, Any]:
    """The numbers the promotion floors are checked on: with several val sources, each
    metric's worst source (every floor must hold on each of them)."""
    per_source = {name: b for name, m in (card.metrics.get("val_sources") or {}).items()
                  if (b := balanced_accuracy(m)) is not None}
    worst = min(per_source, key=lambda name: per_source[name]) if per_source else None
    balanced = per_source[worst] if worst is not None else balanced_accuracy(card.metrics.get("val") or {})
    return {"min_auc": floors.min_auc, "auc": card.val_metric("auc"), "auc_source": card.worst_val_source("auc"),
            "min_balanced_accuracy": floors.min_balanced_accuracy, "balanced_accuracy": balanced,
            "balanced_accuracy_source": worst}


def below_floors(card: ModelCard, floors: PromotionSettings | None = None) -> str | None:
    """Why a card fails the promotion floors (the metric, its worst val source and value, the
    floor), or None when it clears them on every val source. The gate and the ensemble's
    choice of members both ask this. A floor of 0 is off."""
    from ctscan.settings import get_promotion_settings

    measured = floor_measurements(card, floors or get_promotion_settings())
    for label, value, floor, worst in (("AUC", measured["auc"], measured["min_auc"], measured["auc_source"]),
                                       ("balanced accuracy", measured["balanced_accuracy"],
                                        measured["min_balanced_accuracy"], measured["balanced_accuracy_source"])):
        if floor > 0 and (value is None or value != value or value < floor):  # NaN: one class only
            shown = "unknown" if value is None or value != value else f"{value:.3f}"
            where = f" (worst val source: {worst})" if worst else ""
            return f"val {label} {shown}{where} is below the promotion floor {floor:.3f}"
    return None


def decide_promotion(store: ModelStore, name: str, version: str, card: ModelCard, *, metric: str = "auc",
                     floors: PromotionSettings | None = None,
                     production_measured: ModelCard | None = None) -> PromotionDecision:
    """The promotion gate. A candidate is promoted only when it clears the AUC and
    balanced-accuracy floors on val (`below_floors`, whatever `metric` is: a model that says
    COVID for every image has a recall of 1 and a balanced accuracy of 0.5), and either there
    is no production version, or the candidate beats production on val `metric` on the same
    images: production's card when it was validated on the same dataset version, split and
    images, else `production_measured` (production's card with its val numbers measured on the
    candidate's val split, `production_on_val_of`), else it is not comparable."""
    from ctscan.settings import get_promotion_settings

    floors = floors or get_promotion_settings()
    measured = floor_measurements(card, floors)
    candidate = card.val_metric(metric)
    current = store.production(name)
    compared: dict[str, Any] = {"production_version": None, "production": None}

    def decided(promote: bool, reason: str) -> PromotionDecision:
        return PromotionDecision(promote, reason, metric, candidate, compared["production_version"],
                                 compared["production"], measured)

    if current == version:
        return decided(True, f"{version} is production already")
    failure = below_floors(card, floors)
    if failure is not None:
        return decided(False, failure)
    if candidate is None:
        return decided(False, f"the candidate has no val {metric}")
    if current is None:
        return decided(True, "no production version to compare with; the floors are met")
    compared["production_version"] = current
    try:
        production_card = store.card(name, current)
    except CTScanError as exc:
        return decided(True, f"production {current} cannot be read ({exc}); the floors are met")
    production_value = production_card.val_metric(metric)
    compared["production"] = production_value
    ours, theirs = validation_set(card), validation_set(production_card)
    if (ours is None or ours != theirs) and production_measured is not None:
        production_value = production_measured.val_metric(metric)
        compared["production"] = production_value
        shown = "undefined" if production_value is None else f"{production_value:.4f}"
        beats = production_value is None or candidate > production_value
        return decided(beats, f"val {metric} {candidate:.4f} {'beats' if beats else 'does not beat'} production "
                       f"{current} measured on the candidate's val split ({shown})")
    if ours is None or ours != theirs:
        return decided(False, _different_sets(ours, theirs, current))
    if production_value is None:
        return decided(True, f"production {current} has no val {metric}; the floors are met")
    if candidate > production_value:
        return decided(True, f"val {metric} {candidate:.4f} beats production {current} "
                       f"({production_value:.4f}) on the same validation set")
    return decided(False, f"val {metric} {candidate:.4f} does not beat production {current} "
                   f"({production_value:.4f}) on the same validation set")


def _different_sets(ours: dict[str, Any] | None, theirs: dict[str, Any] | None, current: str) -> str:
    def describe(validation: dict[str, Any] | None) -> str:
        if validation is None:
            return "an unrecorded validation set"
        return (f"{validation['images']} {validation['split']} images of dataset "
                f"{str(validation['dataset_fingerprint'])[:12]}")

    return (f"not comparable: the candidate was validated on {describe(ours)}, production {current} on "
            f"{describe(theirs)}; promote it by hand (ctscan models promote) if that is intended")


def production_on_val_of(store: ModelStore, name: str, candidate: ModelCard,
                         samples: Sequence[Sample] | None = None) -> ModelCard | None:
    """Production's card with its val numbers measured on `samples` (a candidate's val split;
    default: the val splits of the sources its card names, where they are on disk), each
    source apart, with production's own preprocessing, calibration and threshold, so the gate
    compares the two on the same images. None when there is no production version, it was
    validated on the candidate's own val set already, or either cannot be read."""
    from ctscan.calibration import Calibration
    from ctscan.data.dataset import load_split
    from ctscan.imaging.preprocessing import card_preprocessing
    from ctscan.metrics import full_report
    from ctscan.models import load_keras_model, predict_probabilities

    current = store.production(name)
    if current is None:
        return None
    try:
        production = store.card(name, current)
        if validation_set(production) == validation_set(candidate):
            return None
        samples = _val_samples_of(candidate) if samples is None else samples
        if not samples:
            return None
        model, production = load_keras_model(store, name, current)
    except CTScanError as exc:
        logger.warning("%s %s cannot be measured on the candidate's val split: %s", name, current, exc)
        return None
    split = load_split(samples, int(production.input_size), preprocessing=card_preprocessing(production))
    probabilities = Calibration.from_dict(production.calibration).apply(predict_probabilities(model, split.images))
    threshold = float(production.threshold)
    sources = sorted(set(split.sources.tolist()))
    metrics: dict[str, Any] = {"val": full_report(split.targets, probabilities, threshold, resamples=200)}
    if len(sources) > 1:
        metrics["val_sources"] = {source: full_report(split.targets[split.sources == source],
                                                      probabilities[split.sources == source], threshold, resamples=200)
                                  for source in sources}
    return production.model_copy(update={"metrics": metrics})


def _val_samples_of(card: ModelCard) -> list[Sample] | None:
    """The val slices a card was selected on, read again from its sources' folders (None for a
    subset run, or when a folder is gone or changed since)."""
    from ctscan.data.dataset import CTDataset

    recorded = card.dataset or {}
    if (card.hyperparameters or {}).get("limit_per_class"):
        return None
    sources = recorded.get("sources") or [{"name": None, "path": recorded.get("path"),
                                           "fingerprint": recorded.get("fingerprint")}]
    samples: list[Sample] = []
    for source in sources:
        if not source.get("path") or not Path(source["path"]).is_dir():
            return None
        dataset = CTDataset(source["path"], name=source.get("name"))
        if dataset.fingerprint() != source.get("fingerprint"):
            return None
        samples += dataset.split("val")
    return samples


def promote_with_reason(store: ModelStore, name: str, version: str, card: ModelCard, *,
                        policy: str = "auto", metric: str = "auc", source: str = "trained",
                        floors: PromotionSettings | None = None,
                        val_samples: Sequence[Sample] | None = None) -> PromotionDecision:
    """Apply the promotion policy to a saved version and return the decision with its reason.

    "auto" asks the gate (`decide_promotion`), "always" promotes, "never" does not. A version
    that is production already (a redelivered job) stays so. The reason goes into the
    production pointer when the version is promoted. Under "auto", a candidate that clears the
    floors is compared with production measured on its own val split (`val_samples`, default
    read from its card's sources: `production_on_val_of`) where production was validated on
    another one."""
    if policy not in PROMOTE_POLICIES:
        raise CTScanError(f"promote must be auto, always or never, got {policy!r}")
    if metric not in PROMOTION_METRICS:
        raise CTScanError(f"the promotion metric must be one of {', '.join(PROMOTION_METRICS)}, got {metric!r}")
    measured = production_on_val_of(store, name, card, val_samples) \
        if policy == "auto" and store.production(name) != version and below_floors(card, floors) is None else None
    decision = decide_promotion(store, name, version, card, metric=metric, floors=floors,
                                production_measured=measured)
    if store.production(name) == version:
        return decision
    if policy == "never":
        return replace(decision, promote=False, reason="not promoted: the policy is never")
    if policy == "always":
        decision = replace(decision, promote=True, reason="promoted on saving (policy always)")
    if decision.promote:
        store.promote(name, version, reason=f"{source}: {decision.reason}")
    return decision


def train_and_store(
    config: TrainConfig,
    *,
    run_dir: str | Path,
    store: ModelStore,
    resume: bool = False,
    promote: str = "auto",
    metric: str = "auc",
    on_epoch: Callable[[EpochReport], None] | None = None,
    verbose: int = 1,
    version: str | None = None,
) -> tuple[str, ModelCard, bool]:
    """Train, save a new version to the store, maybe promote it. Returns (version, card, promoted).

    Nothing is written to the store until training and evaluation have succeeded.
    """
    from ctscan.training.runs import Trainer, build_card

    if promote not in PROMOTE_POLICIES:
        raise CTScanError(f"promote must be auto, always or never, got {promote!r}")
    trainer = Trainer(config, run_dir, on_epoch=on_epoch, verbose=verbose)
    model, state, _ = trainer.run(resume=resume)
    weights = pack_weights(model)
    card = build_card(config=config, trainer=trainer, state=state, model=model, store_weights=weights)
    val_x, val_y = trainer.val_data
    version, saved = publish_version(
        store, name=config.model, model=model, weights=weights, card=card,
        verification_images=pick_verification_images(val_x, val_y),
        verified_on=f"val split of dataset {str(trainer.data_summary['fingerprint'])[:12]}", version=version)
    decision = promote_with_reason(store, config.model, version, saved, policy=promote, metric=metric,
                                   source="trained with ctscan train", val_samples=trainer.val_samples)
    logger.warning("%s %s %s: %s", config.model, version, "promoted" if decision.promote else "not promoted",
                   decision.reason)
    return version, saved, decision.promote


def export_missing_onnx(store: ModelStore, *, data_dir: Path, models: list[str] | None = None,
                        version: str | None = None) -> dict[str, Any]:
    """Make, check and attach the ONNX copy of every version (of `models`, or only `version`)
    that has none: for versions saved before copies existed, such as the shipped release.
    Copies are checked against TensorFlow on real CT images from `data_dir`."""
    names = list(models or store.list_models())
    if version is not None and len(names) != 1:
        raise CTScanError("--version needs exactly one --model")
    todo: list[tuple[str, str]] = []
    result: dict[str, Any] = {"store": store.url, "exported": [], "kept": [], "failed": {}}
    for name in names:
        versions = store.list_versions(name)
        if version is not None and version not in versions:
            raise StoreError(f"model {name} has no version {version} in {store.url}")
        for candidate in [version] if version is not None else versions:
            if store.has_onnx(name, candidate):
                result["kept"].append(f"{name}/{candidate}")
            else:
                todo.append((name, candidate))
    if not todo:
        return result  # nothing to convert: TensorFlow is not even imported

    from ctscan.data.dataset import CTDataset
    from ctscan.errors import DataError
    from ctscan.imaging.decoding import resize_for_model
    from ctscan.models import load_keras_model
    from ctscan.serving.onnx_runtime import OnnxConversionError, export_onnx, load_verification_images

    grey = load_verification_images(Path(data_dir), VERIFICATION_IMAGES)
    if not grey:
        raise CTScanError(f"no real CT images in {data_dir} to check the ONNX copies against TensorFlow; "
                          "pass --data DIR (or set CTSCAN_DATA_DIR)")
    try:
        verified_on = f"val split of dataset {CTDataset(data_dir).fingerprint()[:12]}"
    except DataError:
        verified_on = f"images in {Path(data_dir).name}"
    for name, candidate in todo:
        model, card = load_keras_model(store, name, candidate)
        images = np.stack([resize_for_model(image, card.input_size) for image in grey])
        try:
            export = export_onnx(model, images, verified_on=verified_on)
        except OnnxConversionError as exc:
            result["failed"][f"{name}/{candidate}"] = str(exc)
            continue
        store.attach_onnx(name, candidate, export.onnx_bytes, export.manifest(weights_sha256=card.weights_sha256 or ""))
        result["exported"].append({"version": f"{name}/{candidate}", "bytes": len(export.onnx_bytes),
                                   "max_abs_difference": export.max_abs_difference})
    return result
