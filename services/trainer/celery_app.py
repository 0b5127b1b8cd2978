"""The Celery application of the trainer (configuration only; tasks live in `tasks.py`)."""

from __future__ import annotations

from celery import Celery

from ctscan.settings import TrainerSettings, get_trainer_settings

TASK_RUN_JOB = "ctscan.trainer.run_job"


def _transport_options(settings: TrainerSettings) -> dict[str, object]:
    options: dict[str, object] = {"visibility_timeout": settings.broker_visibility_timeout_s}
    if settings.celery_broker_url.startswith("filesystem://"):
        # kombu's filesystem transport needs one shared folder for producers and consumers.
        folder = settings.broker_dir
        folder.mkdir(parents=True, exist_ok=True)
        options.update(data_folder_in=str(folder), data_folder_out=str(folder),
                       processed_folder=str(folder / "processed"), store_processed=False)
    return options


def create_app() -> Celery:
    settings = get_trainer_settings()
    app = Celery("ctscan_trainer", broker=settings.celery_broker_url,
                 backend=settings.celery_result_backend, include=["services.trainer.tasks"])
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # A job is acknowledged only when it has finished, and handed back if its worker
        # dies, so a crash means "resume elsewhere", never "lost".
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.soft_time_limit_s,
        task_time_limit=settings.hard_time_limit_s,
        task_track_started=True,
        task_default_queue=settings.queue,
        task_routes={TASK_RUN_JOB: {"queue": settings.queue}},
        broker_transport_options=_transport_options(settings),
        broker_connection_retry_on_startup=True,
        result_expires=7 * 24 * 3600,
        # Training holds large tensors; a fresh child per job returns the memory.
        worker_max_tasks_per_child=1,
    )
    return app


app = create_app()
