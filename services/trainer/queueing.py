"""The broker side of a job: sending its message, and telling whether a message for it
still waits in the queue.

Only the Redis transport can be inspected; with another broker (`filesystem://` for `make
up` without Redis) `message_waiting` answers None, "cannot tell", and the sweep leaves the
job alone.
"""

from __future__ import annotations

import json
import logging
from typing import Any

log = logging.getLogger(__name__)

def send_job(job_id: str, *, queue: str, countdown: float | None = None) -> None:
    """Queue "run job <id>" (the task ID is the job ID, so a resent message is the same task)."""
    from services.trainer.celery_app import TASK_RUN_JOB, app

    app.send_task(TASK_RUN_JOB, args=[job_id], task_id=job_id, queue=queue, countdown=countdown)


def redis_client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=5)


def message_waiting(client: Any, *, queue: str, job_id: str) -> bool | None:
    """Whether a message for `job_id` waits in the queue (None: the broker is not Redis).

    Delivered, unacknowledged messages do not count: the one held by a worker that died
    would come back only after the visibility timeout (hours). A live worker takes the job's
    lease right after delivery, and the sweep leaves leased jobs alone; a message sent twice
    anyway is harmless (the second delivery finds the lease or the finished record)."""
    if client is None:
        return None
    needle = job_id.encode()
    # The queue's list, and the lists kombu uses for priorities (`<queue>\x06\x16<n>`).
    keys = [queue.encode(), *(key for key in client.scan_iter(match=f"{queue}\x06\x16*") if key != queue.encode())]
    for key in keys:
        if client.type(key) != b"list":
            continue
        for raw in client.lrange(key, 0, -1):
            if needle in raw and _task_id(raw) == job_id:
                return True
    return False


def _task_id(raw: bytes) -> str | None:
    try:
        message = json.loads(raw)
    except ValueError:
        return None
    headers = message.get("headers") or {}
    return headers.get("id")
