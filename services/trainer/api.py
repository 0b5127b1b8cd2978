"""Python API of the trainer for the CLI and the web console: submit, list, show, cancel.

Records come from the store (durable); the Celery result backend is consulted only to
notice a job whose worker failed without being able to write its record (store outage).
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from ctscan.datasets import MANIFEST_FILE
from ctscan.errors import CTScanError, DataError
from ctscan.models import get_spec, parse_init
from services.trainer.jobs import (
    FINISHED_STATES,
    JobNotFoundError,
    JobRecords,
    new_job_id,
    now,
    train_config,
)
from services.trainer.settings import TrainerSettings, get_trainer_settings

__all__ = ["AdminAuthError", "JobNotFoundError", "JobsClient"]

log = logging.getLogger(__name__)


class AdminAuthError(CTScanError):
    """Missing or wrong admin credential (CTSCAN_ADMIN_TOKEN)."""


class JobsClient:
    def __init__(self, settings: TrainerSettings, *, records: JobRecords | None = None) -> None:
        self.settings = settings
        self.records = records or JobRecords.from_settings(settings)

    @classmethod
    def from_settings(cls, settings: TrainerSettings | None = None) -> JobsClient:
        return cls(settings or get_trainer_settings())

    # --- admin operations ------------------------------------------------------------------
    def _check_admin(self, admin_token: str) -> None:
        expected = self.settings.admin_token_value()
        if expected is None:
            raise AdminAuthError("CTSCAN_ADMIN_TOKEN is not configured (or is a placeholder); "
                                 "queueing and cancelling jobs are disabled")
        if not admin_token or not hmac.compare_digest(admin_token.encode(), expected.encode()):
            raise AdminAuthError("admin token rejected")

    def submit(self, *, model: str, dataset: str, dataset_version: str, init: str, epochs: int,
               hyperparameters: dict[str, Any], admin_token: str) -> dict[str, Any]:
        """Check the arguments, write a `queued` record, then queue the job by its ID."""
        self._check_admin(admin_token)
        get_spec(model)
        if init not in ("imagenet", "none"):
            parse_init(init)  # a weights file must exist (workers share this path)
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
            raise CTScanError(f"epochs must be a positive integer, got {epochs!r}")
        if not isinstance(hyperparameters, dict):
            raise CTScanError("hyperparameters must be a mapping of name to value")
        self._check_dataset(dataset, dataset_version)
        job_id = new_job_id()
        record: dict[str, Any] = {
            "id": job_id, "state": "queued", "model": model, "dataset": dataset,
            "dataset_version": dataset_version, "init": init, "epochs": epochs,
            "hyperparameters": dict(hyperparameters), "progress": [], "created_at": now(),
            "started_at": None, "finished_at": None, "error": None, "result_version": None,
            "promoted": None,
        }
        train_config(record, data_dir="(checked by the worker)")  # bad hyper-parameters fail here
        self.records.create(record)  # durable before it is queued: the worker reads it
        try:
            from services.trainer.celery_app import TASK_RUN_JOB, app

            app.send_task(TASK_RUN_JOB, args=[job_id], task_id=job_id, queue=self.settings.queue)
        except Exception as exc:  # the broker client raises many kinds
            record.update(state="failed", finished_at=now(),
                          error=f"could not queue the job: broker {self._broker()} unreachable ({exc})")
            self.records.save(record)
            raise CTScanError(record["error"]) from None
        return record

    def cancel(self, job_id: str, *, admin_token: str) -> dict[str, Any]:
        """Ask a job to stop; a queued job is cancelled at once, a running one within an epoch."""
        self._check_admin(admin_token)
        record = self.records.get(job_id)
        if record["state"] in FINISHED_STATES:
            return record
        self.records.request_cancel(job_id)
        if record["state"] == "queued":
            record.update(state="cancelled", finished_at=now(), error="cancelled before it started")
            self.records.save(record)
        record["cancel_requested"] = True
        return record

    # --- reading -----------------------------------------------------------------------------
    def get(self, job_id: str) -> dict[str, Any]:
        return self._reconcile(self.records.get(job_id))

    def list_jobs(self, limit: int = 50) -> list[dict[str, Any]]:
        return [self._reconcile(record) for record in self.records.recent(limit)]

    # --- helpers -----------------------------------------------------------------------------
    def _check_dataset(self, dataset: str, version: str) -> None:
        from services.trainer.storage import open_objects

        if not dataset or not version or "/" in dataset + version or (dataset + version).startswith("."):
            raise DataError("dataset and dataset_version must be plain names (see `ctscan data upload`)")
        folder = open_objects(self.settings.datasets_url).child(f"{dataset}/{version}")
        if not folder.exists(MANIFEST_FILE):
            raise DataError(f"dataset {dataset} has no published version {version} in "
                            f"{self.settings.datasets_url}; publish it with `ctscan data upload`")

    def _broker(self) -> str:
        url = self.settings.celery_broker_url
        return url.split("@")[-1]  # never echo a password in the URL

    def _reconcile(self, record: dict[str, Any]) -> dict[str, Any]:
        """A job its worker could not record as failed (store outage) shows as failed, with
        the worker's reason from the result backend; the record is repaired when possible."""
        if record["state"] in FINISHED_STATES or self.settings.celery_result_backend is None:
            return record
        try:
            from services.trainer.celery_app import app

            result = app.AsyncResult(record["id"])
            state, outcome = result.state, result.result
        except Exception as exc:  # result backend down: the record stands
            log.debug("result backend unavailable for job %s: %s", record["id"], exc)
            return record
        if state != "FAILURE":
            return record
        record.update(state="failed", finished_at=record.get("finished_at") or now(),
                      error=str(outcome) or "the worker failed without a reason")
        try:
            self.records.save(record)
        except CTScanError:
            pass
        return record
