"""Liveness of running jobs: a lease per job in Redis, renewed by a heartbeat, and a fencing
token in the job record.

- `JobLease`: `ctscan:trainer:lease:<job id>` holds the worker's name with a TTL. Only the
  holder trains the job; a second delivery of the same job (a redelivery after the broker's
  visibility timeout, a requeue) finds the lease taken and does nothing.
- `Heartbeat`: a thread in the job's process renews the lease every heartbeat interval and
  enforces the per-job memory limit. When a renewal finds another holder, the job stops
  before its next write.
- Fencing: each start of a job increments `JobRecord.fence`; a worker writes checkpoints,
  records and model versions only while the record still carries its own fence, so a worker
  that was presumed dead (paused, cut off) and comes back cannot overwrite its successor.

Without Redis (the `filesystem://` broker of `make up`) there is no lease: one worker, no reaper.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

LEASE_PREFIX = "ctscan:trainer:lease:"
CLAIM_PREFIX = "ctscan:trainer:claim:"

# Renew when we hold it; take it again when it is gone (Redis restarted without persistence:
# nobody else can hold it then); refuse when someone else holds it.
_RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not holder then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 2 end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaseLost(Exception):
    """Another worker holds this job now (or the record's fence moved on): stop, write nothing."""


def lease_holder(client: Any, job_id: str) -> str | None:
    """Who holds the job's lease (None: nobody; the job's worker is gone or never started)."""
    value = client.get(LEASE_PREFIX + job_id)
    return value.decode() if value is not None else None


def claim(client: Any, job_id: str, what: str, seconds: float) -> bool:
    """A short exclusive right to act on a job (one reaper requeues it, not two)."""
    return bool(client.set(f"{CLAIM_PREFIX}{what}:{job_id}", b"1", nx=True, px=int(seconds * 1000)))


class JobLease:
    def __init__(self, client: Any, job_id: str, holder: str, ttl_s: float) -> None:
        self.client = client
        self.key = LEASE_PREFIX + job_id
        self.holder = holder
        self.ttl_ms = max(int(ttl_s * 1000), 1)

    def acquire(self) -> bool:
        if self.client is None:
            return True
        return bool(self.client.set(self.key, self.holder.encode(), nx=True, px=self.ttl_ms))

    def renew(self) -> bool:
        if self.client is None:
            return True
        return int(self.client.eval(_RENEW, 1, self.key, self.holder, self.ttl_ms)) != 0

    def release(self) -> None:
        if self.client is None:
            return
        try:
            self.client.eval(_RELEASE, 1, self.key, self.holder)
        except Exception as exc:  # Redis down: the lease expires by itself
            log.warning("could not release lease %s: %s", self.key, exc)


def resident_mb() -> float:
    """This process's resident memory (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class Heartbeat(threading.Thread):
    """Renews the lease every `interval_s` and checks the memory limit; `lost` is set when
    another worker took the lease. `on_memory_exceeded(resident_mb)` is called (once) when
    the process holds more than `memory_limit_mb`: it must end the process."""

    def __init__(self, lease: JobLease, *, interval_s: float, memory_limit_mb: float,
                 on_memory_exceeded: Callable[[float], None]) -> None:
        super().__init__(name=f"heartbeat-{lease.key}", daemon=True)
        self.lease = lease
        self.interval_s = interval_s
        self.memory_limit_mb = memory_limit_mb
        self.on_memory_exceeded = on_memory_exceeded
        self.lost = threading.Event()
        self._stop = threading.Event()

    def run(self) -> None:
        renewed = time.monotonic()
        # Memory is checked twice a second (it can grow by gigabytes within a heartbeat).
        while not self._stop.wait(min(self.interval_s, 0.5)):
            resident = resident_mb()
            if resident > self.memory_limit_mb:
                self.on_memory_exceeded(resident)
                return
            if time.monotonic() - renewed < self.interval_s:
                continue
            renewed = time.monotonic()
            try:
                if not self.lease.renew():
                    log.error("lease %s is held by another worker: this one stops", self.lease.key)
                    self.lost.set()
                    return
            except Exception as exc:  # Redis restarting: keep trying, the lease may come back
                log.warning("heartbeat: could not renew %s: %s", self.lease.key, exc)

    def stop(self) -> None:
        self._stop.set()
