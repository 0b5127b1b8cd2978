"""Keras callbacks of a training run (`ctscan.training.Trainer`): exact validation AUC,
early stopping that survives a resume, the per-epoch run checkpoint, and a cancel checked
between batches."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from ctscan.metrics import point_metrics
from ctscan.training import (
    LAST_CHECKPOINT,
    EpochReport,
    Phase,
    RunState,
    TrainingCancelled,
    plot_history,
    predict_probabilities,
)

if TYPE_CHECKING:
    from ctscan.training import Trainer


class ValidationAUC(keras.callbacks.Callback):  # type: ignore[misc]
    """Adds val_auc, val_loss and val_accuracy (at 0.5) to each epoch's logs: exact AUC from
    scikit-learn over the whole val split, not Keras' binned streaming estimate."""

    def __init__(self, images: np.ndarray, targets: np.ndarray) -> None:
        super().__init__()
        self.images, self.targets = images, targets

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        probabilities = predict_probabilities(self.model, self.images)
        metrics = point_metrics(self.targets, probabilities, 0.5)
        clipped = probabilities.clip(1e-7, 1 - 1e-7)
        loss = -np.mean(self.targets * np.log(clipped) + (1 - self.targets) * np.log(1 - clipped))
        auc = float(metrics["auc"]) if not math.isnan(metrics["auc"]) else 0.0
        if logs is not None:
            logs.update(val_auc=auc, val_loss=float(loss), val_accuracy=float(metrics["accuracy"]))


CANCEL_POLL_S = 2.0  # how often a running job asks whether it was cancelled (one store read)


class CancelBetweenBatches(keras.callbacks.Callback):  # type: ignore[misc]
    """Stops a run at the end of a batch once `should_stop()` says so (asked at most every
    `poll_s` seconds): a cancel takes effect within a batch and a poll, not at the end of a
    long epoch. The last epoch's checkpoint is kept; the unfinished epoch is lost."""

    def __init__(self, should_stop: Callable[[], bool], *, poll_s: float = CANCEL_POLL_S) -> None:
        super().__init__()
        self.should_stop, self.poll_s = should_stop, poll_s
        self.asked_at = -math.inf

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        now = time.monotonic()
        if now - self.asked_at < self.poll_s:
            return
        self.asked_at = now
        if self.should_stop():
            raise TrainingCancelled(f"cancelled during batch {batch + 1} of the epoch")


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


class RunCheckpoint(keras.callbacks.Callback):  # type: ignore[misc]
    """After every epoch: the run state, `last.keras`, the history plot, the progress report
    (which may raise TrainingCancelled) and the seed of the next epoch's augmentation."""

    def __init__(self, trainer: Trainer, state: RunState, phase: Phase, total_epochs: int,
                 epoch_variable: Any) -> None:
        super().__init__()
        self.trainer, self.state, self.phase = trainer, state, phase
        self.total_epochs, self.epoch_variable = total_epochs, epoch_variable
        self.started = time.monotonic()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.epoch_variable.assign(self.state.epochs_done)
        self.started = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs or {}
        state, trainer = self.state, self.trainer
        seconds = time.monotonic() - self.started
        learning_rate = float(np.asarray(self.model.optimizer.learning_rate))
        val_auc, val_loss = float(logs["val_auc"]), float(logs["val_loss"])
        state.epochs_done += 1
        state.epoch_in_phase = epoch + 1
        state.training_seconds += seconds
        if val_auc > state.best_val_auc + 1e-6:
            state.best_val_auc, state.best_val_loss = val_auc, val_loss
            state.best_epoch = state.epochs_done
            state.epochs_since_best = 0
        else:
            state.epochs_since_best += 1
        entry: dict[str, Any] = {
            "epoch": state.epochs_done, "phase": self.phase.name, "loss": float(logs["loss"]),
            "val_loss": val_loss, "val_auc": val_auc, "val_accuracy": float(logs["val_accuracy"]),
            "learning_rate": learning_rate, "seconds": seconds,
        }
        state.history.append(entry)
        self.model.save(trainer.run_dir / LAST_CHECKPOINT)
        trainer._save_state(state)
        plot_history(state.history, trainer.run_dir / "history.png")
        if trainer.verbose:
            print(f"epoch {state.epochs_done}/{self.total_epochs} [{self.phase.name}] loss {entry['loss']:.4f} "
                  f"val_loss {val_loss:.4f} val_auc {val_auc:.4f} val_acc {entry['val_accuracy']:.4f} "
                  f"({seconds:.0f}s, best epoch {state.best_epoch})", flush=True)
        if trainer.on_epoch is not None:
            trainer.on_epoch(EpochReport(
                phase=self.phase.name, epoch=state.epochs_done, total_epochs=self.total_epochs,
                loss=entry["loss"], val_loss=val_loss, val_auc=val_auc,
                val_accuracy=entry["val_accuracy"], learning_rate=learning_rate,
                seconds=seconds, best_epoch=state.best_epoch, best_val_auc=state.best_val_auc))


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
