"""The models being served, their loading, warm-up and hot reload.

Each served model is an immutable `ServedModel` (one version: Keras model for Grad-CAM, a
verified fast predictor, its own batcher). Swapping a version replaces the entry in one
assignment; requests hold the entry they started with, and a retired version's batcher
closes only after its last request finished. A version that fails its checksum, weight
restore, ONNX/TF smoke prediction or warm-up never replaces a working one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctscan.data import CTDataset
from ctscan.errors import CTScanError, DataError, ImageError
from ctscan.evaluation import ENSEMBLE, ensemble_record_for
from ctscan.gradcam import HeatmapFunction, make_gradcam
from ctscan.imaging import decode_image, resize_for_model
from ctscan.onnx_runtime import FastPredictor, build_fast_predictor
from ctscan.store import ModelStore, load_keras_model
from services.inference.batching import DynamicBatcher
from services.inference.metrics import InferenceMetrics
from services.inference.settings import InferenceSettings

logger = logging.getLogger(__name__)


class ModelNotServedError(CTScanError):
    """The model name is not one this service serves (HTTP 400)."""


class ModelNotReadyError(CTScanError):
    """The model is served but not loaded yet, or failed to load (HTTP 503)."""


@dataclass
class ServedModel:
    name: str
    version: str
    card: dict[str, Any]
    input_size: int
    threshold: float
    keras_model: Any
    predictor: FastPredictor
    batcher: DynamicBatcher
    gradcam: HeatmapFunction
    loaded_at: float
    _in_flight: int = 0
    _retired: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def enter(self) -> None:
        with self._lock:
            self._in_flight += 1

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1
            close = self._retired and self._in_flight == 0
        if close:
            self.batcher.close()

    def retire(self) -> None:
        """Stop taking new work; the batcher closes once requests in flight are done."""
        with self._lock:
            self._retired = True
            close = self._in_flight == 0
        if close:
            self.batcher.close()


@dataclass(frozen=True)
class EnsembleInfo:
    members: dict[str, str]  # name -> version
    threshold: float
    threshold_source: str


def _phantom(size: int = 256) -> np.ndarray:
    """A CT-like synthetic slice (body ellipse, two dark lungs) when no real image is at hand."""
    y, x = np.mgrid[0:size, 0:size] / size
    body = ((x - 0.5) / 0.45) ** 2 + ((y - 0.5) / 0.35) ** 2 < 1
    lungs = (((x - 0.32) / 0.13) ** 2 + ((y - 0.5) / 0.22) ** 2 < 1) | (
        ((x - 0.68) / 0.13) ** 2 + ((y - 0.5) / 0.22) ** 2 < 1)
    grey = np.where(body, 170, 0) - np.where(lungs, 140, 0)
    return np.repeat(grey.astype(np.uint8)[:, :, None], 3, axis=2)


def load_verification_images(folder: Path, count: int) -> list[np.ndarray]:
    """Up to `count` real CT slices (both classes, val split) for ONNX checks and smoke tests."""
    paths: list[Path] = []
    try:
        dataset = CTDataset(folder)
        by_label: dict[str, list[Path]] = {}
        for sample in dataset.split("val"):
            by_label.setdefault(sample.label, []).append(sample.path)
        for index in range(count):
            for label in sorted(by_label):
                if index < len(by_label[label]) and len(paths) < count:
                    paths.append(by_label[label][index])
    except DataError:
        if folder.is_dir():
            paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:count]
    images = []
    for path in paths:
        try:
            images.append(decode_image(path.read_bytes()).grey)
        except (ImageError, OSError) as exc:
            logger.warning("verification image %s skipped: %s", path.name, exc)
    if not images:
        logger.warning("no real CT images found in %s; ONNX is verified on a synthetic slice", folder)
        images = [_phantom()]
    return images


class ModelRegistry:
    def __init__(self, *, settings: InferenceSettings, store: ModelStore, metrics: InferenceMetrics) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.configured: tuple[str, ...] = tuple(settings.models)
        # Uploads are decoded here, not in the event loop's large shared pool: one thread per
        # core is as fast, and fewer threads keep fewer malloc arenas (resident memory).
        self.decode_pool = ThreadPoolExecutor(max_workers=settings.decode_threads or os.cpu_count() or 1,
                                              thread_name_prefix="decode")
        self._models: dict[str, ServedModel] = {}
        self._ensemble: EnsembleInfo | None = None
        self.errors: dict[str, str] = {}  # last load/reload failure by model
        self._refused: dict[str, str] = {}  # model -> version that failed; not retried
        self._swap_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._verification: list[np.ndarray] | None = None
        self.loading_done = threading.Event()

    # --- what requests see ----------------------------------------------------------------
    @property
    def models(self) -> dict[str, ServedModel]:
        return self._models

    @property
    def ensemble(self) -> EnsembleInfo | None:
        return self._ensemble

    def servable_names(self) -> tuple[str, ...]:
        return (*self.configured, ENSEMBLE) if len(self.configured) >= 2 else self.configured

    def missing(self) -> list[str]:
        return [name for name in self.configured if name not in self._models]

    def is_ready(self) -> bool:
        return self.loading_done.is_set() and not self.missing()

    def check_model(self, model: str) -> None:
        if model not in self.servable_names():
            raise ModelNotServedError(
                f"unknown model {model!r}; choose one of {', '.join(self.servable_names())}")

    @contextlib.contextmanager
    def acquire(self, model: str) -> Iterator[tuple[list[ServedModel], EnsembleInfo | None]]:
        """The served entries a request for `model` uses, held until the request ends."""
        self.check_model(model)
        snapshot, ensemble = self._models, self._ensemble  # one consistent view
        names = list(self.configured) if model == ENSEMBLE else [model]
        missing = [name for name in names if name not in snapshot]
        if missing:
            raise ModelNotReadyError(f"model {', '.join(missing)} is not loaded yet")
        if model == ENSEMBLE and (ensemble is None or set(ensemble.members) != set(names)):
            raise ModelNotReadyError("the ensemble is not ready yet")
        entries = [snapshot[name] for name in names]
        for entry in entries:
            entry.enter()
        try:
            yield entries, ensemble if model == ENSEMBLE else None
        finally:
            for entry in entries:
                entry.leave()

    # --- loading --------------------------------------------------------------------------
    def verification_images(self) -> list[np.ndarray]:
        if self._verification is None:
            self._verification = load_verification_images(
                self.settings.verification_path(), self.settings.verification_images)
        return self._verification

    def load_version(self, name: str, version: str) -> ServedModel:
        """Load, verify (checksums, ONNX vs TF, smoke prediction) and warm up one version."""
        model, card = load_keras_model(self.store, name, version)
        size = int(card["input_size"])
        images = np.stack([resize_for_model(p, size) for p in self.verification_images()])
        settings = self.settings
        predictor = build_fast_predictor(
            model, images, use_onnx=settings.use_onnx, tolerance=settings.onnx_tolerance,
            weights_sha256=card.get("weights_sha256"), cache_dir=settings.onnx_cache_dir,
            threads=settings.onnx_threads or None, spinning=settings.onnx_spinning)
        probabilities = predictor.predict(images)
        if probabilities.shape != (len(images),) or not np.all(
                np.isfinite(probabilities) & (probabilities >= 0) & (probabilities <= 1)):
            raise CTScanError(f"{name} {version}: smoke prediction gave {probabilities!r}")
        # Run every batch size the batcher can form (up to 32, and the largest) once now: the
        # runtime's memory arenas grow to their working size before /readyz turns green, not
        # under the first real load, and no request pays for a first-time shape.
        largest = settings.max_batch_size
        for batch_size in sorted({*range(1, min(largest, 32) + 1), largest}):
            predictor.predict(np.repeat(images[:1], batch_size, axis=0))
        gradcam = make_gradcam(model)
        if settings.warmup_gradcam:
            gradcam(images[0])
        batch_metric = self.metrics.batch_size.labels(model=name)
        batcher = DynamicBatcher(predictor.predict, name=f"{name}-{version}",
                                 max_batch_size=settings.max_batch_size,
                                 max_wait_s=settings.max_wait_ms / 1000.0,
                                 on_batch=batch_metric.observe)
        return ServedModel(name=name, version=version, card=card, input_size=size,
                           threshold=float(card["threshold"]), keras_model=model,
                           predictor=predictor, batcher=batcher, gradcam=gradcam,
                           loaded_at=time.time())

    def _install(self, served: ServedModel) -> None:
        with self._swap_lock:
            previous = self._models.get(served.name)
            models = {**self._models, served.name: served}
            self._models = models
            self._ensemble = self._compute_ensemble(models)
            self._set_error(served.name, None)
        if previous is not None:
            self.metrics.model_version.remove(previous.name, previous.version, previous.predictor.backend)
            previous.retire()
        self.metrics.model_version.labels(model=served.name, version=served.version,
                                          backend=served.predictor.backend).set(1)
        logger.info("serving %s version %s on %s", served.name, served.version, served.predictor.backend)

    def _compute_ensemble(self, models: dict[str, ServedModel]) -> EnsembleInfo | None:
        if len(self.configured) < 2 or any(name not in models for name in self.configured):
            return None
        members = {name: models[name].version for name in self.configured}
        try:
            # The val-calibrated threshold when it was fitted for exactly these versions; the
            # core raises (a CTScanError) otherwise, and the members' mean stands in below.
            threshold, source = float(ensemble_record_for(self.store, members)["threshold"]), "val-calibrated"
        except (CTScanError, OSError, ValueError, KeyError) as exc:
            logger.warning("ensemble threshold unavailable (%s); using the members' mean", exc)
            threshold = float(np.mean([models[n].threshold for n in self.configured]))
            source = "mean-of-members"
        return EnsembleInfo(members=members, threshold=threshold, threshold_source=source)

    def try_load(self, name: str, *, reason: str) -> bool:
        """Load the store's production version of `name` if it differs from the served one."""
        try:
            version = self.store.production(name)
        except Exception as exc:
            self._set_error(name, f"cannot read production pointer: {type(exc).__name__}: {exc}")
            return False
        current = self._models.get(name)
        if version is None:
            if current is None:
                self._set_error(name, f"no production version of {name} in {self.store.url}")
            return False
        if (current is not None and current.version == version) or self._refused.get(name) == version:
            return False
        started = time.monotonic()
        try:
            served = self.load_version(name, version)
        except Exception as exc:
            message = f"version {version} refused: {type(exc).__name__}: {exc}"
            logger.error("%s %s (%s)", name, message, reason)
            self._set_error(name, message)
            self._refused[name] = version
            self.metrics.reloads.labels(model=name, outcome="refused").inc()
            return False
        self._install(served)
        self.metrics.reloads.labels(model=name, outcome="loaded").inc()
        logger.info("%s %s loaded in %.1fs (%s)", name, version, time.monotonic() - started, reason)
        return True

    def load_all(self) -> None:
        try:
            for name in self.configured:
                if self._stop.is_set():
                    return
                self.try_load(name, reason="startup")
        finally:
            self.loading_done.set()

    def _set_error(self, name: str, message: str | None) -> None:
        # Copy on write: routes read `errors` from other threads without a lock.
        errors = {key: value for key, value in self.errors.items() if key != name}
        if message is not None:
            errors[name] = message
        self.errors = errors

    def refused_versions(self) -> dict[str, str]:
        return dict(self._refused)

    # --- background work ------------------------------------------------------------------
    def start(self) -> None:
        """Load in the background (readiness reports progress), then poll for new versions."""
        loader = threading.Thread(target=self._background, name="model-loader", daemon=True)
        loader.start()
        self._threads.append(loader)

    def _background(self) -> None:
        self.load_all()
        interval = self.settings.reload_poll_seconds
        if interval <= 0:
            return
        while not self._stop.wait(interval):
            for name in self.configured:
                if self._stop.is_set():
                    return
                self.try_load(name, reason="production pointer moved")
            self._refresh_ensemble()

    def _refresh_ensemble(self) -> None:
        """Pick up a recalibrated ensemble threshold even when no member version moved."""
        with self._swap_lock:
            ensemble = self._compute_ensemble(self._models)
            if ensemble != self._ensemble:
                self._ensemble = ensemble

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)  # a conversion in progress is abandoned
        for served in self._models.values():
            served.retire()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
