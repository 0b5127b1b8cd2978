"""Training jobs in the store: their records, checkpoints and signatures.

    <model store>/.jobs/<job id>/job.json     `ctscan.storage.records.JobRecord`, the source of truth
    <model store>/.jobs/<job id>/cancel       a cancel request (written by anyone but the worker)
    <model store>/.jobs/.admin-verifier.json  salted scrypt hash of the workers' admin token
    <model store>/.runs/<job id>/...          the run's last checkpoint (`Checkpoints`)

Dot-names are hidden from model listings. While a job runs only its worker writes the record;
a cancel request is a separate object so the two writers never overwrite each other.

The admin token is checked where the work is done: a submitter signs the job's request with
the token it holds (`sign`), and a worker runs only jobs signed with its own token
(`signature_matches`). Submitters are checked first against the store's verifier of the token
(`ctscan.access.admin_credential`, fail-closed), so they learn at once, not when the job fails.
That check is the access layer's, above this one: it keeps its verifier in `JOBS_FOLDER`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import shutil
from datetime import UTC, datetime
from pathlib import Path

from ctscan.errors import CTScanError
from ctscan.storage.objects import ObjectStore, open_objects
from ctscan.storage.records import JobRecord
from ctscan.storage.store import parse_record

JOBS_FOLDER = ".jobs"
RUNS_FOLDER = ".runs"
RECORD_FILE = "job.json"
CANCEL_FILE = "cancel"
FINISHED_STATES = frozenset({"succeeded", "failed", "cancelled"})


class JobNotFoundError(CTScanError):
    """No job with this ID in the store."""


def now() -> str:
    return datetime.now(UTC).isoformat()


def new_job_id() -> str:
    """Sortable by creation time; also used as the version of the model the job trains."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(4)


# --- the admin token ------------------------------------------------------------------------------
def sign(record: JobRecord, token: str) -> str:
    """HMAC-SHA256 of what the job asks for, keyed with the submitter's admin token."""
    message = json.dumps(record.request_fields(), sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def signature_matches(record: JobRecord, token: str) -> bool:
    return bool(record.signature) and hmac.compare_digest(record.signature or "", sign(record, token))


class JobRecords:
    """Job records under `<model store>/.jobs/`."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects

    @classmethod
    def for_store(cls, model_store_url: str) -> JobRecords:
        return cls(open_objects(model_store_url).child(JOBS_FOLDER))

    def create(self, record: JobRecord) -> None:
        record.updated_at = now()
        self.objects.put_new(f"{record.id}/{RECORD_FILE}", record.to_json())

    def save(self, record: JobRecord) -> None:
        record.updated_at = now()
        self.objects.put(f"{record.id}/{RECORD_FILE}", record.to_json())

    def find(self, job_id: str) -> JobRecord | None:
        if not job_id or "/" in job_id or job_id.startswith("."):
            return None
        data = self.objects.get(f"{job_id}/{RECORD_FILE}")
        return parse_record(JobRecord, data, f"{self.objects.url}/{job_id}/{RECORD_FILE}") if data else None

    def get(self, job_id: str) -> JobRecord:
        record = self.find(job_id)
        if record is None:
            raise JobNotFoundError(f"no job {job_id!r} in {self.objects.url}")
        return record

    def recent(self, limit: int = 50) -> list[JobRecord]:
        """Newest first (IDs sort by creation time)."""
        records = []
        job_ids = [name for name in self.objects.names() if not name.startswith(".")]
        for job_id in sorted(job_ids, reverse=True)[:max(limit, 0)]:
            record = self.find(job_id)
            if record is not None:
                records.append(record)
        return records

    def request_cancel(self, job_id: str) -> None:
        self.objects.put(f"{job_id}/{CANCEL_FILE}", now().encode())

    def cancel_requested(self, job_id: str) -> bool:
        return self.objects.exists(f"{job_id}/{CANCEL_FILE}")


class Checkpoints:
    """A run folder mirrored to `<store>/.runs/<job id>/epoch-NNNN/` after every epoch.

    `latest.json` is written only after an epoch's files are all up, so a crash during an
    upload leaves the previous complete checkpoint in charge.
    """

    def __init__(self, objects: ObjectStore, run_dir: Path, files: tuple[str, ...]) -> None:
        self.objects = objects
        self.run_dir = run_dir
        self.files = files  # in upload order; the last names the epoch

    @classmethod
    def for_job(cls, model_store_url: str, job_id: str, run_dir: Path, files: tuple[str, ...]) -> Checkpoints:
        return cls(open_objects(model_store_url).child(f"{RUNS_FOLDER}/{job_id}"), run_dir, files)

    def save(self, epoch: int) -> None:
        folder = f"epoch-{epoch:04d}"
        for name in self.files:
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
        for name in self.files:
            self.objects.download_file(f"{pointer['folder']}/{name}", self.run_dir / name)
        return int(pointer["epoch"])

    def discard(self) -> None:
        keys = list(self.objects.walk())
        if keys:
            self.objects.delete(keys)


def collect_checkpoints(model_store_url: str, *, retention_s: float, records: JobRecords | None = None,
                        now_s: float | None = None) -> dict[str, str]:
    """Delete the checkpoints (`<store>/.runs/<id>/`) of jobs that will never resume: cancelled
    or failed ones that ended more than `retention_s` ago, and abandoned ones (no job record
    at all). Succeeded jobs discard theirs when they finish; queued and running jobs keep them.
    Returns the reason for each job whose checkpoints went."""
    runs = open_objects(model_store_url).child(RUNS_FOLDER)
    records = records or JobRecords.for_store(model_store_url)
    now_s = datetime.now(UTC).timestamp() if now_s is None else now_s
    collected: dict[str, str] = {}
    for job_id in runs.names():
        record = records.find(job_id)
        if record is None:
            reason = "abandoned: no job record"
        elif record.state in ("cancelled", "failed", "succeeded") and record.finished_at:
            age = now_s - datetime.fromisoformat(record.finished_at).timestamp()
            if age < retention_s:
                continue
            reason = f"{record.state} {age:.0f}s ago"
        else:
            continue
        folder = runs.child(job_id)
        keys = list(folder.walk())
        if not keys:
            continue  # collected before (a local store keeps the empty folder)
        folder.delete(keys)
        collected[job_id] = reason
    return collected
