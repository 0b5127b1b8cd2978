"""Keras callbacks of a training run (`ctscan.training.runs.Trainer` hands them in): exact
validation AUC, early stopping that survives a resume, weight averaging, a hook at each
epoch's end, and a cancel checked between batches. They know nothing of the trainer (it
imports them, never the other way)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from ctscan.metrics import SOURCE_AUC_PREFIX, point_metrics
from ctscan.models import predict_probabilities

if TYPE_CHECKING:
    from ctscan.training.runs import RunState


CANCEL_POLL_S = 2.0  # how often a running job asks whether it was cancelled (one store read)


class CancelBetweenBatches(keras.callbacks.Callback):  # type: ignore[misc]
    """Stops a run at the end of a batch once `should_stop()` says so (asked at most every
    `poll_s` seconds), raising `cancelled`: a cancel takes effect within a batch and a poll,
    not at the end of a long epoch. The last epoch's checkpoint is kept; the unfinished
    epoch is lost."""

    def __init__(self, should_stop: Callable[[], bool], *, cancelled: type[Exception],
                 poll_s: float = CANCEL_POLL_S) -> None:
        super().__init__()
        self.should_stop, self.cancelled, self.poll_s = should_stop, cancelled, poll_s
        self.asked_at = -math.inf

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        now = time.monotonic()
        if now - self.asked_at < self.poll_s:
            return
        self.asked_at = now
        if self.should_stop():
            raise self.cancelled(f"cancelled during batch {batch + 1} of the epoch")


def selection_auc(targets: np.ndarray, probabilities: np.ndarray,
                  sources: np.ndarray | None) -> tuple[float, dict[str, float]]:
    """The model-selection rule: the worst AUC among the val sources that hold both classes
    (one source: its AUC), so no epoch or recipe wins on one source alone; and each source's."""
    names = sorted(set(sources.tolist())) if sources is not None else []
    per_source: dict[str, float] = {}
    for name in names:
        chosen = sources == name  # type: ignore[comparison-overlap]
        if len(set(targets[chosen].tolist())) == 2:
            per_source[name] = float(point_metrics(targets[chosen], probabilities[chosen], 0.5)["auc"])
    if len(per_source) >= 2:
        return min(per_source.values()), per_source
    auc = float(point_metrics(targets, probabilities, 0.5)["auc"])
    return (auc if not math.isnan(auc) else 0.0), per_source


class ValidationAUC(keras.callbacks.Callback):  # type: ignore[misc]
    """Adds val_auc (the selection rule, `selection_auc`), val_loss and val_accuracy (at 0.5)
    to each epoch's logs: exact AUC from scikit-learn over the whole val split, not Keras'
    binned streaming estimate; with several sources also each source's (val_sources)."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, *, sources: np.ndarray | None = None) -> None:
        super().__init__()
        self.images, self.targets, self.sources = images, targets, sources

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        probabilities = predict_probabilities(self.model, self.images)
        metrics = point_metrics(self.targets, probabilities, 0.5)
        clipped = probabilities.clip(1e-7, 1 - 1e-7)
        loss = -np.mean(self.targets * np.log(clipped) + (1 - self.targets) * np.log(1 - clipped))
        auc, per_source = selection_auc(self.targets, probabilities, self.sources)
        if logs is not None:
            logs.update(val_auc=auc, val_loss=float(loss), val_accuracy=float(metrics["accuracy"]))
            logs.update({f"{SOURCE_AUC_PREFIX}{name}": value for name, value in per_source.items()})


class ResumableEarlyStopping(keras.callbacks.Callback):  # type: ignore[misc]
    """keras.callbacks.EarlyStopping that starts from a resumed run's best and wait count."""

    def __init__(self, *, best: float, wait: int, **kwargs: Any) -> None:
        super().__init__()
        self.inner = keras.callbacks.EarlyStopping(**kwargs)
        self.resume_best, self.resume_wait = best, wait

    def set_model(self, model: Any) -> None:
        super().set_model(model)
        self.inner.set_model(model)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.inner.on_train_begin(logs)
        if self.resume_best > -1.0:
            self.inner.best, self.inner.wait = self.resume_best, self.resume_wait

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.inner.on_epoch_end(epoch, logs)


class EpochHook(keras.callbacks.Callback):  # type: ignore[misc]
    """Hands each epoch's start, and its end (the model, the Keras logs, the seconds it took),
    to the caller: the trainer keeps its run state, checkpoint and progress report itself."""

    def __init__(self, *, on_begin: Callable[[], None],
                 on_end: Callable[[Any, int, dict[str, Any], float], None]) -> None:
        super().__init__()
        self.on_begin, self.on_end = on_begin, on_end
        self.started = time.monotonic()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.on_begin()
        self.started = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.on_end(self.model, epoch, logs or {}, time.monotonic() - self.started)


class WeightAverage(keras.callbacks.Callback):  # type: ignore[misc]
    """Running average of the weights over the epochs from `first_epoch` (0-based, within the
    phase) on, kept in `path` so a resumed run continues it; `RunState.swa_count` says how
    many epochs it holds."""

    def __init__(self, path: Path, state: RunState, *, first_epoch: int) -> None:
        super().__init__()
        self.path, self.state, self.first_epoch = path, state, first_epoch

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if epoch < self.first_epoch:
            return
        weights = [np.asarray(w, dtype=np.float64) for w in self.model.get_weights()]
        count = self.state.swa_count
        if count:
            with np.load(self.path) as arrays:
                weights = [a + (w - a) / (count + 1) for a, w in
                           zip((arrays[f"w{i}"] for i in range(len(weights))), weights, strict=True)]
        temporary = self.path.with_suffix(".tmp.npz")
        np.savez(temporary, **{f"w{i}": w.astype(np.float32) for i, w in enumerate(weights)})  # type: ignore[arg-type]
        temporary.replace(self.path)
        self.state.swa_count = count + 1
