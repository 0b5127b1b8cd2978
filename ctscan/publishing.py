"""How a trained model becomes a version in the store and, maybe, production: the one path.

`publish_version` saves the weights and card and attaches the ONNX copy, converted and
checked against TensorFlow on real images here, once (servers only load it).
`promote_if_better` is the promotion policy, used by `ctscan train` (`train_and_store`) and
by the trainer service's jobs alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ctscan.errors import CTScanError, StoreError
from ctscan.records import ModelCard
from ctscan.settings import PROMOTION_METRICS
from ctscan.store import ModelStore, pack_weights

if TYPE_CHECKING:
    import keras

    from ctscan.training import EpochReport, TrainConfig

logger = logging.getLogger(__name__)

PromotePolicy = Literal["auto", "always", "never"]
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
    from ctscan.onnx_runtime import OnnxConversionError, export_onnx
    from ctscan.store import unpack_weights

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


def should_promote(store: ModelStore, name: str, card: ModelCard, metric: str = "auc") -> bool:
    """Promote when there is no production model or the new one beats it on val `metric`."""
    current = store.production(name)
    if current is None:
        return True
    try:
        current_value = store.card(name, current).val_metric(metric)
    except CTScanError:
        return True
    new_value = card.val_metric(metric)
    if current_value is None:
        return True
    return new_value is not None and new_value > current_value


def promote_if_better(store: ModelStore, name: str, version: str, card: ModelCard, *,
                      policy: str = "auto", metric: str = "auc", source: str = "trained") -> bool:
    """Apply the promotion policy to a saved version; True when it is production afterwards.

    "auto" promotes when `should_promote` says so, "always" does, "never" does not. A version
    that is production already (a redelivered job) stays so."""
    if policy not in PROMOTE_POLICIES:
        raise CTScanError(f"promote must be auto, always or never, got {policy!r}")
    if metric not in PROMOTION_METRICS:
        raise CTScanError(f"the promotion metric must be one of {', '.join(PROMOTION_METRICS)}, got {metric!r}")
    if store.production(name) == version:
        return True
    if policy == "never" or (policy == "auto" and not should_promote(store, name, card, metric)):
        return False
    reason = f"{source}: promoted on saving" if policy == "always" else \
        f"{source}: val {metric} better than production"
    store.promote(name, version, reason=reason)
    return True


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
    from ctscan.training import Trainer, build_card

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
    promoted = promote_if_better(store, config.model, version, saved, policy=promote, metric=metric,
                                 source="trained with ctscan train")
    return version, saved, promoted


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

    from ctscan.data import CTDataset
    from ctscan.errors import DataError
    from ctscan.imaging import resize_for_model
    from ctscan.onnx_runtime import OnnxConversionError, export_onnx, load_verification_images
    from ctscan.store import load_keras_model

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
