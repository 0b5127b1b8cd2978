"""Jobs never strand, loop or run twice under faults: real Redis, real `ctscan serve worker`
process groups killed with SIGKILL, moto's S3 server over HTTP behind a proxy we can cut.

Each test that measures a recovery writes it to test-artifacts/faults.json (docs/faults.md
quotes the numbers). The liveness settings are shortened for the tests in conftest.py
(heartbeat 1 s, lease 8 s, reaper every 2 s, backoff 1 s).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(900)

TERMINAL = {"succeeded", "failed", "cancelled"}


def _lease(job_id: str) -> str | None:
    from ctscan.settings import get_trainer_settings
    from services.trainer.liveness import lease_holder
    from services.trainer.reaper import broker_redis

    return lease_holder(broker_redis(get_trainer_settings()), job_id)


def test_a_second_delivery_of_a_running_job_does_not_train_it_again(
        start_worker: Callable[..., Any], tiny_job: Callable[..., dict[str, Any]],
        wait_job: Callable[..., dict[str, Any]], jobs_client: Any, wait_until: Callable[..., Any]) -> None:
    # A visibility timeout shorter than the job: Redis hands the running job to the second
    # worker. When that redelivery comes depends on the transport's restore cycle, so the
    # test also sends the job's message again itself (the same task ID, as a redelivery is),
    # which makes the second delivery certain on a loaded machine.
    from services.trainer.queueing import send_job

    first = start_worker(CTSCAN_TRAINER_VISIBILITY_TIMEOUT="3")
    job = tiny_job(6)
    wait_until(lambda: jobs_client.get(job["id"]).state == "running", timeout=240, what="the job to start")
    # The busy first worker (concurrency 1, prefetch 1, late ack) leaves it for the second.
    send_job(job["id"], queue=os.environ["CTSCAN_TRAINER_QUEUE"])
    second = start_worker(CTSCAN_TRAINER_VISIBILITY_TIMEOUT="3")
    record = wait_job(job["id"], TERMINAL, timeout=400)
    assert record["state"] == "succeeded", (record["error"], first.output())
    assert record["attempts"] == 1 and len(record["attempt_log"]) == 1
    assert [p["epoch"] for p in record["progress"]] == [1, 2, 3, 4, 5, 6]
    wait_until(lambda: "this delivery does nothing" in first.output() + second.output(), timeout=60,
               what="the second delivery to be refused by the lease")


def test_a_job_that_kills_its_worker_ends_failed_after_the_attempt_limit(
        start_worker: Callable[..., Any], tiny_job: Callable[..., dict[str, Any]],
        wait_job: Callable[..., dict[str, Any]], jobs_client: Any, wait_until: Callable[..., Any],
        ctscan_cli: Callable[..., Any], record_fault: Callable[..., None]) -> None:
    worker = start_worker(CTSCAN_TRAINER_MAX_ATTEMPTS="2")
    job = tiny_job(40)
    for attempt in (1, 2):
        running = wait_until(lambda a=attempt: (r := jobs_client.get(job["id"])).state == "running"
                             and r.attempts == a and r, timeout=300, what=f"attempt {attempt}", interval=0.3)
        pid = int(running.worker.rsplit(":", 1)[1])
        os.kill(pid, signal.SIGKILL)  # the job's process dies, as under the kernel's OOM killer
        killed_at = time.monotonic()
    record = wait_job(job["id"], TERMINAL, timeout=120)
    gave_up_after = time.monotonic() - killed_at
    assert record["state"] == "failed", worker.output()
    assert record["attempts"] == 2
    assert record["error"].startswith("gave up after 2 attempt(s) (CTSCAN_TRAINER_MAX_ATTEMPTS=2): attempt 1 (")
    assert record["error"].count("stopped heartbeating (lease expired)") == 2
    assert [a["outcome"] for a in record["attempt_log"]] == [
        f"worker {a['worker']} stopped heartbeating (lease expired)" for a in record["attempt_log"]]
    # It stays failed: the redelivered message finds a finished job.
    time.sleep(5)
    assert jobs_client.get(job["id"]).state == "failed" and jobs_client.get(job["id"]).attempts == 2
    cancel = ctscan_cli("jobs", "cancel", job["id"])
    assert json.loads(cancel.stdout)["error"] == record["error"]
    record_fault("job kills its worker on every attempt", outcome=record["state"],
                 seconds_from_last_kill_to_failed=round(gave_up_after, 1))


def test_the_memory_limit_stops_a_job_once_with_its_reason(
        start_worker: Callable[..., Any], tiny_job: Callable[..., dict[str, Any]],
        wait_job: Callable[..., dict[str, Any]], jobs_client: Any) -> None:
    # 256 MB: TensorFlow alone takes more, so the job breaks the limit as soon as it starts.
    start_worker(CTSCAN_TRAINER_JOB_MEMORY_MB="256")
    job = tiny_job(3)
    record = wait_job(job["id"], TERMINAL, timeout=240)
    assert record["state"] == "failed"
    assert "more than its limit of 256 MB (CTSCAN_TRAINER_JOB_MEMORY_MB); it was stopped" in record["error"]
    time.sleep(8)  # the pool child died; the redelivered message must not start it again
    again = jobs_client.get(job["id"])
    assert again.state == "failed" and again.attempts == 1 and _lease(job["id"]) is None


def test_cancel_ends_an_orphaned_job_at_once(
        start_worker: Callable[..., Any], tiny_job: Callable[..., dict[str, Any]], jobs_client: Any,
        wait_until: Callable[..., Any], ctscan_cli: Callable[..., Any], record_fault: Callable[..., None]) -> None:
    worker = start_worker()
    job = tiny_job(40)
    wait_until(lambda: jobs_client.get(job["id"]).progress, timeout=240, what="the first epoch", interval=0.3)
    worker.kill()  # the whole process group: no reaper is left to notice
    killed_at = time.monotonic()
    wait_until(lambda: _lease(job["id"]) is None, timeout=60, what="the lease to expire")
    lease_expired_after = time.monotonic() - killed_at
    cancel = ctscan_cli("jobs", "cancel", job["id"])
    assert cancel.returncode == 0, cancel.stderr
    record = json.loads(cancel.stdout)
    assert record["state"] == "cancelled"
    assert record["error"] == ("cancelled by an admin; its worker was lost (no worker held the job when it "
                               "was cancelled)")
    assert record["attempt_log"][-1]["outcome"] == "no worker held the job when it was cancelled"
    record_fault("cancel of an orphaned job", outcome="cancelled",
                 seconds_from_kill_until_cancel_ends_it=round(lease_expired_after, 1))


def test_queued_jobs_lost_with_redis_are_sent_again(
        start_worker: Callable[..., Any], tiny_job: Callable[..., dict[str, Any]],
        wait_job: Callable[..., dict[str, Any]], jobs_client: Any, redis_server: Any,
        ctscan_cli: Callable[..., Any], trainer_env: dict[str, str], record_fault: Callable[..., None]) -> None:
    from ctscan.settings import get_trainer_settings
    from services.trainer.queueing import message_waiting
    from services.trainer.reaper import broker_redis

    by_cli, by_sweep = tiny_job(1), tiny_job(1)  # no worker yet: both wait in Redis
    redis_server.stop()  # no persistence: the messages are gone, the records say `queued`
    time.sleep(1)
    redis_server.start()
    queue = trainer_env["CTSCAN_TRAINER_QUEUE"]

    def present(job_id: str) -> bool | None:
        return message_waiting(broker_redis(get_trainer_settings()), queue=queue, job_id=job_id)

    assert present(by_cli["id"]) is False and present(by_sweep["id"]) is False
    requeued = ctscan_cli("jobs", "requeue", by_cli["id"])
    assert requeued.returncode == 0, requeued.stderr
    assert json.loads(requeued.stdout)["requeued"] == {
        by_cli["id"]: "sent again (its message was no longer in the broker)"}
    assert present(by_cli["id"]) is True and present(by_sweep["id"]) is False
    # The worker's own sweep finds the other one.
    started = time.monotonic()
    start_worker()
    for job in (by_cli, by_sweep):
        assert wait_job(job["id"], TERMINAL, timeout=300)["state"] == "succeeded"
    record_fault("queued jobs lost with Redis", outcome="succeeded",
                 seconds_from_worker_start_to_both_succeeded=round(time.monotonic() - started, 1))


def test_a_job_resumes_from_its_checkpoint_after_an_s3_outage(
        s3_proxy: Callable[[], Any], start_worker: Callable[..., Any], tiny_job: Callable[..., dict[str, Any]],
        wait_job: Callable[..., dict[str, Any]], jobs_client: Any, wait_until: Callable[..., Any],
        record_fault: Callable[..., None]) -> None:
    proxy = s3_proxy()
    start_worker(CTSCAN_S3_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}", CTSCAN_TRAINER_S3_OUTAGE_BUDGET="300")
    job = tiny_job(6)
    wait_until(lambda: len(jobs_client.get(job["id"]).progress) >= 1, timeout=240, what="the first epoch",
               interval=0.3)
    proxy.cut()
    cut_at = time.monotonic()
    time.sleep(45)  # longer than botocore's retries (the outage that failed jobs before)
    proxy.restore()
    record = wait_job(job["id"], TERMINAL, timeout=400)
    assert record["state"] == "succeeded", record["error"]
    assert record["outages"] and "is unreachable" in record["outages"][0]
    assert [p["epoch"] for p in record["progress"]] == [1, 2, 3, 4, 5, 6]
    assert record["attempts"] == 1 and record["resumed_from_epoch"] >= 1
    record_fault("S3 outage of 45 s during training", outcome="succeeded",
                 seconds_from_cut_to_succeeded=round(time.monotonic() - cut_at, 1))


def test_cancel_of_a_job_waiting_for_its_retry_says_so(jobs_client: Any, admin_token: str) -> None:
    """Not "cancelled before it started" for a job that already ran (the issue's last symptom)."""
    from ctscan.storage.job_records import new_job_id, now
    from ctscan.storage.records import JobAttempt, JobRecord

    record = JobRecord(id=new_job_id(), state="queued", model="mobilenetv2", dataset="d", dataset_version="v",
                       init="none", epochs=3, created_at=now(), attempts=1, retry_at=now(),
                       attempt_log=[JobAttempt(attempt=1, worker="host:1", started_at=now(), ended_at=now(),
                                               outcome="worker host:1 stopped heartbeating (lease expired)")])
    jobs_client.records.create(record)
    cancelled = jobs_client.cancel(record.id, admin_token=admin_token)
    assert cancelled.state == "cancelled"
    assert cancelled.error == "cancelled by an admin while it waited to be retried"
    assert jobs_client.records.get(record.id).error == cancelled.error


def test_a_paused_worker_that_lost_its_job_writes_nothing_when_it_wakes(
        start_worker: Callable[..., Any], tiny_job: Callable[..., dict[str, Any]],
        wait_job: Callable[..., dict[str, Any]], jobs_client: Any, wait_until: Callable[..., Any]) -> None:
    first = start_worker()
    job = tiny_job(6)
    running = wait_until(lambda: (r := jobs_client.get(job["id"])).progress and r, timeout=240,
                         what="the first epoch", interval=0.3)
    paused = int(running.worker.rsplit(":", 1)[1])
    os.kill(paused, signal.SIGSTOP)  # a long GC pause, a frozen VM: the heartbeat stops too
    try:
        second = start_worker()
        wait_until(lambda: jobs_client.get(job["id"]).attempts == 2, timeout=240, what="the second attempt",
                   interval=0.3)
    finally:
        os.kill(paused, signal.SIGCONT)
    record = wait_job(job["id"], TERMINAL, timeout=400)
    assert record["state"] == "succeeded", (record["error"], second.output())
    assert record["attempts"] == 2 and [p["epoch"] for p in record["progress"]] == [1, 2, 3, 4, 5, 6]
    assert record["attempt_log"][0]["outcome"].endswith("stopped heartbeating (lease expired)")
    # The first worker woke up, found the job handed on and stopped without writing.
    wait_until(lambda: "writes nothing more" in first.output(), timeout=120, what="the paused worker to stop")
    time.sleep(3)
    assert jobs_client.get(job["id"]).model_dump(mode="json") == record
