"""Training jobs: durable records, checkpoints in the store, and running one job.

The job record (`<store>/.jobs/<id>/job.json`) is the source of truth; Redis only carries
the "run job <id>" message and live task state, so losing Redis loses no history. While a
job runs, only its worker writes the record; a cancel request is a separate object
(`.jobs/<id>/cancel`) so the two writers never overwrite each other.

`run_job` is idempotent by job ID: a finished job is left alone, a redelivered one resumes
from the last checkpoint in the store, and the model version it writes is the job ID, so a
crash between saving and recording cannot produce a second model.
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ctscan.datasets import fetch_dataset
from ctscan.errors import CTScanError, StoreError
from ctscan.training import (
    BEST_WEIGHTS,
    LAST_CHECKPOINT,
    STATE_FILE,
    EpochReport,
    TrainConfig,
)
from services.trainer.settings import TrainerSettings
from services.trainer.storage import JOBS_FOLDER, RUNS_FOLDER, Objects, open_objects

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED_STATES = frozenset({"succeeded", "failed", "cancelled"})
RECORD_FILE = "job.json"
CANCEL_FILE = "cancel"
# TrainConfig fields a job may set through `hyperparameters` (the rest come from the job).
HYPERPARAMETERS = tuple(f.name for f in fields(TrainConfig)
                        if f.name not in ("model", "data_dir", "init", "epochs", "report_test"))
CHECKPOINT_FILES = (LAST_CHECKPOINT, BEST_WEIGHTS, STATE_FILE)  # state last: it names the epoch


class JobNotFoundError(CTScanError):
    """No job with this ID in the store."""


def now() -> str:
    return datetime.now(UTC).isoformat()


def new_job_id() -> str:
    """Sortable by creation time; also used as the version of the model the job trains."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(4)


def train_config(record: dict[str, Any], data_dir: str) -> TrainConfig:
    """The job's training configuration; raises a clear CTScanError on bad hyper-parameters."""
    hyperparameters = dict(record.get("hyperparameters") or {})
    unknown = sorted(set(hyperparameters) - set(HYPERPARAMETERS))
    if unknown:
        raise CTScanError(f"unknown hyper-parameter(s) {', '.join(unknown)}; "
                          f"allowed: {', '.join(HYPERPARAMETERS)}")
    try:
        config = TrainConfig(model=record["model"], data_dir=data_dir, init=record["init"],
                             epochs=record["epochs"], **hyperparameters)
    except TypeError as exc:
        raise CTScanError(f"bad job arguments: {exc}") from None
    config.validate()
    return config


class JobRecords:
    """Job records under `<store>/.jobs/`."""

    def __init__(self, objects: Objects) -> None:
        self.objects = objects

    @classmethod
    def from_settings(cls, settings: TrainerSettings) -> JobRecords:
        return cls(open_objects(settings.model_store).child(JOBS_FOLDER))

    def create(self, record: dict[str, Any]) -> None:
        self.objects.put_new(f"{record['id']}/{RECORD_FILE}", _dump(record))

    def save(self, record: dict[str, Any]) -> None:
        record["updated_at"] = now()
        self.objects.put(f"{record['id']}/{RECORD_FILE}", _dump(record))

    def find(self, job_id: str) -> dict[str, Any] | None:
        if not job_id or "/" in job_id or job_id.startswith("."):
            return None
        data = self.objects.get(f"{job_id}/{RECORD_FILE}")
        return dict(json.loads(data)) if data else None

    def get(self, job_id: str) -> dict[str, Any]:
        record = self.find(job_id)
        if record is None:
            raise JobNotFoundError(f"no job {job_id!r} in {self.objects.url}")
        return record

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        """Newest first (IDs sort by creation time)."""
        records = []
        for job_id in sorted(self.objects.names(), reverse=True)[:max(limit, 0)]:
            record = self.find(job_id)
            if record is not None:
                records.append(record)
        return records

    def request_cancel(self, job_id: str) -> None:
        self.objects.put(f"{job_id}/{CANCEL_FILE}", now().encode())

    def cancel_requested(self, job_id: str) -> bool:
        return self.objects.exists(f"{job_id}/{CANCEL_FILE}")


def _dump(record: dict[str, Any]) -> bytes:
    return json.dumps(record, indent=2, sort_keys=True, default=str).encode()


class Checkpoints:
    """A run folder mirrored to `<store>/.runs/<job id>/epoch-NNNN/` after every epoch.

    `latest.json` is written only after an epoch's files are all up, so a crash during an
    upload leaves the previous complete checkpoint in charge.
    """

    def __init__(self, objects: Objects, run_dir: Path) -> None:
        self.objects = objects
        self.run_dir = run_dir

    def save(self, epoch: int) -> None:
        folder = f"epoch-{epoch:04d}"
        for name in CHECKPOINT_FILES:
            self.objects.put(f"{folder}/{name}", (self.run_dir / name).read_bytes())
        self.objects.put("latest.json", json.dumps({"epoch": epoch, "folder": folder}).encode())
        stale = [key for key in self.objects.walk() if key.startswith("epoch-") and not key.startswith(folder + "/")]
        if stale:
            self.objects.delete(stale)

    def restore(self) -> int | None:
        """Replace the local run folder by the last checkpoint; its epoch, or None."""
        shutil.rmtree(self.run_dir, ignore_errors=True)
        latest = self.objects.get("latest.json")
        if latest is None:
            return None
        pointer = json.loads(latest)
        for name in CHECKPOINT_FILES:
            self.objects.download_file(f"{pointer['folder']}/{name}", self.run_dir / name)
        return int(pointer["epoch"])

    def discard(self) -> None:
        keys = list(self.objects.walk())
        if keys:
            self.objects.delete(keys)


def _device() -> str:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return f"GPU ({', '.join(g.name for g in gpus)})" if gpus else "CPU"


def run_job(
    job_id: str,
    *,
    settings: TrainerSettings,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume, or skip) one job and return its final record.

    Failures end in a `failed` record with the reason; if even that record cannot be
    written (store unreachable) the error is raised so the task's result carries it.
    """
    from ctscan.store import open_store

    records = JobRecords.from_settings(settings)
    record = records.get(job_id)
    if record["state"] in FINISHED_STATES:
        return record  # redelivered after it finished: nothing to do
    if records.cancel_requested(job_id):
        return _finish(records, record, "cancelled", error="cancelled before it started")

    store = open_store(settings.model_store)
    run_dir = Path(settings.work_dir) / "runs" / job_id
    checkpoints = Checkpoints(open_objects(settings.model_store).child(f"{RUNS_FOLDER}/{job_id}"), run_dir)
    try:
        if job_id in store.list_versions(record["model"]):
            # Saved before a crash, not yet recorded: finish without training again.
            card = store.card(record["model"], job_id)
        else:
            card = _train(record, records=records, store=store, checkpoints=checkpoints,
                          settings=settings, on_progress=on_progress)
        gate = promotion_gate(store, record["model"], job_id, card, settings.promotion_metric)
        promoted = _maybe_promote(store, record["model"], job_id, card, settings.promotion_metric)
    except _Cancelled:
        return _finish(records, record, "cancelled", error="cancelled by an admin")
    except Exception as exc:  # every failure must end in a record a person can read
        _finish(records, record, "failed", error=_describe(exc))
        raise
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    record.update(result_version=job_id, promoted=promoted, promotion=gate,
                  metrics={k: card["metrics"]["val"].get(k) for k in ("auc", "accuracy", "f1", "threshold")})
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


def _finish(records: JobRecords, record: dict[str, Any], state: str, *, error: str | None = None) -> dict[str, Any]:
    record.update(state=state, finished_at=now(), error=error)
    try:
        records.save(record)
    except StoreError as exc:
        raise StoreError(f"job {record['id']} {state}" + (f" ({error})" if error else "")
                         + f", and its record could not be written: {exc}") from None
    return record


def _train(
    record: dict[str, Any],
    *,
    records: JobRecords,
    store: Any,
    checkpoints: Checkpoints,
    settings: TrainerSettings,
    on_progress: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    from ctscan.store import pack_weights
    from ctscan.training import Trainer, TrainingCancelled, build_card

    job_id = record["id"]
    resumed_from = checkpoints.restore()
    record.update(state="running", started_at=record.get("started_at") or now(),
                  attempts=int(record.get("attempts", 0)) + 1, worker=socket.gethostname(),
                  device=_device(), resumed_from_epoch=resumed_from)
    # Epochs after the last checkpoint will run again; drop their stale progress lines.
    record["progress"] = [p for p in record.get("progress", []) if p["epoch"] <= (resumed_from or 0)]
    records.save(record)

    data_dir = fetch_dataset(settings.datasets_url, record["dataset"], record["dataset_version"],
                             cache_dir=Path(settings.work_dir) / "datasets")
    config = train_config(record, str(data_dir))

    def on_epoch(report: EpochReport) -> None:
        checkpoints.save(report.epoch)  # before the record: progress never runs ahead of it
        record["progress"].append({
            "epoch": report.epoch, "total_epochs": report.total_epochs, "loss": report.loss,
            "val_loss": report.val_loss, "val_auc": report.val_auc,
            "val_accuracy": report.val_accuracy, "seconds": round(report.seconds, 2),
        })
        records.save(record)
        if on_progress is not None:
            on_progress({"job_id": job_id, "progress": record["progress"][-1]})
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
    card["job"] = {"id": job_id, "dataset": record["dataset"], "dataset_version": record["dataset_version"],
                   "resumed_from_epoch": resumed_from, "wall_seconds": round(time.monotonic() - started, 1)}
    store.save(record["model"], weights=weights, card=card, version=job_id)
    return dict(store.card(record["model"], job_id))


def promotion_gate(store: Any, name: str, version: str, card: dict[str, Any], metric: str) -> dict[str, Any]:
    """The numbers the promotion gate compares (val `metric` of this run and of the production
    version before it), kept in the job record so the console can say why a run was not promoted."""
    production = store.production(name)
    if production == version:  # redelivered after it was promoted: nothing was compared this time
        production = None
    production_value = None
    if production is not None:
        try:
            production_value = store.card(name, production)["metrics"]["val"][metric]
        except (KeyError, TypeError, CTScanError):
            production_value = None
    return {"metric": metric, "split": "val", "candidate": ((card.get("metrics") or {}).get("val") or {}).get(metric),
            "production_version": production, "production": production_value}


def _maybe_promote(store: Any, name: str, version: str, card: dict[str, Any], metric: str) -> bool:
    from ctscan.training import should_promote

    if store.production(name) == version:
        return True
    if not should_promote(store, name, card, metric=metric):
        return False
    store.promote(name, version, reason=f"trained by job {version}: val {metric} beats production")
    return True
