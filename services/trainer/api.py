"""Python API of the trainer for the CLI and the web console: submit, list, show, cancel.

Records come from the store (durable); the Celery result backend is consulted only to
notice a job whose worker failed without being able to write its record (store outage).

The caller's admin token is its credential: a job is signed with it, and the workers run
only jobs signed with their own token. The token is checked first against the store's
verifier (`ctscan.access.admin_credential`): refused at once, fail-closed, without one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ctscan.access.admin_credential import AdminCredentialError, AdminVerifier
from ctscan.data.versions import open_dataset
from ctscan.errors import CTScanError, DataError
from ctscan.models import get_spec, parse_init
from ctscan.settings import TrainerSettings, get_trainer_settings
from ctscan.storage.job_records import FINISHED_STATES, JobNotFoundError, JobRecords, new_job_id, now, sign
from ctscan.storage.records import DatasetManifest, DatasetRef, JobRecord
from ctscan.training.hyperparameters import HyperParameterError, checked_hyperparameters, estimated_data_bytes
from services.trainer.jobs import train_config
from services.trainer.liveness import lease_holder
from services.trainer.queueing import send_job
from services.trainer.reaper import Reaper, broker_redis, close_attempt, orphan

__all__ = ["AdminAuthError", "JobNotFoundError", "JobsClient"]

log = logging.getLogger(__name__)


class AdminAuthError(CTScanError):
    """Missing or wrong admin credential (CTSCAN_ADMIN_TOKEN)."""


def _train_and_val_images(counts: dict[str, dict[str, int]]) -> int:
    return sum(sum(per_label.values()) for split, per_label in counts.items() if split in ("train", "val"))


class JobsClient:
    def __init__(self, settings: TrainerSettings, *, records: JobRecords | None = None) -> None:
        self.settings = settings
        self.records = records or JobRecords.for_store(settings.store.model_store)

    @classmethod
    def from_settings(cls, settings: TrainerSettings | None = None) -> JobsClient:
        return cls(settings or get_trainer_settings())

    # --- admin operations ------------------------------------------------------------------
    def _check_admin(self, admin_token: str | None) -> str:
        if not admin_token:
            raise AdminAuthError("CTSCAN_ADMIN_TOKEN is not configured (or is a placeholder); "
                                 "queueing and cancelling jobs are disabled")
        try:  # fail-closed: no verifier, an unreadable one or another token's is a refusal
            return AdminVerifier(self.records.objects).require(admin_token)
        except AdminCredentialError as exc:
            raise AdminAuthError(str(exc)) from None

    def submit(self, *, model: str, dataset: str, dataset_version: str, init: str, epochs: int,
               hyperparameters: dict[str, Any], admin_token: str | None,
               extra_datasets: Sequence[tuple[str, str]] = ()) -> JobRecord:
        """Check the arguments, write a signed `queued` record, then queue the job by its ID."""
        token = self._check_admin(admin_token)
        spec = get_spec(model)
        if init not in ("imagenet", "none"):
            parse_init(init)  # a weights file must exist (workers share this path)
        # The one check of the hyper-parameters (the worker repeats it on the record).
        given = checked_hyperparameters(model=model, epochs=epochs, values=hyperparameters,
                                        max_input_size=self.settings.max_input_size)
        sources = [(dataset, dataset_version), *extra_datasets]
        if len({name for name, _ in sources}) != len(sources):
            raise DataError("each dataset of a job must be another one (a dataset named twice)")
        manifests = [self._check_dataset(name, version) for name, version in sources]
        self._check_memory(given, default_size=spec.input_size,
                           images=sum(_train_and_val_images(m.counts) for m in manifests))
        record = JobRecord(id=new_job_id(), state="queued", model=model, dataset=dataset,
                           dataset_version=dataset_version, init=init, epochs=epochs,
                           hyperparameters=given, created_at=now(),
                           extra_datasets=[DatasetRef(dataset=n, dataset_version=v) for n, v in extra_datasets])
        train_config(record, data_dir="(checked by the worker)")
        record.signature = sign(record, token)
        self.records.create(record)  # durable before it is queued: the worker reads it
        try:
            send_job(record.id, queue=self.settings.queue)
        except Exception as exc:  # the broker client raises many kinds
            record.state = "failed"
            record.finished_at = now()
            record.error = f"could not queue the job: broker {self._broker()} unreachable ({exc})"
            self.records.save(record)
            raise CTScanError(record.error) from None
        return record

    def cancel(self, job_id: str, *, admin_token: str | None) -> JobRecord:
        """Ask a job to stop; a queued job is cancelled at once, a running one within an epoch."""
        self._check_admin(admin_token)
        record = self.records.get(job_id)
        if record.state in FINISHED_STATES:
            return record
        self.records.request_cancel(job_id)
        if record.state == "queued":
            close_attempt(record, "cancelled")
            record.state = "cancelled"
            record.finished_at = now()
            record.error = "cancelled before it started" if record.attempts == 0 else \
                "cancelled by an admin while it waited to be retried"
            self.records.save(record)
        elif record.state == "running" and self._orphaned(job_id):
            # No worker holds it: nobody would see the request, so the job ends here.
            orphan(record, cause="no worker held the job when it was cancelled", settings=self.settings,
                   cancelled=True)
            self.records.save(record)
        record.cancel_requested = True
        return record

    def requeue(self, job_ids: list[str] | None = None, *, admin_token: str | None) -> dict[str, str]:
        """Send again every `queued` job (or those named) whose message is no longer in the
        broker and whose retry time has come; returns what was done, by job ID."""
        self._check_admin(admin_token)
        reaper = Reaper(self.settings, records=self.records)
        if reaper.client is None:
            raise CTScanError("the broker is not Redis: queued messages cannot be inspected, nothing was requeued")
        return reaper.sweep(running=False, queued=True, job_ids=job_ids)

    def _orphaned(self, job_id: str) -> bool:
        """True when the broker's Redis answers and no worker holds the job's lease."""
        try:
            client = broker_redis(self.settings)
            return client is not None and lease_holder(client, job_id) is None
        except Exception as exc:  # Redis down: cannot tell, the request stands
            log.debug("cannot read the lease of job %s: %s", job_id, exc)
            return False

    # --- reading -----------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord:
        return self._reconcile(self.records.get(job_id))

    def list_jobs(self, limit: int = 50) -> list[JobRecord]:
        return [self._reconcile(record) for record in self.records.recent(limit)]

    def production_versions(self, models: set[str]) -> dict[str, str | None]:
        """The current production pointer of each model (None where it cannot be read)."""
        from ctscan.storage.store import open_store

        store = open_store(self.settings.store.model_store)
        pointers: dict[str, str | None] = {}
        for model in sorted(models):
            try:
                pointers[model] = store.production(model)
            except CTScanError:
                pointers[model] = None
        return pointers

    # --- helpers -----------------------------------------------------------------------------
    def _check_dataset(self, dataset: str, version: str) -> DatasetManifest:
        if not dataset or not version or "/" in dataset + version or (dataset + version).startswith("."):
            raise DataError("dataset and dataset_version must be plain names (see `ctscan data upload`)")
        datasets_url = self.settings.store.datasets_url
        manifest = open_dataset(datasets_url, dataset).manifest(version)
        if manifest is None:
            raise DataError(f"dataset {dataset} has no published version {version} in "
                            f"{datasets_url}; publish it with `ctscan data upload`")
        return manifest

    def _check_memory(self, hyperparameters: dict[str, Any], *, default_size: int, images: int) -> None:
        """The decoded data set must fit in half the per-job memory limit (the network,
        its gradients and TensorFlow take the rest)."""
        size = int(hyperparameters.get("input_size") or default_size)
        variants = int(hyperparameters.get("source_variants") or 1) if hyperparameters.get("augment", True) else 1
        needed = estimated_data_bytes(images=images, input_size=size, variants=variants)
        budget = self.settings.job_memory_mb * 1024 * 1024 // 2
        if needed > budget:
            raise HyperParameterError(
                f"hyper-parameter input_size: {images} images at {size} px need about {needed / 2**20:.0f} MB "
                f"decoded, more than half the per-job memory limit ({self.settings.job_memory_mb} MB, "
                "CTSCAN_TRAINER_JOB_MEMORY_MB); choose a smaller input size")

    def _broker(self) -> str:
        url = self.settings.celery_broker_url
        return url.split("@")[-1]  # never echo a password in the URL

    def _reconcile(self, record: JobRecord) -> JobRecord:
        """A job its worker could not record as failed (store outage) shows as failed, with
        the worker's reason from the result backend; the record is repaired when possible."""
        if record.state in FINISHED_STATES or self.settings.celery_result_backend is None:
            return record
        try:
            from services.trainer.celery_app import app

            result = app.AsyncResult(record.id)
            state, outcome = result.state, result.result
        except Exception as exc:  # result backend down: the record stands
            log.debug("result backend unavailable for job %s: %s", record.id, exc)
            return record
        if state != "FAILURE":
            return record
        record.state = "failed"
        record.finished_at = record.finished_at or now()
        record.error = str(outcome) or "the worker failed without a reason"
        try:
            self.records.save(record)
        except CTScanError:
            pass
        return record
