"""Checkpoint garbage collection (ctscan.storage.job_records.collect_checkpoints) on a real local
store: cancelled, failed and abandoned jobs lose their checkpoints after the retention time;
queued and running jobs keep theirs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from ctscan.storage.job_records import JobRecords, collect_checkpoints
from ctscan.storage.objects import open_objects
from ctscan.storage.records import JobRecord

HOUR = 3600.0


def _job(records: JobRecords, job_id: str, state: str, *, ended_hours_ago: float | None) -> None:
    finished = None if ended_hours_ago is None else \
        (datetime.now(UTC) - timedelta(hours=ended_hours_ago)).isoformat()
    records.create(JobRecord(id=job_id, state=state, model="mobilenetv2", dataset="d", dataset_version="v",  # type: ignore[arg-type]
                             init="none", epochs=3, created_at=datetime.now(UTC).isoformat(), finished_at=finished))


def test_checkpoints_of_jobs_that_will_never_resume_are_deleted_after_the_retention(tmp_path: Path) -> None:
    store_url = str(tmp_path / "store")
    records = JobRecords.for_store(store_url)
    runs = open_objects(store_url).child(".runs")
    jobs = {"old-failed": ("failed", 30.0), "old-cancelled": ("cancelled", 25.0), "new-failed": ("failed", 1.0),
            "running": ("running", None), "queued": ("queued", None)}
    for job_id, (state, ended) in jobs.items():
        _job(records, job_id, state, ended_hours_ago=ended)
    for job_id in [*jobs, "abandoned"]:  # "abandoned": checkpoints without a job record
        runs.put(f"{job_id}/epoch-0001/state.json", b"{}")
        runs.put(f"{job_id}/latest.json", b'{"epoch": 1}')

    collected = collect_checkpoints(store_url, retention_s=24 * HOUR)
    assert collected == {"old-failed": collected["old-failed"], "old-cancelled": collected["old-cancelled"],
                         "abandoned": "abandoned: no job record"}
    assert collected["old-failed"].startswith("failed ") and collected["old-cancelled"].startswith("cancelled ")
    left = {key.split("/")[0] for key in runs.walk()}
    assert left == {"new-failed", "running", "queued"}
    # Once the retention has passed for it too, the recent failure goes; live jobs never do.
    assert set(collect_checkpoints(store_url, retention_s=0)) == {"new-failed"}
    assert {key.split("/")[0] for key in runs.walk()} == {"running", "queued"}
