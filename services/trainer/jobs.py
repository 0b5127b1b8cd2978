"""Running one training job: the worker's side of a job record.

The job record (`ctscan.storage.job_records`, in the store) is the source of truth; Redis only
carries the "run job <id>" message and live task state, so losing Redis loses no history.

`run_job` is idempotent by job ID: a finished job is left alone, a job whose lease another
worker holds is left to it (services/trainer/liveness.py), a redelivered one resumes
from the last checkpoint in the store (also after an S3 outage shorter than
CTSCAN_TRAINER_S3_OUTAGE_BUDGET), and the model version it writes is the job ID, so a
crash between saving and recording cannot produce a second model. It runs only jobs signed
with this worker's admin token. Saving and promotion go through `ctscan.publishing`, the
same path as `ctscan train`.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from ctscan.data.versions import fetch_dataset
from ctscan.errors import CTScanError, StoreError
from ctscan.settings import TrainerSettings
from ctscan.storage.job_records import FINISHED_STATES, Checkpoints, JobRecords, now, signature_matches
from ctscan.storage.records import JobAttempt, JobProgress, JobRecord, ModelCard
from ctscan.training.hyperparameters import checked_hyperparameters
from ctscan.training.runs import BEST_WEIGHTS, LAST_CHECKPOINT, STATE_FILE, EpochReport, TrainConfig
from services.trainer.liveness import Heartbeat, JobLease, LeaseLost, lease_holder
from services.trainer.reaper import attempts_summary, close_attempt

log = logging.getLogger(__name__)

# TrainConfig fields a job may set through `hyperparameters` (the rest come from the job).
HYPERPARAMETERS = tuple(f.name for f in fields(TrainConfig)
                        if f.name not in ("model", "data_dir", "extra_data_dirs", "source_names", "init", "epochs",
                                           "report_test"))
CHECKPOINT_FILES = (LAST_CHECKPOINT, BEST_WEIGHTS, STATE_FILE)  # state last: it names the epoch


def train_config(record: JobRecord, data_dir: str, extra_data_dirs: list[str] | None = None) -> TrainConfig:
    # The sources are named by their published dataset names (the fetched folders by version).
    """The job's training configuration; raises a clear CTScanError on bad hyper-parameters."""
    hyperparameters = checked_hyperparameters(model=record.model, epochs=record.epochs,
                                              values=dict(record.hyperparameters))
    try:
        config = TrainConfig(model=record.model, data_dir=data_dir, init=record.init,
                             epochs=record.epochs, extra_data_dirs=list(extra_data_dirs or []),
                             source_names=[record.dataset, *(ref.dataset for ref in record.extra_datasets)]
                             if extra_data_dirs else [], **hyperparameters)
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
    """Run (or resume, or skip) one job and return its record.

    Only the holder of the job's lease trains it: a delivery that finds the lease taken
    returns at once. Failures end in a `failed` record with the reason; if even that record
    cannot be written (store unreachable) the error is raised so the task's result carries it.
    """
    from services.trainer.reaper import broker_redis

    store_url = settings.store.model_store
    records = JobRecords.for_store(store_url)
    record = records.get(job_id)
    if record.state in FINISHED_STATES:
        return record  # redelivered after it finished: nothing to do
    if records.cancel_requested(job_id):
        close_attempt(record, "cancelled")
        return _finish(records, record, "cancelled", error="cancelled before it started" if record.attempts == 0
                       else "cancelled by an admin")
    token = settings.admin.token()
    if token is None or not signature_matches(record, token):
        return _finish(records, record, "failed", error="admin token rejected: the job was not signed with "
                       "this worker's CTSCAN_ADMIN_TOKEN; nothing was trained")

    holder = f"{socket.gethostname()}:{os.getpid()}"
    lease = JobLease(broker_redis(settings), job_id, holder, settings.lease_ttl_s)
    if not lease.acquire():
        log.warning("job %s: its lease is held by %s; this delivery does nothing", job_id,
                    lease_holder(lease.client, job_id))
        return record
    heartbeat: Heartbeat | None = None
    try:
        record = records.get(job_id)  # as it is now that we hold the lease
        if record.state in FINISHED_STATES:
            return record
        close_attempt(record, "its worker was lost")  # an attempt nobody closed (no reaper ran)
        if record.attempts >= settings.max_attempts:
            return _finish(records, record, "failed", error=(
                f"gave up after {record.attempts} attempt(s) (CTSCAN_TRAINER_MAX_ATTEMPTS={settings.max_attempts}): "
                f"{attempts_summary(record)}"))
        record.fence += 1
        record.attempts += 1
        record.attempt_log.append(JobAttempt(attempt=record.attempts, worker=holder, started_at=now()))
        record.state = "running"
        record.started_at = record.started_at or now()
        record.worker = holder
        record.retry_at = None
        records.save(record)
        guard = _Guard(records, job_id, record.fence)
        heartbeat = Heartbeat(lease, interval_s=settings.heartbeat_interval_s,
                              memory_limit_mb=settings.job_memory_mb,
                              on_memory_exceeded=lambda resident: _memory_exceeded(
                                  records, job_id, record.fence, lease, resident, settings.job_memory_mb))
        guard.heartbeat = heartbeat
        heartbeat.start()
        return _run_leased(record, records=records, guard=guard, settings=settings, on_progress=on_progress)
    except LeaseLost as exc:
        log.error("job %s: %s; this worker stops and writes nothing more", job_id, exc)
        return records.get(job_id)
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        lease.release()


class _Guard:
    """Fencing: the record must still carry this attempt's fence, and the lease be ours."""

    def __init__(self, records: JobRecords, job_id: str, fence: int) -> None:
        self.records = records
        self.job_id = job_id
        self.fence = fence
        self.heartbeat: Heartbeat | None = None

    def check(self) -> None:
        if self.heartbeat is not None and self.heartbeat.lost.is_set():
            raise LeaseLost("another worker holds the job's lease")
        current = self.records.get(self.job_id)
        if current.fence != self.fence:
            raise LeaseLost(f"the job was handed on (fence {current.fence}, this worker's {self.fence})")


def _memory_exceeded(records: JobRecords, job_id: str, fence: int, lease: JobLease, resident: float,
                     limit_mb: int) -> None:
    """Called by the heartbeat thread: the job is failed with the reason, then the process
    ends at once (the training thread may be inside one huge allocation)."""
    reason = (f"the job used {resident:.0f} MB of memory, more than its limit of {limit_mb} MB "
              "(CTSCAN_TRAINER_JOB_MEMORY_MB); it was stopped")
    try:
        record = records.get(job_id)
        if record.fence == fence and record.state not in FINISHED_STATES:
            close_attempt(record, reason)
            _finish(records, record, "failed", error=reason)
    except Exception as exc:  # the process ends whatever happens
        log.error("job %s: %s, and its record could not be written: %s", job_id, reason, exc)
    finally:
        lease.release()
        log.error("job %s: %s", job_id, reason)
        os._exit(70)


def _run_leased(
    record: JobRecord,
    *,
    records: JobRecords,
    guard: _Guard,
    settings: TrainerSettings,
    on_progress: Callable[[dict[str, Any]], None] | None,
) -> JobRecord:
    from ctscan.publishing import promote_with_reason
    from ctscan.storage.store import open_store

    job_id = record.id
    store_url = settings.store.model_store
    store = open_store(store_url)
    # One folder per attempt: a worker that lost the job cleans up only its own.
    run_dir = Path(settings.work_dir) / "runs" / f"{job_id}.{guard.fence}"
    checkpoints = Checkpoints.for_job(store_url, job_id, run_dir, CHECKPOINT_FILES)
    outage_started: float | None = None
    try:
        while True:
            try:
                if job_id in store.list_versions(record.model):
                    # Saved before a crash, not yet recorded: finish without training again.
                    card = store.card(record.model, job_id)
                else:
                    card = _train(record, records=records, store=store, checkpoints=checkpoints,
                                  settings=settings, on_progress=on_progress, guard=guard)
                guard.check()
                decision = promote_with_reason(store, record.model, job_id, card,
                                               metric=settings.promotion_metric,
                                               source=f"trained by job {job_id}", floors=settings.promotion)
                break
            except StoreError as exc:
                if not is_outage(exc):
                    raise
                outage_started = outage_started or time.monotonic()
                if not _wait_for_store(records, job_id, deadline=outage_started + settings.s3_outage_budget_s):
                    raise
                # S3 is back: resume from the last complete checkpoint (the next _train restores it).
                log.warning("job %s: the store was unreachable for %.0fs; resuming from the last checkpoint",
                            job_id, time.monotonic() - outage_started)
                record.outages.append(f"{now()}: {exc}")
                outage_started = None
    except _Cancelled:
        close_attempt(record, "cancelled")
        return _finish(records, record, "cancelled", error="cancelled by an admin")
    except LeaseLost:
        raise
    except Exception as exc:  # every failure must end in a record a person can read
        close_attempt(record, _describe(exc))
        _finish(records, record, "failed", error=_describe(exc), guard=guard)
        raise
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    val = card.metrics.get("val") or {}
    record.result_version = job_id
    record.promoted = decision.promote
    record.metrics = {k: val.get(k) for k in ("auc", "accuracy", "f1", "threshold")}
    record.promotion = decision.as_record()  # why it was (not) promoted, with the numbers
    close_attempt(record, "succeeded")
    finished = _finish(records, record, "succeeded", guard=guard)
    try:
        checkpoints.discard()  # the model version now holds the result
    except StoreError:
        pass
    return finished


OUTAGE_MARKERS = ("is unreachable", "ServiceUnavailable", "SlowDown", "InternalError", " 503", " 500")


def is_outage(exc: StoreError) -> bool:
    """An error that waiting can cure (the endpoint down, the server overloaded), as opposed
    to a refusal (credentials, a missing bucket, a checksum)."""
    return any(marker in str(exc) for marker in OUTAGE_MARKERS)


def _wait_for_store(records: JobRecords, job_id: str, *, deadline: float, poll_s: float = 3.0) -> bool:
    """Poll the store until it answers or the deadline passes; whether it came back."""
    while time.monotonic() < deadline:
        try:
            records.get(job_id)
            return True
        except StoreError:
            time.sleep(poll_s)
    return False


class _Cancelled(Exception):
    pass


def _describe(exc: BaseException) -> str:
    from celery.exceptions import SoftTimeLimitExceeded

    if isinstance(exc, SoftTimeLimitExceeded):
        return "the job exceeded its time limit (CTSCAN_TRAINER_SOFT_TIME_LIMIT) and was stopped"
    if isinstance(exc, CTScanError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _finish(records: JobRecords, record: JobRecord, state: str, *, error: str | None = None,
            guard: _Guard | None = None) -> JobRecord:
    record.state = state  # type: ignore[assignment]  # one of FINISHED_STATES
    record.finished_at = now()
    record.error = error
    try:
        if guard is not None:
            guard.check()
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
    guard: _Guard,
) -> ModelCard:
    from ctscan.models import pack_weights
    from ctscan.publishing import pick_verification_images, publish_version
    from ctscan.training.runs import Trainer, TrainingCancelled, build_card

    job_id = record.id
    resumed_from = checkpoints.restore()
    record.device = _device()
    record.resumed_from_epoch = resumed_from
    # Epochs after the last checkpoint will run again; drop their stale progress lines.
    record.progress = [p for p in record.progress if p.epoch <= (resumed_from or 0)]
    guard.check()
    records.save(record)

    data_dir, *extra_dirs = (
        str(fetch_dataset(settings.store.datasets_url, name, version, cache_dir=Path(settings.work_dir) / "datasets"))
        for name, version in [(record.dataset, record.dataset_version),
                              *((ref.dataset, ref.dataset_version) for ref in record.extra_datasets)])
    config = train_config(record, data_dir, extra_dirs)

    def on_epoch(report: EpochReport) -> None:
        guard.check()  # a worker that lost the job writes nothing more
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
    # A cancel is also asked for between batches: a long epoch no longer delays it.
    trainer = Trainer(config, checkpoints.run_dir, on_epoch=on_epoch,
                      should_stop=lambda: records.cancel_requested(job_id), verbose=0)
    try:
        model, state, _ = trainer.run(resume=resumed_from is not None)
    except TrainingCancelled:
        raise _Cancelled from None
    weights = pack_weights(model)
    card = build_card(config=config, trainer=trainer, state=state, model=model, store_weights=weights)
    card["job"] = {"id": job_id, "dataset": record.dataset, "dataset_version": record.dataset_version,
                   "extra_datasets": [ref.model_dump() for ref in record.extra_datasets],
                   "resumed_from_epoch": resumed_from, "wall_seconds": round(time.monotonic() - started, 1)}
    val_x, val_y = trainer.val_data
    guard.check()
    _, saved = publish_version(
        store, name=record.model, model=model, weights=weights, card=card,
        verification_images=pick_verification_images(val_x, val_y),
        verified_on=f"val split of dataset {record.dataset}@{record.dataset_version}", version=job_id)
    return saved
