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
from ctscan.store import ModelStore, open_store

MODEL_NAMES = ("inceptionv3", "densenet121", "mobilenetv2")
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
               hyperparameters: dict[str, Any], admin_token: str) -> dict[str, Any]: ...

    def list_jobs(self, limit: int = 50) -> list[dict[str, Any]]: ...

    def get(self, job_id: str) -> dict[str, Any]: ...

    def cancel(self, job_id: str, *, admin_token: str) -> dict[str, Any]: ...


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


def job_summary(job: dict[str, Any]) -> dict[str, Any]:
    """A job record plus what the page shows: last epoch and the share of epochs done."""
    progress = list(job.get("progress") or [])
    last = progress[-1] if progress else None
    total = int((last or {}).get("total_epochs") or job.get("epochs") or 0)
    done = int((last or {}).get("epoch") or 0)
    if job.get("state") == "succeeded" and total:
        done = total
    return {**job, "last_epoch": last, "epochs_done": done, "epochs_total": total,
            "active": job.get("state") in ACTIVE_STATES}


def model_overview(store: ModelStore) -> list[dict[str, Any]]:
    """Each model's versions (newest first) with their val metrics and the production marker."""
    overview = []
    for name in store.list_models():
        record = store.production_record(name)
        production = record.get("version")
        versions = []
        for version in reversed(store.list_versions(name)):
            try:
                card = store.card(name, version)
            except CTScanError:
                card = {}
            val = (card.get("metrics") or {}).get("val") or {}
            versions.append({
                "version": version,
                "production": version == production,
                "metrics": {key: val.get(key) for key in METRIC_KEYS},
                "threshold": card.get("threshold"),
                "init": card.get("init"),
                "input_size": card.get("input_size"),
                "epochs_run": card.get("epochs_run"),
                "created_at": card.get("created_at"),
            })
        overview.append({"name": name, "production": production, "versions": versions,
                         "can_roll_back": bool(record.get("history"))})
    return overview
