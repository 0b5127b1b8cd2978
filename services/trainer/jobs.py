"""Running one training job: the worker's side of a job record.

The job record (`ctscan.job_records`, in the store) is the source of truth; Redis only
carries the "run job <id>" message and live task state, so losing Redis loses no history.

`run_job` is idempotent by job ID: a finished job is left alone, a redelivered one resumes
from the last checkpoint in the store, and the model version it writes is the job ID, so a
crash between saving and recording cannot produce a second model. It runs only jobs signed
with this worker's admin token. Saving and promotion go through `ctscan.publishing`, the
same path as `ctscan train`.
"""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from ctscan.datasets import fetch_dataset
from ctscan.errors import CTScanError, StoreError
from ctscan.hyperparameters import checked_hyperparameters
from ctscan.job_records import FINISHED_STATES, Checkpoints, JobRecords, now, signature_matches
from ctscan.records import JobProgress, JobRecord, ModelCard
from ctscan.settings import TrainerSettings
from ctscan.training import BEST_WEIGHTS, LAST_CHECKPOINT, STATE_FILE, EpochReport, TrainConfig

# TrainConfig fields a job may set through `hyperparameters` (the rest come from the job).
HYPERPARAMETERS = tuple(f.name for f in fields(TrainConfig)
                        if f.name not in ("model", "data_dir", "init", "epochs", "report_test"))
CHECKPOINT_FILES = (LAST_CHECKPOINT, BEST_WEIGHTS, STATE_FILE)  # state last: it names the epoch


def train_config(record: JobRecord, data_dir: str) -> TrainConfig:
    """The job's training configuration; raises a clear CTScanError on bad hyper-parameters."""
    hyperparameters = checked_hyperparameters(model=record.model, epochs=record.epochs,
                                              values=dict(record.hyperparameters))
    try:
        config = TrainConfig(model=record.model, data_dir=data_dir, init=record.init,
                             epochs=record.epochs, **hyperparameters)
    except TypeError as exc:
        raise CTScanError(f"bad job arguments: {exc}") from None
    config.validate()
    return config


def _device() -> str:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return f"GPU ({', '.join(g.name for g in gpus)})" if gpus else "CPU"


def run_job(
    job_id: str,
    *,
    settings: TrainerSettings,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> JobRecord:
    """Run (or resume, or skip) one job and return its final record.

    Failures end in a `failed` record with the reason; if even that record cannot be
    written (store unreachable) the error is raised so the task's result carries it.
    """
    from ctscan.publishing import promote_with_reason
    from ctscan.store import open_store

    store_url = settings.store.model_store
    records = JobRecords.for_store(store_url)
    record = records.get(job_id)
    if record.state in FINISHED_STATES:
        return record  # redelivered after it finished: nothing to do
    if records.cancel_requested(job_id):
        return _finish(records, record, "cancelled", error="cancelled before it started")
    token = settings.admin.token()
    if token is None or not signature_matches(record, token):
        return _finish(records, record, "failed", error="admin token rejected: the job was not signed with "
                       "this worker's CTSCAN_ADMIN_TOKEN; nothing was trained")

    store = open_store(store_url)
    run_dir = Path(settings.work_dir) / "runs" / job_id
    checkpoints = Checkpoints.for_job(store_url, job_id, run_dir, CHECKPOINT_FILES)
    try:
        if job_id in store.list_versions(record.model):
            # Saved before a crash, not yet recorded: finish without training again.
            card = store.card(record.model, job_id)
        else:
            card = _train(record, records=records, store=store, checkpoints=checkpoints,
                          settings=settings, on_progress=on_progress)
        decision = promote_with_reason(store, record.model, job_id, card, metric=settings.promotion_metric,
                                       source=f"trained by job {job_id}", floors=settings.promotion)
    except _Cancelled:
        return _finish(records, record, "cancelled", error="cancelled by an admin")
    except Exception as exc:  # every failure must end in a record a person can read
        _finish(records, record, "failed", error=_describe(exc))
        raise
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    val = card.metrics.get("val") or {}
    record.result_version = job_id
    record.promoted = decision.promote
    record.metrics = {k: val.get(k) for k in ("auc", "accuracy", "f1", "threshold")}
    record.promotion = decision.as_record()  # why it was (not) promoted, with the numbers
    finished = _finish(records, record, "succeeded")
    try:
        checkpoints.discard()  # the model version now holds the result
    except StoreError:
        pass
    return finished


class _Cancelled(Exception):
    pass


def _describe(exc: BaseException) -> str:
    from celery.exceptions import SoftTimeLimitExceeded

    if isinstance(exc, SoftTimeLimitExceeded):
        return "the job exceeded its time limit (CTSCAN_TRAINER_SOFT_TIME_LIMIT) and was stopped"
    if isinstance(exc, CTScanError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _finish(records: JobRecords, record: JobRecord, state: str, *, error: str | None = None) -> JobRecord:
    record.state = state  # type: ignore[assignment]  # one of FINISHED_STATES
    record.finished_at = now()
    record.error = error
    try:
        records.save(record)
    except StoreError as exc:
        raise StoreError(f"job {record.id} {state}" + (f" ({error})" if error else "")
                         + f", and its record could not be written: {exc}") from None
    return record


def _train(
    record: JobRecord,
    *,
    records: JobRecords,
    store: Any,
    checkpoints: Checkpoints,
    settings: TrainerSettings,
    on_progress: Callable[[dict[str, Any]], None] | None,
) -> ModelCard:
    from ctscan.publishing import pick_verification_images, publish_version
    from ctscan.store import pack_weights
    from ctscan.training import Trainer, TrainingCancelled, build_card

    job_id = record.id
    resumed_from = checkpoints.restore()
    record.state = "running"
    record.started_at = record.started_at or now()
    record.attempts += 1
    record.worker = socket.gethostname()
    record.device = _device()
    record.resumed_from_epoch = resumed_from
    # Epochs after the last checkpoint will run again; drop their stale progress lines.
    record.progress = [p for p in record.progress if p.epoch <= (resumed_from or 0)]
    records.save(record)

    data_dir = fetch_dataset(settings.store.datasets_url, record.dataset, record.dataset_version,
                             cache_dir=Path(settings.work_dir) / "datasets")
    config = train_config(record, str(data_dir))

    def on_epoch(report: EpochReport) -> None:
        checkpoints.save(report.epoch)  # before the record: progress never runs ahead of it
        record.progress.append(JobProgress(
            epoch=report.epoch, total_epochs=report.total_epochs, loss=report.loss, val_loss=report.val_loss,
            val_auc=report.val_auc, val_accuracy=report.val_accuracy, seconds=round(report.seconds, 2)))
        records.save(record)
        if on_progress is not None:
            on_progress({"job_id": job_id, "progress": record.progress[-1].model_dump()})
        if records.cancel_requested(job_id):
            raise TrainingCancelled(f"job {job_id} cancelled")

    if records.cancel_requested(job_id):
        raise _Cancelled
    started = time.monotonic()
    trainer = Trainer(config, checkpoints.run_dir, on_epoch=on_epoch, verbose=0)
    try:
        model, state, _ = trainer.run(resume=resumed_from is not None)
    except TrainingCancelled:
        raise _Cancelled from None
    weights = pack_weights(model)
    card = build_card(config=config, trainer=trainer, state=state, model=model, store_weights=weights)
    card["job"] = {"id": job_id, "dataset": record.dataset, "dataset_version": record.dataset_version,
                   "resumed_from_epoch": resumed_from, "wall_seconds": round(time.monotonic() - started, 1)}
    val_x, val_y = trainer.val_data
    _, saved = publish_version(
        store, name=record.model, model=model, weights=weights, card=card,
        verification_images=pick_verification_images(val_x, val_y),
        verified_on=f"val split of dataset {record.dataset}@{record.dataset_version}", version=job_id)
    return saved
