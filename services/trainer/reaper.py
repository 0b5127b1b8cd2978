"""The reaper and the requeue sweep: what makes a job end, whatever happens to its worker or
to Redis.

Every worker runs `run_forever` in a side process (`ctscan serve worker` starts it), each
`reaper_interval_s`:

- a `running` job whose lease has been missing for longer than two heartbeats (the lease
  itself expires `lease_ttl_s` after the last renewal) lost its worker: the attempt is closed
  with that cause, the fence moves on, and the job is requeued (`queued`, `retry_at` after a
  backoff that doubles per attempt) to resume from its last checkpoint; a job that used up
  `max_attempts` ends `failed` with every attempt's cause; a job with a cancel request ends
  `cancelled`.
- a `queued` job whose message is no longer in the broker (Redis restarted without
  persistence, a requeue above) and whose backoff has passed is sent again. `ctscan jobs
  requeue` runs this part once.

- checkpoints of cancelled, failed and abandoned jobs are deleted once
  `checkpoint_retention_s` has passed since the job ended (`collect_checkpoints`).

Two reapers never act on the same job at once (a short Redis claim per job and action).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from ctscan.settings import TrainerSettings, get_trainer_settings
from ctscan.storage.job_records import FINISHED_STATES, JobRecords, collect_checkpoints, now
from ctscan.storage.records import JobRecord
from services.trainer.liveness import claim, lease_holder
from services.trainer.queueing import message_waiting, redis_client, send_job

log = logging.getLogger(__name__)

SCAN_LIMIT = 500  # newest jobs looked at per sweep


def broker_redis(settings: TrainerSettings) -> Any:
    """The Redis client the leases live in, or None when the broker is not Redis."""
    if not settings.celery_broker_url.startswith(("redis://", "rediss://")):
        return None
    return redis_client(settings.celery_broker_url)


def close_attempt(record: JobRecord, outcome: str) -> None:
    if record.attempt_log and record.attempt_log[-1].ended_at is None:
        record.attempt_log[-1].ended_at = now()
        record.attempt_log[-1].outcome = outcome


def attempts_summary(record: JobRecord) -> str:
    return "; ".join(f"attempt {a.attempt} ({a.worker or 'unknown worker'}): {a.outcome or 'no outcome'}"
                     for a in record.attempt_log)


def backoff_s(settings: TrainerSettings, attempts: int) -> float:
    return settings.retry_backoff_s * 2 ** max(attempts - 1, 0)


def orphan(record: JobRecord, *, cause: str, settings: TrainerSettings, cancelled: bool) -> JobRecord:
    """Decide what becomes of a job whose worker is gone (the caller saves the record)."""
    close_attempt(record, cause)
    record.fence += 1  # the lost worker, should it come back, may no longer write
    if cancelled:
        record.state = "cancelled"
        record.finished_at = now()
        record.error = f"cancelled by an admin; its worker was lost ({cause})"
    elif record.attempts >= settings.max_attempts:
        record.state = "failed"
        record.finished_at = now()
        record.error = (f"gave up after {record.attempts} attempt(s) (CTSCAN_TRAINER_MAX_ATTEMPTS="
                        f"{settings.max_attempts}): {attempts_summary(record)}")
    else:
        record.state = "queued"
        record.retry_at = (datetime.now(UTC) + timedelta(seconds=backoff_s(settings, record.attempts))).isoformat()
        record.error = None
    return record


class Reaper:
    def __init__(self, settings: TrainerSettings, *, records: JobRecords | None = None, client: Any = None) -> None:
        self.settings = settings
        self.records = records or JobRecords.for_store(settings.store.model_store)
        self.client = client if client is not None else broker_redis(settings)
        self.missing_since: dict[str, float] = {}

    def sweep(self, *, running: bool = True, queued: bool = True, job_ids: list[str] | None = None) -> dict[str, str]:
        """One pass; returns what was done, by job ID."""
        if self.client is None:
            return {}
        done: dict[str, str] = {}
        records = ([self.records.get(job_id) for job_id in job_ids] if job_ids
                   else self.records.recent(SCAN_LIMIT))
        seen = set()
        for record in records:
            if record.state in FINISHED_STATES:
                continue
            seen.add(record.id)
            try:
                if running and record.state == "running":
                    action = self._check_running(record)
                elif queued and record.state == "queued":
                    action = self._check_queued(record)
                else:
                    action = None
            except Exception as exc:  # one job's trouble must not stop the sweep
                log.warning("reaper: job %s: %s", record.id, exc)
                continue
            if action:
                done[record.id] = action
                log.warning("reaper: job %s %s", record.id, action)
        for job_id in set(self.missing_since) - seen:
            self.missing_since.pop(job_id, None)
        return done

    def _check_running(self, record: JobRecord) -> str | None:
        if lease_holder(self.client, record.id) is not None:
            self.missing_since.pop(record.id, None)
            return None
        first = self.missing_since.setdefault(record.id, time.monotonic())
        # Redis restarted without persistence drops every lease; live workers take theirs
        # again at their next heartbeat, so only a lease missing for longer means a dead worker.
        if time.monotonic() - first < 2 * self.settings.heartbeat_interval_s + 1:
            return None
        if not claim(self.client, record.id, "orphan", self.settings.reaper_interval_s * 3):
            return None
        fresh = self.records.get(record.id)
        if fresh.state != "running" or fresh.fence != record.fence or lease_holder(self.client, record.id):
            return None
        self.missing_since.pop(record.id, None)
        cause = f"worker {fresh.worker or 'unknown'} stopped heartbeating (lease expired)"
        orphan(fresh, cause=cause, settings=self.settings, cancelled=self.records.cancel_requested(fresh.id))
        self.records.save(fresh)
        return {"queued": f"requeued after its worker was lost, retry at {fresh.retry_at}",
                "failed": "failed: " + (fresh.error or ""), "cancelled": "cancelled"}[fresh.state]

    def _check_queued(self, record: JobRecord) -> str | None:
        if record.retry_at and record.retry_at > now():
            return None
        if lease_holder(self.client, record.id) is not None:
            return None  # a worker is starting it
        if message_waiting(self.client, queue=self.settings.queue, job_id=record.id) is not False:
            return None
        if not claim(self.client, record.id, "send", max(self.settings.reaper_interval_s * 2, 5)):
            return None
        send_job(record.id, queue=self.settings.queue)
        return "sent again (its message was no longer in the broker)"


def run_forever(parent_pid: int | None = None) -> None:
    """The reaper loop of one worker; ends with the worker (its parent)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s reaper %(levelname)s %(message)s")
    settings = get_trainer_settings()
    reaper = Reaper(settings)
    if reaper.client is None:
        log.info("reaper: the broker is not Redis; no leases to watch")
        return
    log.info("reaper: every %.0fs, lease TTL %.0fs, at most %d attempts", settings.reaper_interval_s,
             settings.lease_ttl_s, settings.max_attempts)
    while parent_pid is None or os.getppid() == parent_pid:
        try:
            reaper.sweep()
            for job_id, reason in collect_checkpoints(settings.store.model_store,
                                                      retention_s=settings.checkpoint_retention_s).items():
                log.info("reaper: deleted the checkpoints of job %s (%s)", job_id, reason)
        except Exception as exc:  # Redis or the store down: try again next round
            log.warning("reaper: sweep failed: %s", exc)
        time.sleep(settings.reaper_interval_s)


if __name__ == "__main__":
    run_forever(int(sys.argv[1]) if len(sys.argv) > 1 else None)
