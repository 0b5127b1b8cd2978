"""What the admins' console does, as plain functions: the routes only translate HTTP.

Training jobs go through the trainer's `JobsClient` (services/trainer/api.py); model versions,
promotion and rollback go through the core model store.
"""

from __future__ import annotations

from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]
from pydantic import ValidationError
from redis.exceptions import RedisError

from ctscan.errors import CTScanError
from ctscan.records import JobRecord, ModelCard
from ctscan.store import ModelStore, open_store

INIT_CHOICES = ("imagenet", "none")
ACTIVE_STATES = ("queued", "running")
METRIC_KEYS = ("accuracy", "precision", "recall", "f1", "auc")


# What the trainer's queue (Redis) and an S3 model store raise when they are unreachable.
QUEUE_ERRORS: tuple[type[Exception], ...] = (RedisError, OSError)
STORE_ERRORS: tuple[type[Exception], ...] = (BotoCoreError, ClientError, OSError)


class ConsoleUnavailableError(CTScanError):
    """The trainer (or its queue) cannot be used right now."""


class JobsClientLike(Protocol):
    """The part of the trainer's JobsClient (contract 2) the console uses."""

    def submit(self, *, model: str, dataset: str, dataset_version: str, init: str, epochs: int,
               hyperparameters: dict[str, Any], admin_token: str) -> JobRecord: ...

    def list_jobs(self, limit: int = 50) -> list[JobRecord]: ...

    def get(self, job_id: str) -> JobRecord: ...

    def cancel(self, job_id: str, *, admin_token: str) -> JobRecord: ...


def default_jobs_client() -> JobsClientLike:
    """The trainer's client built from its own settings (imported late: optional service)."""
    try:
        from services.trainer.api import JobsClient
    except ImportError:
        raise ConsoleUnavailableError("The training service is not installed here.") from None
    try:
        client: JobsClientLike = JobsClient.from_settings()
    except (ValidationError, RedisError, OSError) as exc:
        # Its settings may be incomplete or its queue down; say so without a traceback.
        raise ConsoleUnavailableError(f"The training service is not available: {type(exc).__name__}") from None
    return client


def default_store(url: str) -> ModelStore:
    return open_store(url)


def published_dataset_versions(*, datasets_url: str, dataset: str) -> list[str]:
    """Published versions of `dataset`, newest last; empty when none or unreadable."""
    from ctscan.datasets import list_dataset_versions

    try:
        return sorted(list_dataset_versions(datasets_url, dataset))
    except CTScanError:
        return []
    except STORE_ERRORS:
        return []


def job_summary(job: JobRecord) -> dict[str, Any]:
    """A job record plus what the page shows: last epoch and the share of epochs done."""
    last = job.progress[-1] if job.progress else None
    total = (last.total_epochs if last else 0) or job.epochs or 0
    done = last.epoch if last else 0
    if job.state == "succeeded" and total:
        done = total
    return {**job.model_dump(), "last_epoch": last.model_dump() if last else None, "epochs_done": done,
            "epochs_total": total, "active": job.state in ACTIVE_STATES}


def model_overview(store: ModelStore) -> list[dict[str, Any]]:
    """Each model's versions (newest first) with their val metrics and the production marker."""
    overview = []
    for name in store.list_models():
        record = store.production_record(name)
        production = record.version
        versions = []
        for version in reversed(store.list_versions(name)):
            card: ModelCard | None
            try:
                card = store.card(name, version)
            except CTScanError:
                card = None
            val = (card.metrics.get("val") if card else None) or {}
            versions.append({
                "version": version,
                "production": version == production,
                "metrics": {key: val.get(key) for key in METRIC_KEYS},
                "threshold": card.threshold if card else None,
                "init": card.init if card else None,
                "input_size": card.input_size if card else None,
                "epochs_run": card.epochs_run if card else None,
                "created_at": card.created_at if card else None,
            })
        overview.append({"name": name, "production": production, "versions": versions,
                         "can_roll_back": bool(record.history)})
    return overview
