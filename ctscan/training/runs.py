"""Training runs: the seed's regimes, per-epoch checkpoints, resume, model selection on val.

A run lives in a run folder: `state.json` (progress, history, best epoch), `last.keras`
(model and optimiser after the last finished epoch) and `best.weights.h5`. Interrupt it at
any point and `resume=True` continues after the last finished epoch.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ctscan import DISCLAIMER
from ctscan.data.dataset import (
    AUGMENTATIONS,
    CTDataset,
    LoadedSplit,
    Sample,
    class_weights,
    load_split,
    make_pipeline,
    source_weights,
)
from ctscan.errors import CTScanError
from ctscan.imaging.preprocessing import DEFAULT_PREPROCESSING, get_preprocessor
from ctscan.metrics import SOURCE_AUC_PREFIX, THRESHOLD_RULES, choose_threshold, full_report
from ctscan.models import (
    build_model,
    compile_for_training,
    get_spec,
    parse_init,
    predict_probabilities,
    set_backbone_trainable,
    unfreeze_top,
    unpack_weights,
)

STATE_FILE = "state.json"
LAST_CHECKPOINT = "last.keras"
BEST_WEIGHTS = "best.weights.h5"
SWA_WEIGHTS = "swa.npz"
SWA_BEST = "swa-best.weights.h5"  # the average, on its way to BEST_WEIGHTS


class TrainingCancelled(CTScanError):
    """Raised by a progress callback to stop a run cooperatively (checkpoint is kept)."""


@dataclass
class TrainConfig:
    model: str
    data_dir: str  # the first source
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
    # The recipe (see README, "Training recipe"): each switch measured on UCSD val.
    preprocessing: str = DEFAULT_PREPROCESSING
    augmentation: str = "domain"  # basic | domain | lesion (used when augment is true)
    mixup: float = 0.0  # Beta(alpha, alpha) of mixup; 0 = off
    ema: bool = False  # evaluate and keep the exponential moving average of the weights
    label_smoothing: float = 0.0
    weight_decay: float = 0.0  # AdamW's decoupled weight decay; 0 = Adam
    source_variants: int = 1  # copies of each training slice changed before preprocessing; 1 = none
    swa_epochs: int = 0  # average the weights of the last N epochs (then BatchNorm re-estimated); 0 = off
    input_gate: bool = True  # fit the out-of-distribution gate (smoke runs on a few images switch it off)
    # More sources trained on at once (their train splits) and selected on (their val splits,
    # by the worst source's AUC: no epoch can win on one source alone).
    extra_data_dirs: list[str] = field(default_factory=list)
    anatomy_balance: bool = False  # weight slices so anatomy cannot predict the label (data.source_weights)
    # Source name -> factor on its total weight (default: every source alike).
    source_weights: dict[str, float] = field(default_factory=dict)
    source_names: list[str] = field(default_factory=list)  # one per data folder; default: the folders' names

    @property
    def data_dirs(self) -> list[str]:
        return [self.data_dir, *self.extra_data_dirs]

    @property
    def names(self) -> list[str]:
        return self.source_names or [Path(d).expanduser().resolve().name for d in self.data_dirs]

    def validate(self) -> None:
        get_spec(self.model)
        parse_init(self.init)
        get_preprocessor(self.preprocessing)
        for name in ("epochs", "batch_size", "patience"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CTScanError(f"{name} must be a positive integer, got {value!r}")
        if self.learning_rate <= 0 or self.finetune_learning_rate <= 0:
            raise CTScanError("learning rates must be positive")
        if self.threshold_rule not in THRESHOLD_RULES:
            raise CTScanError(f"threshold_rule must be one of {', '.join(THRESHOLD_RULES)}, "
                              f"got {self.threshold_rule!r}")
        if self.augmentation not in AUGMENTATIONS[1:]:
            raise CTScanError(f"augmentation must be one of {', '.join(AUGMENTATIONS[1:])}, "
                              f"got {self.augmentation!r}")
        if not 0.0 <= self.mixup <= 1.0:
            raise CTScanError(f"mixup must lie in 0..1, got {self.mixup!r}")
        if not 0.0 <= self.label_smoothing <= 0.3:
            raise CTScanError(f"label_smoothing must lie in 0..0.3, got {self.label_smoothing!r}")
        if not isinstance(self.swa_epochs, int) or not 0 <= self.swa_epochs <= self.epochs:
            raise CTScanError(f"swa_epochs must be a whole number in 0..epochs, got {self.swa_epochs!r}")
        if not isinstance(self.source_variants, int) or not 1 <= self.source_variants <= 16:
            raise CTScanError(f"source_variants must be a whole number in 1..16, got {self.source_variants!r}")
        names = self.names
        if self.source_names and len(self.source_names) != len(self.data_dirs):
            raise CTScanError(f"{len(self.source_names)} source names for {len(self.data_dirs)} data folders")
        if len(set(names)) != len(names):
            raise CTScanError(f"each data folder must be another source; got {', '.join(names)}")
        unknown = sorted(set(self.source_weights) - set(names))
        if unknown:
            raise CTScanError(f"source_weights names {', '.join(unknown)}, which is not among the sources "
                              f"({', '.join(names)})")
        if any(not 0.0 < float(w) <= 100.0 for w in self.source_weights.values()):
            raise CTScanError(f"source_weights must lie in (0, 100], got {self.source_weights!r}")
        if not 0.0 <= self.weight_decay <= 1.0:
            raise CTScanError(f"weight_decay must lie in 0..1, got {self.weight_decay!r}")

    @property
    def recipe(self) -> str:
        return self.augmentation if self.augment else "none"


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
    swa_count: int = 0  # epochs averaged so far into SWA_WEIGHTS
    swa_val_auc: float | None = None
    selected: str = "best_epoch"  # or "swa": which weights the run ended with


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


def combined_fingerprint(sources: list[dict[str, Any]]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for source in sorted(sources, key=lambda s: str(s["fingerprint"])):
        digest.update(str(source["fingerprint"]).encode())
    return digest.hexdigest()


def split_report(split: LoadedSplit, probabilities: np.ndarray, threshold: float) -> dict[str, Any]:
    """`full_report` per source of a split (several sources only)."""
    names = sorted(set(split.sources.tolist()))
    if len(names) < 2:
        return {}
    return {name: full_report(split.targets[split.sources == name], probabilities[split.sources == name], threshold)
            for name in names}


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
        should_stop: Callable[[], bool] | None = None,
        verbose: int = 1,
    ) -> None:
        config.validate()
        self.config = config
        self.run_dir = Path(run_dir)
        self.on_epoch = on_epoch
        self.should_stop = should_stop  # asked between batches (a cancel): TrainingCancelled
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

    # A run killed at any moment must resume: every file is written beside its final name and
    # moved into place, `last.keras` before the state that counts its epoch, and a new best
    # epoch's weights only once the state naming it is on disk (a kill mid-write once left a
    # truncated last.keras behind a state that trusted it, and the run could not resume).
    def _partial(self, name: str) -> Path:
        return self.run_dir / f"partial-{name}"

    def _save_checkpoint(self, model: Any, state: RunState) -> None:
        model.save(self._partial(LAST_CHECKPOINT))
        os.replace(self._partial(LAST_CHECKPOINT), self.run_dir / LAST_CHECKPOINT)
        self._save_state(state)
        self._finish_best(state)

    def _finish_best(self, state: RunState) -> None:
        """Move a new best epoch's weights into place once the saved state names that epoch;
        weights of an epoch the state does not count (killed before its state) are dropped."""
        for partial, counted in ((self._partial(BEST_WEIGHTS), state.best_epoch == state.epochs_done),
                                 (self._partial(SWA_BEST), state.selected == "swa")):
            if partial.exists():
                if counted:
                    os.replace(partial, self.run_dir / BEST_WEIGHTS)
                else:
                    partial.unlink()

    # --- run -----------------------------------------------------------------------------
    def _compile(self, model: Any, learning_rate: float) -> None:
        config = self.config
        compile_for_training(model, learning_rate=learning_rate, weight_decay=config.weight_decay,
                             use_ema=config.ema, label_smoothing=config.label_smoothing)

    def _load_data(self) -> None:
        config = self.config
        train_samples: list[Sample] = []
        val_samples: list[Sample] = []
        sources: list[dict[str, Any]] = []
        for data_dir, name in zip(config.data_dirs, config.names, strict=True):
            dataset = CTDataset(data_dir, name=name)
            dataset.verify_checksums()
            train = _subset(dataset.split("train"), config.limit_per_class, config.seed)
            val = _subset(dataset.split("val"), config.limit_per_class, config.seed)
            train_samples += train
            val_samples += val
            sources.append({"name": dataset.name, "path": str(dataset.root), "fingerprint": dataset.fingerprint(),
                            "counts": dataset.counts(), "train_images": len(train), "val_images": len(val)})
        variants = config.source_variants if config.augment else 1
        self.train_split = load_split(train_samples, self.input_size, preprocessing=config.preprocessing,
                                      variants=variants, seed=config.seed)
        self.train_x, self.train_y = self.train_split.images, self.train_split.targets
        self.val_samples = val_samples  # the promotion gate measures production on them too
        self.val_split = load_split(val_samples, self.input_size, preprocessing=config.preprocessing)
        self.val_data = (self.val_split.images, self.val_split.targets)
        weights = class_weights(self.train_y)
        self.class_weights = weights
        self.sample_weights = source_weights(
            self.train_y, self.train_split.sources,
            self.train_split.anatomy if config.anatomy_balance else None, shares=config.source_weights)
        first, shares = sources[0], config.source_weights
        self.data_summary = {
            "path": first["path"],
            # One source: its own fingerprint (cards before multi-source training read the same);
            # several: one over theirs, so the promotion gate compares like with like.
            "fingerprint": first["fingerprint"] if len(sources) == 1 else combined_fingerprint(sources),
            "counts": first["counts"],
            "train_images": len(train_samples),
            "val_images": len(val_samples),
            "class_weights": weights,
            "sources": sources,
            "weighting": "per source and class" + (", inverse anatomy propensity" if config.anatomy_balance else "")
                         + "".join(f", {name} weighs {share:g}x" for name, share in sorted(shares.items())),
        }

    def run(self, *, resume: bool = False) -> tuple[Any, RunState, dict[str, Any]]:
        """Train (or continue) and return (model with best weights, state, data summary).

        One `fit` per phase; Keras callbacks do the rest: cosine learning rate, validation
        AUC, early stopping and best-weights checkpoint on it, EMA weights, and the run
        checkpoint after every epoch (`_end_epoch`)."""
        import keras

        config = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.has_checkpoint() and not resume:
            raise CTScanError(f"run folder {self.run_dir} already holds a checkpoint; "
                              "pass --resume to continue it or choose another --run-dir")
        keras.utils.set_random_seed(config.seed)
        self._load_data()

        if resume and self.has_checkpoint():
            state = self._load_state()
            self._finish_best(state)
            model = keras.models.load_model(self.run_dir / LAST_CHECKPOINT, compile=True)
        else:
            state = RunState()
            model = build_model(config.model, config.init, self.input_size, compile_model=False)
            _set_phase_trainability(model, config, self.phases[0])
            self._compile(model, self.phases[0].learning_rate)

        sample_weights = self.sample_weights
        epoch_variable = keras.Variable(state.epochs_done, dtype="int64", trainable=False, name="epoch")
        pipeline = make_pipeline(self.train_x, self.train_y, batch_size=config.batch_size, training=True,
                                 seed=config.seed, sample_weights=sample_weights, recipe=config.recipe,
                                 mixup_alpha=config.mixup, epoch=epoch_variable)
        total_epochs = sum(p.epochs for p in self.phases)
        while not state.finished:
            phase = self.phases[state.phase_index]
            if state.epoch_in_phase < phase.epochs and not (
                    state.epoch_in_phase > 0 and state.epochs_since_best >= config.patience):
                callbacks = self._callbacks(state, phase, total_epochs, epoch_variable)
                model.fit(pipeline, epochs=phase.epochs, initial_epoch=state.epoch_in_phase,
                          callbacks=callbacks, verbose=self.verbose)
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
            self._compile(model, next_phase.learning_rate)
            self._save_checkpoint(model, state)

        if state.swa_count and state.swa_val_auc is None:
            self._finish_swa(model, state)
        model.load_weights(self.run_dir / BEST_WEIGHTS)
        return model, state, self.data_summary

    def _finish_swa(self, model: Any, state: RunState) -> None:
        """Stochastic weight averaging (Izmailov et al. 2018): the averaged weights, with
        BatchNorm's statistics re-estimated on the training slices, replace the best epoch's
        when they do at least as well on val."""
        from ctscan.training.callbacks import selection_auc

        with np.load(self.run_dir / SWA_WEIGHTS) as arrays:
            averaged = [arrays[f"w{i}"] for i in range(len(arrays.files))]
        model.set_weights(averaged)
        originals = self.train_x[:, 0] if self.train_x.ndim == 5 else self.train_x
        for _ in range(2):  # BatchNorm momentum 0.9: two passes settle the moving statistics
            for start in range(0, len(originals), 32):
                model(originals[start:start + 32].astype(np.float32), training=True)
        val_x, val_y = self.val_data
        # The epochs' own rule (the worst val source's AUC): compared with the pooled AUC, the
        # average once won on a pooled 0.75 against a best epoch's worst source 0.67.
        auc, _ = selection_auc(val_y, predict_probabilities(model, val_x), self.val_split.sources)
        state.swa_val_auc = auc
        if auc >= state.best_val_auc:
            model.save_weights(self._partial(SWA_BEST))
            state.selected, state.best_val_auc = "swa", auc
        self._save_state(state)
        self._finish_best(state)
        if self.verbose:
            print(f"SWA of the last {state.swa_count} epochs: val AUC {auc:.4f}; keeping "
                  f"{'the average' if state.selected == 'swa' else f'epoch {state.best_epoch}'}", flush=True)

    def _end_epoch(self, state: RunState, phase: Phase, total_epochs: int, model: Any, epoch: int,
                   logs: dict[str, Any], seconds: float) -> None:
        """After every epoch: the run state, `last.keras`, the history plot and the progress
        report (which may raise TrainingCancelled)."""
        learning_rate = float(np.asarray(model.optimizer.learning_rate))
        val_auc, val_loss = float(logs["val_auc"]), float(logs["val_loss"])
        state.epochs_done += 1
        state.epoch_in_phase = epoch + 1
        state.training_seconds += seconds
        improved = val_auc > state.best_val_auc + 1e-6
        if improved:
            state.best_val_auc, state.best_val_loss = val_auc, val_loss
            state.best_epoch = state.epochs_done
            state.epochs_since_best = 0
            model.save_weights(self._partial(BEST_WEIGHTS))
        else:
            state.epochs_since_best += 1
        entry: dict[str, Any] = {
            "epoch": state.epochs_done, "phase": phase.name, "loss": float(logs["loss"]),
            "val_loss": val_loss, "val_auc": val_auc, "val_accuracy": float(logs["val_accuracy"]),
            "learning_rate": learning_rate, "seconds": seconds,
        }
        per_source = {key.removeprefix(SOURCE_AUC_PREFIX): float(value) for key, value in logs.items()
                      if key.startswith(SOURCE_AUC_PREFIX)}
        if per_source:
            entry["val_sources"] = per_source
        state.history.append(entry)
        self._save_checkpoint(model, state)
        plot_history(state.history, self.run_dir / "history.png")
        if self.verbose:
            print(f"epoch {state.epochs_done}/{total_epochs} [{phase.name}] loss {entry['loss']:.4f} "
                  f"val_loss {val_loss:.4f} val_auc {val_auc:.4f} val_acc {entry['val_accuracy']:.4f} "
                  + "".join(f"{name} {auc:.3f} " for name, auc in per_source.items()) +
                  f"({seconds:.0f}s, best epoch {state.best_epoch})", flush=True)
        if self.on_epoch is not None:
            self.on_epoch(EpochReport(
                phase=phase.name, epoch=state.epochs_done, total_epochs=total_epochs,
                loss=entry["loss"], val_loss=val_loss, val_auc=val_auc,
                val_accuracy=entry["val_accuracy"], learning_rate=learning_rate,
                seconds=seconds, best_epoch=state.best_epoch, best_val_auc=state.best_val_auc))

    def _callbacks(self, state: RunState, phase: Phase, total_epochs: int, epoch_variable: Any) -> list[Any]:
        import keras

        from ctscan.training.callbacks import (
            CancelBetweenBatches,
            EpochHook,
            ResumableEarlyStopping,
            ValidationAUC,
            WeightAverage,
        )

        config = self.config

        def cosine(epoch: int, _: float) -> float:
            return float(phase.learning_rate * 0.5 * (1 + math.cos(math.pi * epoch / phase.epochs)))

        early_stopping = ResumableEarlyStopping(
            monitor="val_auc", mode="max", patience=config.patience, min_delta=1e-6,
            best=state.best_val_auc, wait=state.epochs_since_best)
        callbacks: list[Any] = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if config.ema else []
        return [
            *callbacks,  # first: every callback below sees the EMA weights at the end of an epoch
            keras.callbacks.LearningRateScheduler(cosine),
            ValidationAUC(*self.val_data, sources=self.val_split.sources),
            early_stopping,
            *([WeightAverage(self.run_dir / SWA_WEIGHTS, state, first_epoch=phase.epochs - config.swa_epochs)]
              if config.swa_epochs and state.phase_index == len(self.phases) - 1 else []),
            EpochHook(on_begin=lambda: epoch_variable.assign(state.epochs_done),
                      on_end=functools.partial(self._end_epoch, state, phase, total_epochs)),
            *([CancelBetweenBatches(self.should_stop, cancelled=TrainingCancelled)]
              if self.should_stop is not None else []),
        ]


def build_card(
    *,
    config: TrainConfig,
    trainer: Trainer,
    state: RunState,
    model: Any,
    store_weights: bytes,
) -> dict[str, Any]:
    """Evaluate the weights exactly as stored (float16 round trip) on val: calibration,
    decision threshold (on the calibrated probabilities) and the input gate's threshold;
    when asked, once on test; return the model card."""
    from ctscan.calibration import calibration_metrics, fit_calibration
    from ctscan.decision import choose_band
    from ctscan.gate import feature_extractor, fit_gate

    unpack_weights(model, store_weights)
    val_x, val_y = trainer.val_data
    val_scores = predict_probabilities(model, val_x)
    calibration, comparison = fit_calibration(val_scores, val_y)
    val_probabilities = calibration.apply(val_scores)
    threshold = choose_threshold(val_y, val_probabilities, config.threshold_rule)
    band = choose_band(val_y, val_probabilities, threshold)
    gate = None
    if config.input_gate:
        features = feature_extractor(model)
        originals = trainer.train_x[:, 0] if trainer.train_x.ndim == 5 else trainer.train_x  # without variants
        gate = fit_gate(features(originals.astype(np.float32)), features(val_x.astype(np.float32)))
    card: dict[str, Any] = {
        "architecture": config.model,
        "input_size": trainer.input_size,
        "init": config.init,
        "preprocessing": {"name": config.preprocessing},
        "regime": [asdict(p) for p in trainer.phases],
        "dataset": trainer.data_summary,
        "split": {"train": "train", "model_selection_and_threshold": "val",
                  "report": "test" if config.report_test else None},
        "epochs_run": state.epochs_done,
        "best_epoch": state.best_epoch,
        "weights_selected": state.selected,
        "swa": {"epochs": state.swa_count, "val_auc": state.swa_val_auc} if state.swa_count else None,
        "stopped_early": state.stopped_early,
        "hyperparameters": {k: v for k, v in asdict(config).items()
                            if k not in ("data_dir", "model", "init", "report_test")},
        "threshold": threshold,
        "threshold_rule": config.threshold_rule,
        "calibration": {**calibration.as_dict(), "fitted_on": "val", "comparison": comparison,
                        "before": calibration_metrics(val_y, val_scores),
                        "after": calibration_metrics(val_y, val_probabilities)},
        "uncertainty": {**band, "fitted_on": "val"},
        "gate": gate.to_dict() if gate is not None else None,
        "metrics": {"val": full_report(val_y, val_probabilities, threshold)},
        "selection": {"rule": "worst val source's AUC" if len(config.data_dirs) > 1 else "val AUC",
                      "sources": [s["name"] for s in trainer.data_summary["sources"]]},
        "history": state.history,
        "training_seconds": round(state.training_seconds, 1),
        "git_commit": git_commit(),
        "environment": environment_info(),
        "created_at": datetime.now(UTC).isoformat(),
        "intended_use": DISCLAIMER,
    }
    by_source = split_report(trainer.val_split, val_probabilities, threshold)
    if by_source:
        card["metrics"]["val_sources"] = by_source
    if config.report_test:
        test_samples = [sample for data_dir, name in zip(config.data_dirs, config.names, strict=True)
                        for sample in _subset(CTDataset(data_dir, name=name).split("test"), config.limit_per_class,
                                              config.seed)]
        test = load_split(test_samples, trainer.input_size, preprocessing=config.preprocessing)
        test_probabilities = calibration.apply(predict_probabilities(model, test.images))
        card["metrics"]["test"] = full_report(test.targets, test_probabilities, threshold)
        if by_source:
            card["metrics"]["test_sources"] = split_report(test, test_probabilities, threshold)
    return card
