"""Training runs: the seed's regimes, per-epoch checkpoints, resume, model selection on val.

A run lives in a run folder: `state.json` (progress, history, best epoch), `last.keras`
(model and optimiser after the last finished epoch) and `best.weights.h5`. Interrupt it at
any point and `resume=True` continues after the last finished epoch.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ctscan import DISCLAIMER
from ctscan.data import CTDataset, Sample, class_weights, load_arrays, make_pipeline
from ctscan.errors import CTScanError
from ctscan.metrics import choose_threshold, full_report, point_metrics
from ctscan.models import (
    build_model,
    compile_for_training,
    get_spec,
    parse_init,
    set_backbone_trainable,
    unfreeze_top,
)
from ctscan.store import unpack_weights

STATE_FILE = "state.json"
LAST_CHECKPOINT = "last.keras"
BEST_WEIGHTS = "best.weights.h5"


class TrainingCancelled(CTScanError):
    """Raised by a progress callback to stop a run cooperatively (checkpoint is kept)."""


@dataclass
class TrainConfig:
    model: str
    data_dir: str
    init: str = "imagenet"
    input_size: int | None = None
    epochs: int = 30
    finetune_epochs: int | None = None  # pretrained MobileNetV2 only; default = epochs
    batch_size: int = 16
    learning_rate: float = 1e-3
    finetune_learning_rate: float = 1e-5
    patience: int = 8
    seed: int = 42
    threshold_rule: str = "youden"
    limit_per_class: int | None = None  # small subsets for tests and smoke runs
    report_test: bool = False
    augment: bool = True

    def validate(self) -> None:
        get_spec(self.model)
        parse_init(self.init)
        for name in ("epochs", "batch_size", "patience"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise CTScanError(f"{name} must be a positive integer, got {value!r}")
        if self.learning_rate <= 0 or self.finetune_learning_rate <= 0:
            raise CTScanError("learning rates must be positive")


@dataclass
class Phase:
    name: str  # "full", "frozen" or "finetune"
    epochs: int
    learning_rate: float


@dataclass
class EpochReport:
    phase: str
    epoch: int  # 1-based, over all phases
    total_epochs: int
    loss: float
    val_loss: float
    val_auc: float
    val_accuracy: float
    learning_rate: float
    seconds: float
    best_epoch: int
    best_val_auc: float


@dataclass
class RunState:
    phase_index: int = 0
    epoch_in_phase: int = 0
    epochs_done: int = 0
    best_val_auc: float = -1.0
    best_val_loss: float = math.inf
    best_epoch: int = 0
    epochs_since_best: int = 0
    training_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False
    stopped_early: bool = False


def plan_phases(config: TrainConfig) -> list[Phase]:
    """With random init a frozen base learns nothing, so the whole network trains in one
    phase. With pretrained weights: the seed's regime (frozen base, then MobileNetV2 fine-tunes
    its last 20 layers)."""
    spec = get_spec(config.model)
    if config.init == "none":
        return [Phase("full", config.epochs, config.learning_rate)]
    phases = [Phase("frozen", config.epochs, config.learning_rate)]
    if spec.finetune_layers:
        phases.append(Phase("finetune", config.finetune_epochs or config.epochs,
                            config.finetune_learning_rate))
    return phases


def _set_phase_trainability(model: Any, config: TrainConfig, phase: Phase) -> None:
    if phase.name == "full":
        set_backbone_trainable(model, trainable=True)
    elif phase.name == "frozen":
        set_backbone_trainable(model, trainable=False)
    else:
        unfreeze_top(model, get_spec(config.model).finetune_layers)


def _subset(samples: list[Sample], limit: int | None, seed: int) -> list[Sample]:
    if not limit:
        return samples
    rng = np.random.default_rng(seed)
    chosen: list[Sample] = []
    for label in sorted({s.label for s in samples}):
        group = [s for s in samples if s.label == label]
        index = rng.permutation(len(group))[:limit]
        chosen.extend(group[i] for i in sorted(index))
    return chosen


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment_info() -> dict[str, Any]:
    import keras
    import sklearn
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "numpy": np.__version__,
        "scikit_learn": sklearn.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
    }


def predict_probabilities(model: Any, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    if len(images) == 0:
        return np.zeros((0,), np.float32)
    outputs = [np.asarray(model(images[i:i + batch_size].astype(np.float32), training=False))
               for i in range(0, len(images), batch_size)]
    return np.concatenate(outputs).reshape(-1)


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [h["loss"] for h in history], label="train loss")
    left.plot(epochs, [h["val_loss"] for h in history], label="val loss")
    left.set_xlabel("epoch")
    left.legend()
    right.plot(epochs, [h["val_auc"] for h in history], label="val AUC")
    right.plot(epochs, [h["val_accuracy"] for h in history], label="val accuracy (0.5)")
    right.set_xlabel("epoch")
    right.set_ylim(0, 1)
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        run_dir: str | Path,
        *,
        on_epoch: Callable[[EpochReport], None] | None = None,
        verbose: int = 1,
    ) -> None:
        config.validate()
        self.config = config
        self.run_dir = Path(run_dir)
        self.on_epoch = on_epoch
        self.verbose = verbose
        self.phases = plan_phases(config)
        self.spec = get_spec(config.model)
        self.input_size = config.input_size or self.spec.input_size

    # --- state ---------------------------------------------------------------------------
    def _state_path(self) -> Path:
        return self.run_dir / STATE_FILE

    def has_checkpoint(self) -> bool:
        return self._state_path().is_file()

    def _load_state(self) -> RunState:
        raw = json.loads(self._state_path().read_text())
        saved_config = raw.get("config", {})
        if saved_config.get("model") != self.config.model:
            raise CTScanError(f"run folder {self.run_dir} belongs to model {saved_config.get('model')}")
        return RunState(**raw["state"])

    def _save_state(self, state: RunState) -> None:
        payload = {"config": asdict(self.config), "state": asdict(state)}
        temporary = self._state_path().with_suffix(".tmp")
        temporary.write_text(json.dumps(payload, indent=2))
        os.replace(temporary, self._state_path())

    # --- run -----------------------------------------------------------------------------
    def run(self, *, resume: bool = False) -> tuple[Any, RunState, dict[str, Any]]:
        """Train (or continue) and return (model with best weights, state, data summary)."""
        import keras

        config = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.has_checkpoint() and not resume:
            raise CTScanError(f"run folder {self.run_dir} already holds a checkpoint; "
                              "pass --resume to continue it or choose another --run-dir")
        keras.utils.set_random_seed(config.seed)

        dataset = CTDataset(config.data_dir)
        dataset.verify_checksums()
        train_samples = _subset(dataset.split("train"), config.limit_per_class, config.seed)
        val_samples = _subset(dataset.split("val"), config.limit_per_class, config.seed)
        train_x, train_y = load_arrays(train_samples, self.input_size)
        val_x, val_y = load_arrays(val_samples, self.input_size)
        weights = class_weights(train_y)
        self.data_summary = {
            "path": str(dataset.root),
            "fingerprint": dataset.fingerprint(),
            "counts": dataset.counts(),
            "train_images": len(train_samples),
            "val_images": len(val_samples),
            "class_weights": weights,
        }

        if resume and self.has_checkpoint():
            state = self._load_state()
            model = keras.models.load_model(self.run_dir / LAST_CHECKPOINT, compile=True)
        else:
            state = RunState()
            model = build_model(config.model, config.init, self.input_size, compile_model=False)
            _set_phase_trainability(model, config, self.phases[0])
            compile_for_training(model, learning_rate=self.phases[0].learning_rate)

        total_epochs = sum(p.epochs for p in self.phases)
        while not state.finished:
            phase = self.phases[state.phase_index]
            if state.epoch_in_phase >= phase.epochs or (
                state.epochs_since_best >= config.patience and state.epoch_in_phase > 0
            ):
                state.stopped_early = state.epoch_in_phase < phase.epochs
                if state.phase_index + 1 >= len(self.phases):
                    state.finished = True
                    self._save_state(state)
                    break
                # Next phase starts from the best weights so far, with a fresh optimiser.
                model.load_weights(self.run_dir / BEST_WEIGHTS)
                state.phase_index += 1
                state.epoch_in_phase = 0
                state.epochs_since_best = 0
                next_phase = self.phases[state.phase_index]
                _set_phase_trainability(model, config, next_phase)
                compile_for_training(model, learning_rate=next_phase.learning_rate)
                model.save(self.run_dir / LAST_CHECKPOINT)
                self._save_state(state)
                continue

            # Cosine decay within the phase.
            learning_rate = phase.learning_rate * 0.5 * (1 + math.cos(math.pi * state.epoch_in_phase / phase.epochs))
            model.optimizer.learning_rate.assign(learning_rate)
            epoch_seed = config.seed * 1000 + state.epochs_done
            pipeline = make_pipeline(train_x, train_y, batch_size=config.batch_size,
                                     training=config.augment, seed=epoch_seed)
            started = time.monotonic()
            fit = model.fit(pipeline, epochs=1, class_weight=weights, verbose=self.verbose)
            val_probabilities = predict_probabilities(model, val_x)
            seconds = time.monotonic() - started
            val = point_metrics(val_y, val_probabilities, 0.5)
            val_loss = float(keras.losses.binary_crossentropy(
                val_y.reshape(-1, 1), val_probabilities.reshape(-1, 1).clip(1e-7, 1 - 1e-7)).numpy().mean())
            state.epochs_done += 1
            state.epoch_in_phase += 1
            state.training_seconds += seconds
            improved = val["auc"] > state.best_val_auc + 1e-6 or (
                abs(val["auc"] - state.best_val_auc) <= 1e-6 and val_loss < state.best_val_loss)
            if improved or not (self.run_dir / BEST_WEIGHTS).exists():
                state.best_val_auc = float(val["auc"]) if not math.isnan(val["auc"]) else 0.0
                state.best_val_loss = val_loss
                state.best_epoch = state.epochs_done
                state.epochs_since_best = 0
                model.save_weights(self.run_dir / BEST_WEIGHTS)
            else:
                state.epochs_since_best += 1
            entry: dict[str, Any] = {
                "epoch": state.epochs_done, "phase": phase.name,
                "loss": float(fit.history["loss"][-1]), "val_loss": val_loss,
                "val_auc": float(val["auc"]), "val_accuracy": float(val["accuracy"]),
                "learning_rate": learning_rate, "seconds": seconds,
            }
            state.history.append(entry)
            model.save(self.run_dir / LAST_CHECKPOINT)
            self._save_state(state)
            plot_history(state.history, self.run_dir / "history.png")
            if self.verbose:
                print(f"epoch {state.epochs_done}/{total_epochs} [{phase.name}] loss {entry['loss']:.4f} "
                      f"val_loss {val_loss:.4f} val_auc {val['auc']:.4f} val_acc {val['accuracy']:.4f} "
                      f"({seconds:.0f}s, best epoch {state.best_epoch})", flush=True)
            if self.on_epoch is not None:
                self.on_epoch(EpochReport(
                    phase=phase.name, epoch=state.epochs_done, total_epochs=total_epochs,
                    loss=entry["loss"], val_loss=val_loss, val_auc=entry["val_auc"],
                    val_accuracy=entry["val_accuracy"], learning_rate=learning_rate,
                    seconds=seconds, best_epoch=state.best_epoch, best_val_auc=state.best_val_auc))

        model.load_weights(self.run_dir / BEST_WEIGHTS)
        self.val_data = (val_x, val_y)
        return model, state, self.data_summary


def build_card(
    *,
    config: TrainConfig,
    trainer: Trainer,
    state: RunState,
    model: Any,
    store_weights: bytes,
) -> dict[str, Any]:
    """Evaluate the weights exactly as stored (float16 round trip) on val (threshold) and,
    when asked, once on test; return the model card."""
    unpack_weights(model, store_weights)
    val_x, val_y = trainer.val_data
    val_probabilities = predict_probabilities(model, val_x)
    threshold = choose_threshold(val_y, val_probabilities, config.threshold_rule)
    card: dict[str, Any] = {
        "architecture": config.model,
        "input_size": trainer.input_size,
        "init": config.init,
        "regime": [asdict(p) for p in trainer.phases],
        "dataset": trainer.data_summary,
        "split": {"train": "train", "model_selection_and_threshold": "val",
                  "report": "test" if config.report_test else None},
        "epochs_run": state.epochs_done,
        "best_epoch": state.best_epoch,
        "stopped_early": state.stopped_early,
        "hyperparameters": {k: v for k, v in asdict(config).items()
                            if k not in ("data_dir", "model", "init", "report_test")},
        "threshold": threshold,
        "threshold_rule": config.threshold_rule,
        "metrics": {"val": full_report(val_y, val_probabilities, threshold)},
        "history": state.history,
        "training_seconds": round(state.training_seconds, 1),
        "git_commit": git_commit(),
        "environment": environment_info(),
        "created_at": datetime.now(UTC).isoformat(),
        "intended_use": DISCLAIMER,
    }
    if config.report_test:
        dataset = CTDataset(config.data_dir)
        test_samples = _subset(dataset.split("test"), config.limit_per_class, config.seed)
        test_x, test_y = load_arrays(test_samples, trainer.input_size)
        card["metrics"]["test"] = full_report(test_y, predict_probabilities(model, test_x), threshold)
    return card
