"""Celery tasks of the trainer: thin wrappers that take a job ID and call `jobs.run_job`."""

from __future__ import annotations

import logging
from typing import Any

from ctscan.settings import get_trainer_settings
from services.trainer.celery_app import TASK_RUN_JOB, app
from services.trainer.jobs import run_job

log = logging.getLogger(__name__)


@app.task(bind=True, name=TASK_RUN_JOB, acks_late=True, reject_on_worker_lost=True)
def run_training_job(self: Any, job_id: str) -> dict[str, Any]:
    """Run job `job_id` (idempotent: a finished job is returned as is, a redelivered one
    resumes from its checkpoint). The task ID is the job ID."""

    def report_progress(meta: dict[str, Any]) -> None:
        # Live progress for Celery tooling; the durable copy is the job record, so a
        # broken result backend (Redis restarting) must not fail the job.
        try:
            self.update_state(state="PROGRESS", meta=meta)
        except Exception as exc:  # best effort by design
            log.warning("job %s: could not publish progress to the result backend: %s", job_id, exc)

    record = run_job(job_id, settings=get_trainer_settings(), on_progress=report_progress)
    return {"id": record.id, "state": record.state, "result_version": record.result_version,
            "promoted": record.promoted}
