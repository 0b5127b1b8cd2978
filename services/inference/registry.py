"""The models being served, their loading, warm-up and hot reload.

Each served model is an immutable `ServedModel` (one version: a fast predictor, its own
batcher, and the Keras model for Grad-CAM). The fast predictor is the version's stored ONNX
copy, made and checked against TensorFlow when the version was saved; here it is only loaded
and smoke-tested (TensorFlow serves, with the reason shown in /models, when there is no
usable copy). With a copy, start-up needs no TensorFlow: the Keras model is built right
after readiness (or by the first explanation asked for before that).

Swapping a version replaces the entry in one assignment; requests hold the entry they
started with, and a retired version's batcher closes only after its last request finished.
A version that fails its checksum, weight restore, smoke prediction or warm-up never
replaces a working one.

The ensemble is exactly its record's member versions (pinned; `ctscan.serving.predictor.
ensemble_record_for`): when a member's production version moves on, single-model requests
get the new version and the ensemble keeps the one it was calibrated for, loaded apart if
need be. An entry is retired only when neither production nor the ensemble uses it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctscan.calibration import IDENTITY, Calibration
from ctscan.decision import DEFAULT_BAND
from ctscan.errors import CTScanError
from ctscan.gate import FeatureGate
from ctscan.gradcam import HeatmapFunction, make_gradcam
from ctscan.imaging.decoding import resize_for_model
from ctscan.imaging.preprocessing import LEGACY, card_preprocessing
from ctscan.models import ENSEMBLE, keras_model_from
from ctscan.serving.onnx_runtime import (
    NO_COPY_REASON,
    FastPredictor,
    load_verification_images,
    stored_onnx_predictor,
    tensorflow_fallback,
)
from ctscan.serving.predictor import EnsembleNotCalibratedError, card_band, ensemble_order, ensemble_record_for
from ctscan.settings import InferenceSettings
from ctscan.storage.records import ModelCard
from ctscan.storage.store import ModelStore
from services.inference.batching import DynamicBatcher
from services.inference.decoding import DecodePool
from services.inference.metrics import InferenceMetrics

logger = logging.getLogger(__name__)


class ModelNotServedError(CTScanError):
    """The model name is not one this service serves (HTTP 400)."""


class ModelNotReadyError(CTScanError):
    """The model is served but not loaded yet, or failed to load (HTTP 503)."""


class EnsembleUnavailableError(ModelNotReadyError):
    """The ensemble is not served: it has no record, the record cannot be read, or a member
    version it pins is gone from the store or fails its checks. Retrying does not help until
    it is recalibrated (or the version restored); the single models answer meanwhile (HTTP
    503, `ensemble_unavailable`)."""


# Keras models are built, and Grad-CAM traced, one at a time: side by side on two cores they
# took minutes instead of seconds (retracing, and the GIL shared with the requests).
_BUILDING = threading.Lock()


class Explainer:
    """A version's Keras model and its Grad-CAM, built (and traced on `warm_pixels`) once, on
    first use: by the loader right after readiness, or by an explanation asked for first."""

    def __init__(self, build: Callable[[], Any], *, warm_pixels: np.ndarray | None) -> None:
        self._build = build
        self._warm_pixels = warm_pixels
        self._heatmap: HeatmapFunction | None = None
        self.model: Any = None

    def ready(self) -> HeatmapFunction:
        heatmap = self._heatmap
        if heatmap is not None:
            return heatmap
        with _BUILDING:
            if self._heatmap is None:
                self.model = self._build()
                heatmap = make_gradcam(self.model)
                if self._warm_pixels is not None:
                    heatmap(self._warm_pixels)
                self._heatmap = heatmap
            return self._heatmap


@dataclass
class ServedModel:
    name: str
    version: str
    card: ModelCard
    input_size: int
    threshold: float
    predictor: FastPredictor
    batcher: DynamicBatcher  # each image -> (raw probability, gate distance or NaN)
    explainer: Explainer
    loaded_at: float
    preprocessing: str = LEGACY
    calibration: Calibration = IDENTITY
    gate: FeatureGate | None = None
    band: float = DEFAULT_BAND
    _in_flight: int = 0
    _retired: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def gradcam(self, pixels: np.ndarray) -> np.ndarray:
        return self.explainer.ready()(pixels)

    def enter(self) -> None:
        with self._lock:
            self._in_flight += 1

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1
            close = self._retired and self._in_flight == 0
        if close:
            self.batcher.close()

    @property
    def retired(self) -> bool:
        return self._retired

    def retire(self) -> None:
        """Stop taking new work; the batcher closes once requests in flight are done."""
        with self._lock:
            self._retired = True
            close = self._in_flight == 0
        if close:
            self.batcher.close()


@dataclass(frozen=True)
class EnsembleInfo:
    members: dict[str, str]  # name -> version, the record's (pinned), in the served models' order
    threshold: float
    threshold_source: str
    calibration: Calibration = IDENTITY
    band: float = DEFAULT_BAND
    calibrated_at: str | None = None
    members_rule: str | None = None
    excluded: dict[str, str] = field(default_factory=dict)  # production models left out -> why
    # The members' served entries, in `members` order: the production entry where the
    # versions agree, else the pinned version loaded for the ensemble alone.
    entries: tuple[ServedModel, ...] = field(default=(), compare=False, repr=False)


def _raw_and_distance(predictor: FastPredictor, gate: FeatureGate | None) -> Callable[[np.ndarray], np.ndarray]:
    """One forward pass per batch -> (N, 2): each image's raw probability and its distance to
    the training data in feature space (NaN when the version has no gate)."""

    def outputs(batch: np.ndarray) -> np.ndarray:
        if predictor.both is None or gate is None:
            probabilities, features = predictor.predict(batch), None
        else:
            probabilities, features = predictor.both(batch)
        distances = gate.distance(features) if gate is not None and features is not None \
            else np.full(len(probabilities), np.nan)
        return np.stack([probabilities, distances], axis=1)

    return outputs


def _phantom(size: int = 256) -> np.ndarray:
    """A CT-like synthetic slice (body ellipse, two dark lungs) when no real image is at hand."""
    y, x = np.mgrid[0:size, 0:size] / size
    body = ((x - 0.5) / 0.45) ** 2 + ((y - 0.5) / 0.35) ** 2 < 1
    lungs = (((x - 0.32) / 0.13) ** 2 + ((y - 0.5) / 0.22) ** 2 < 1) | (
        ((x - 0.68) / 0.13) ** 2 + ((y - 0.5) / 0.22) ** 2 < 1)
    grey = np.where(body, 170, 0) - np.where(lungs, 140, 0)
    return np.repeat(grey.astype(np.uint8)[:, :, None], 3, axis=2)


def smoke_images(settings: InferenceSettings) -> list[np.ndarray]:
    """Real CT slices for smoke predictions and warm-up, else a synthetic one."""
    folder = settings.verification_path()
    images = load_verification_images(folder, settings.verification_images)
    if not images:
        logger.warning("no real CT images found in %s; smoke predictions use a synthetic slice", folder)
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
        self.decoder = DecodePool(workers=settings.decode_threads or os.cpu_count() or 1,
                                  max_waiting=settings.decode_queue, heavy_pixels=settings.decode_heavy_pixels)
        self._models: dict[str, ServedModel] = {}
        self._ensemble: EnsembleInfo | None = None
        self.ensemble_error: str | None = None  # why the ensemble is not servable
        self._logged_ensemble_error: str | None = None
        self.errors: dict[str, str] = {}  # last load/reload failure by model
        self._refused: dict[str, str] = {}  # model -> version that failed; not retried
        self._refused_pinned: dict[tuple[str, str], str] = {}  # (model, version) -> why; not retried
        self._swap_lock = threading.Lock()
        self._ensemble_lock = threading.Lock()  # one ensemble update (and its pinned loads) at a time
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
        """The served entries a request for `model` uses, held until the request ends: for the
        ensemble, its pinned member versions (whatever production is now)."""
        self.check_model(model)
        snapshot, ensemble = self._models, self._ensemble  # one consistent view each
        if model == ENSEMBLE:
            if ensemble is None:
                missing = self.missing()
                if missing:  # a service still loading (or with nothing to serve) is not ready first of all
                    raise ModelNotReadyError(f"model {', '.join(missing)} is not loaded yet")
                if self.ensemble_error:
                    raise EnsembleUnavailableError(self.ensemble_error)
                raise ModelNotReadyError("the ensemble is not ready yet")
            entries = list(ensemble.entries)
        else:
            if model not in snapshot:
                raise ModelNotReadyError(f"model {model} is not loaded yet")
            entries = [snapshot[model]]
        for entry in entries:
            entry.enter()
        try:
            yield entries, ensemble if model == ENSEMBLE else None
        finally:
            for entry in entries:
                entry.leave()

    def in_use(self) -> list[ServedModel]:
        """Every entry production or the ensemble serves (each once)."""
        ensemble = self._ensemble
        entries = {id(e): e for e in [*self._models.values(), *(ensemble.entries if ensemble else ())]}
        return list(entries.values())

    # --- loading --------------------------------------------------------------------------
    def verification_images(self) -> list[np.ndarray]:
        if self._verification is None:
            self._verification = smoke_images(self.settings)
        return self._verification

    def load_version(self, name: str, version: str, *, warm_explainer: bool = True) -> ServedModel:
        """Load, verify (checksums, stored ONNX copy, smoke prediction) and warm up one version;
        with `warm_explainer`, also build its Keras model (its weights must fit the
        architecture) and warm Grad-CAM before returning."""
        card, weights = self.store.verified_card(name, version)
        size = card.input_size
        images = np.stack([resize_for_model(p, size) for p in self.verification_images()])
        settings = self.settings
        explainer = Explainer(functools.partial(keras_model_from, card, weights),
                              warm_pixels=images[0] if settings.warmup_gradcam else None)
        absent_reason = NO_COPY_REASON
        try:
            onnx_copy = self.store.onnx_copy(name, version) if settings.use_onnx else None
        except CTScanError as exc:  # a corrupt copy: TensorFlow serves, and /models says why
            onnx_copy, absent_reason = None, f"the stored ONNX copy was refused: {exc}"
        fast = stored_onnx_predictor(
            onnx_copy, images, weights_sha256=card.weights_sha256, use_onnx=settings.use_onnx,
            tolerance=settings.onnx_tolerance, threads=settings.onnx_threads or None,
            spinning=settings.onnx_spinning, absent_reason=absent_reason)
        gate = FeatureGate.from_dict(card.gate) if card.gate else None
        if isinstance(fast, FastPredictor) and gate is not None and fast.both is not None \
                and fast.both(images[:1])[1] is None:
            fast = ("the ONNX copy was made before copies carried the input gate's features; TensorFlow "
                    "serves this version (a version saved now gets a copy with them)")
        if isinstance(fast, FastPredictor):
            predictor = fast
        else:
            explainer.ready()
            predictor = tensorflow_fallback(explainer.model, onnx_copy, fast)
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
        if warm_explainer:
            explainer.ready()
        batch_metric = self.metrics.batch_size.labels(model=name)
        batcher = DynamicBatcher(_raw_and_distance(predictor, gate), name=f"{name}-{version}",
                                 max_batch_size=settings.max_batch_size,
                                 max_wait_s=settings.max_wait_ms / 1000.0,
                                 on_batch=batch_metric.observe)
        return ServedModel(name=name, version=version, card=card, input_size=size,
                           threshold=card.threshold, predictor=predictor, batcher=batcher,
                           explainer=explainer, loaded_at=time.time(), preprocessing=card_preprocessing(card),
                           calibration=Calibration.from_dict(card.calibration), gate=gate, band=card_band(card))

    def _install(self, served: ServedModel) -> None:
        with self._swap_lock:
            previous = self._models.get(served.name)
            self._models = {**self._models, served.name: served}
            self._set_error(served.name, None)
        self._announce(served)
        self._retire_unused([previous] if previous is not None else [])
        logger.info("serving %s version %s on %s", served.name, served.version, served.predictor.backend)

    def _announce(self, served: ServedModel) -> None:
        self.metrics.model_version.labels(model=served.name, version=served.version,
                                          backend=served.predictor.backend).set(1)

    def _retire_unused(self, candidates: list[ServedModel]) -> None:
        """Retire those of `candidates` that neither production nor the ensemble serves now (a
        pinned version stays as long as the ensemble uses it)."""
        in_use = self.in_use()
        kept = {id(e) for e in in_use}
        for entry in candidates:
            if id(entry) in kept or entry.retired:
                continue
            if not any((e.name, e.version, e.predictor.backend) ==
                       (entry.name, entry.version, entry.predictor.backend) for e in in_use):
                with contextlib.suppress(KeyError):
                    self.metrics.model_version.remove(entry.name, entry.version, entry.predictor.backend)
            entry.retire()
            logger.info("retired %s version %s", entry.name, entry.version)

    def _served_entry(self, name: str, version: str) -> ServedModel | None:
        """An entry of this version already served: production's, else the ensemble's."""
        current = self._models.get(name)
        if current is not None and current.version == version:
            return current
        ensemble = self._ensemble
        return next((e for e in (ensemble.entries if ensemble else ()) if e.name == name and e.version == version),
                    None)

    def update_ensemble(self, *, warm_explainer: bool = True) -> None:
        """Serve the ensemble its record names: each member's pinned version, from production's
        entry where the versions agree, else loaded (and verified) for the ensemble alone.
        Without a record, or when a pinned version is gone or fails its checks, the ensemble
        is None and `ensemble_error` says why (the single models are unaffected)."""
        if ENSEMBLE not in self.servable_names():
            return
        with self._ensemble_lock:
            try:
                record = ensemble_record_for(self.store)
            except EnsembleNotCalibratedError as exc:
                self._set_ensemble(None, str(exc))
                return
            except (CTScanError, OSError, ValueError, KeyError) as exc:
                self._set_ensemble(None, f"the ensemble record cannot be read: {type(exc).__name__}: {exc}")
                return
            members = {name: record.members[name] for name in ensemble_order(list(record.members), self.configured)}
            entries = []
            for name, version in members.items():
                entry = self._served_entry(name, version)
                if entry is None:
                    entry = self._load_pinned(name, version, warm_explainer=warm_explainer)
                if entry is None:
                    self._set_ensemble(None, self._refused_pinned[(name, version)])
                    return
                entries.append(entry)
            self._set_ensemble(EnsembleInfo(
                members=members, threshold=float(record.threshold), threshold_source="val-calibrated",
                calibration=Calibration.from_dict(record.calibration), band=card_band(record),
                calibrated_at=record.created_at, members_rule=record.members_rule, excluded=dict(record.excluded or {}),
                entries=tuple(entries)), None)

    def _load_pinned(self, name: str, version: str, *, warm_explainer: bool) -> ServedModel | None:
        """Load a member version the ensemble pins (not production's); None when it is refused
        (the reason kept in `_refused_pinned`, not retried until the record changes)."""
        if (name, version) in self._refused_pinned:
            return None
        try:
            served = self.load_version(name, version, warm_explainer=warm_explainer)
        except Exception as exc:
            self._refused_pinned[(name, version)] = (
                f"the ensemble's member {name} version {version} (the version its threshold was fitted for on val) "
                f"cannot be loaded: {type(exc).__name__}: {exc}; run `ctscan models calibrate-ensemble` to fit it "
                "for versions that load")
            self.metrics.reloads.labels(model=name, outcome="refused").inc()
            logger.error("%s", self._refused_pinned[(name, version)])
            return None
        self.metrics.reloads.labels(model=name, outcome="loaded").inc()
        self._announce(served)
        logger.info("%s %s loaded for the ensemble (its calibrated version; production is %s)", name, version,
                    self._models[name].version if name in self._models else "not served")
        return served

    def _set_ensemble(self, ensemble: EnsembleInfo | None, error: str | None) -> None:
        with self._swap_lock:
            previous = self._ensemble
            if ensemble is not None and previous is not None and ensemble == previous \
                    and all(a is b for a, b in zip(ensemble.entries, previous.entries, strict=True)):
                self.ensemble_error = None
                return  # nothing changed (the usual poll)
            self._ensemble, self.ensemble_error = ensemble, error
        if error is not None and error != self._logged_ensemble_error:
            logger.warning("ensemble not servable: %s", error)
        self._logged_ensemble_error = error
        if ensemble is not None and (previous is None or ensemble.members != previous.members):
            logger.info("serving the ensemble of %s", ", ".join(f"{n} {v}" for n, v in ensemble.members.items()))
        self._retire_unused(list(previous.entries) if previous is not None else [])

    def try_load(self, name: str, *, reason: str, warm_explainer: bool = True) -> bool:
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
        reused = self._served_entry(name, version)  # e.g. a rollback to the version the ensemble pins
        if reused is not None:
            self._install(reused)
            logger.info("%s %s: production now uses the entry the ensemble serves (%s)", name, version, reason)
            return True
        try:
            served = self.load_version(name, version, warm_explainer=warm_explainer)
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
        """Load every configured model; readiness waits for their predictions to be warm.

        The Keras models (for Grad-CAM) are built and warmed after that: TensorFlow's import
        and Grad-CAM's first trace cost seconds per model on a CPU, and an ONNX copy needs
        neither. An explanation asked for in those seconds builds its model itself. A new
        version arriving later is loaded completely before it replaces the served one."""
        try:
            for name in self.configured:
                if self._stop.is_set():
                    return
                self.try_load(name, reason="startup", warm_explainer=False)
            # Readiness waits for the ensemble's pinned versions too: it is the default model.
            # One that cannot be loaded does not hold readiness back (the ensemble answers 503
            # with the reason; the single models answer).
            if not self._stop.is_set():
                self.update_ensemble(warm_explainer=False)
        finally:
            self.loading_done.set()
        for served in self.in_use():
            if self._stop.is_set():
                return
            started = time.monotonic()
            try:
                served.explainer.ready()
                logger.info("%s %s: Grad-CAM ready in %.1fs", served.name, served.version, time.monotonic() - started)
            except Exception:  # explanations will fail and say so; predictions are unaffected
                logger.exception("%s %s: the Keras model for Grad-CAM could not be built", served.name,
                                 served.version)

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
            self.update_ensemble()  # a recalibrated record: new members, versions or threshold

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)  # a load in progress is abandoned
        for served in self.in_use():
            served.retire()
        self.decoder.shutdown()
