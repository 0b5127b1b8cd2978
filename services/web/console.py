"""What the admins' console does, as plain functions: the routes only translate HTTP.

Training jobs go through the trainer's `JobsClient` (services/trainer/api.py); model versions,
promotion and rollback go through the core model store.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

from pydantic import ValidationError
from redis.exceptions import RedisError

from ctscan.errors import CTScanError, StoreError
from ctscan.storage.records import EnsembleRecord, JobRecord, ModelCard
from ctscan.storage.store import ModelStore, open_store

ACTIVE_STATES = ("queued", "running")
METRIC_KEYS = ("accuracy", "precision", "recall", "f1", "auc")


# What the trainer's queue (Redis) and the model store raise when they are unreachable (the S3
# backend turns botocore's errors into StoreError, so no service needs to know it).
QUEUE_ERRORS: tuple[type[Exception], ...] = (RedisError, OSError)
STORE_ERRORS: tuple[type[Exception], ...] = (StoreError, OSError)


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
    from ctscan.data.versions import list_dataset_versions

    try:
        return sorted(list_dataset_versions(datasets_url, dataset))
    except CTScanError:
        return []
    except STORE_ERRORS:
        return []


# What the trainer and the core say in command-line words, said in the words of the queue form.
FORM_WORDS: tuple[tuple[str, str], ...] = (
    (r"use --init none \(random initialisation\) or --init PATH with a local backbone weights file",
     'choose "None (from scratch)" under Initial weights'),
    (r"--init none\b", 'Initial weights "None (from scratch)"'),
    (r"--init imagenet\b", 'Initial weights "ImageNet weights"'),
    (r"--init\b", "Initial weights"),
    (r"--input-size\b|\binput_size\b", "Input size"),
    (r"--epochs\b|^epochs\b", "Epochs"),
    (r"--batch-size\b|\bbatch_size\b", "Batch size"),
    (r"--learning-rate\b|\blearning_rate\b", "Learning rate"),
    (r"--dataset-version\b|\bdataset_version\b", "Dataset version"),
    (r"; publish it with `ctscan data upload`",
     "; choose one of the published versions (`make up` and the compose seed job publish the local data set)"),
    (r"\s*\(see `ctscan data upload`\)", ""),
)
METRIC_LABELS = {"auc": "AUC", "f1": "F1"}  # the others read as they are named


def form_words(message: str | None) -> str | None:
    """An error from the trainer or the core as the console's form names things (the
    console has fields, not command-line flags)."""
    if not message:
        return message
    for pattern, replacement in FORM_WORDS:
        message = re.sub(pattern, replacement, message)
    return message


def input_size_problem(*, model: str, input_size: int | None) -> str | None:
    """Why this input size cannot work for this model, in the form's words; None if it can."""
    from ctscan.errors import ModelError
    from ctscan.models import get_spec  # no TensorFlow: the specs are plain data

    try:
        spec = get_spec(model)
    except ModelError as exc:
        return str(exc)
    if input_size is not None and input_size < spec.min_input_size:
        return f"Input size: {model} needs at least {spec.min_input_size} pixels, got {input_size}."
    return None


PROMOTE_HINT = ("It stays a candidate; the model table below can promote it after showing what that "
                "changes for the clinicians.")


def promotion_consequences(store: ModelStore, name: str, version: str) -> list[str]:
    """What promoting `version` of `name` changes for the clinicians, in words the console
    shows before it asks for confirmation. Raises StoreError for an unknown version."""
    from ctscan.publishing import below_floors
    from ctscan.settings import PromotionSettings

    card = store.card(name, version)
    production = store.production(name)
    val = card.metrics.get("val") or {}
    words = []
    now = f"version {production}" if production else "no version"
    auc = val.get("auc")
    words.append(f"Clinicians who choose {name} get answers from version {version} instead of {now}"
                 + (f" (val AUC {auc:.3f})." if auc is not None else "."))
    failure = below_floors(card, PromotionSettings())  # the gate's own rule, worst val source
    if failure:
        words.append(f"It is below the promotion floors ({failure}): the gate would not serve it.")
    record = store.ensemble_record()
    if record is not None and name in record.members and record.members[name] != version:
        words.append(f"The ensemble (the page's default) keeps serving {name} {record.members[name]}, the version "
                     "its threshold was calibrated for on val, so clinicians who choose it get the same answers as "
                     f"before. It uses {version} only once it is recalibrated: run ctscan models calibrate-ensemble.")
    elif record is not None and (left_out := (record.excluded or {}).get(name)):
        words.append(f"The ensemble (the page's default) does not combine {name} ({left_out}); it stays as it "
                     "is until it is recalibrated.")
    return words


def ensemble_behind(record: EnsembleRecord | None, production: dict[str, str]) -> dict[str, dict[str, str]]:
    """The ensemble's members whose production version has moved on: name -> the version the
    ensemble keeps serving (pinned) and the production version it does not use yet."""
    if record is None:
        return {}
    return {name: {"pinned": pinned, "production": production[name]} for name, pinned in record.members.items()
            if production.get(name) and production[name] != pinned}


def promotion_note(job: dict[str, Any]) -> str | None:
    """Why a finished job's model is not serving, with the numbers the gate compared."""
    if job.get("state") != "succeeded" or job.get("promoted") is not False:
        return None
    gate = job.get("promotion") or {}
    if gate.get("reason"):  # the gate's own words (floors, validation sets, the comparison)
        return f"Not promoted: {gate['reason']}. {PROMOTE_HINT}"
    metric = str(gate.get("metric") or "auc")
    label = METRIC_LABELS.get(metric, metric)
    candidate = gate.get("candidate", (job.get("metrics") or {}).get(metric))
    production = gate.get("production")
    if candidate is None or production is None:
        return f"Not promoted: it did not beat the production model on val {label}. {PROMOTE_HINT}"
    return (f"Not promoted: val {label} {candidate:.3f} does not beat production "
            f"{gate.get('production_version') or ''} (val {label} {production:.3f}). {PROMOTE_HINT}")


def job_summary(record: JobRecord | dict[str, Any]) -> dict[str, Any]:
    """A job record plus what the page shows: last epoch, the share of epochs done, the
    finished run's metrics (those of the model version it saved, as the model table shows
    them), why it was not promoted, and its error in the form's words."""
    job = record.model_dump() if isinstance(record, JobRecord) else dict(record)
    progress = list(job.get("progress") or [])
    last = progress[-1] if progress else None
    total = int((last or {}).get("total_epochs") or job.get("epochs") or 0)
    done = int((last or {}).get("epoch") or 0)
    if job.get("state") == "succeeded" and total:
        done = total
    result_metrics = job.get("metrics") if job.get("state") == "succeeded" else None
    return {**job, "last_epoch": last, "epochs_done": done, "epochs_total": total,
            "active": job.get("state") in ACTIVE_STATES, "result_metrics": result_metrics or None,
            "promotion_note": promotion_note(job), "error_text": form_words(job.get("error"))}


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
