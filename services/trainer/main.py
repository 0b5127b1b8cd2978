"""`ctscan serve worker`: run a Celery worker for training jobs (GPU when present, else CPU)."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import subprocess
import sys

from pydantic import ValidationError

from ctscan.access.admin_credential import AdminCredentialError, AdminVerifier
from ctscan.errors import CTScanError
from ctscan.settings import describe_settings_error, get_trainer_settings

log = logging.getLogger(__name__)


def visible_gpus() -> list[str]:
    """GPUs seen by the driver, without importing TensorFlow in the parent process (it must
    not hold CUDA state across the fork of the worker's children)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "" or not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line for line in out.stdout.splitlines() if line.startswith("GPU")]


def cli_serve(args: argparse.Namespace) -> None:
    """`ctscan serve worker` (registered in pyproject.toml's `ctscan.services` entry points)."""
    serve(concurrency=args.concurrency)


def _start_reaper() -> None:
    """The reaper and requeue sweep (services/trainer/reaper.py) in a process of its own: not
    a thread, since the prefork pool forks this process for every job. It ends with this one
    (it watches its parent) and is stopped on a normal exit."""
    reaper = subprocess.Popen([sys.executable, "-m", "services.trainer.reaper", str(os.getpid())])
    atexit.register(reaper.terminate)


def serve(concurrency: int = 1) -> None:
    try:
        settings = get_trainer_settings()
    except ValidationError as exc:
        raise CTScanError(f"the trainer refuses to start: {describe_settings_error(exc)}") from None
    token = settings.admin.token()
    if token is None:
        raise CTScanError("CTSCAN_ADMIN_TOKEN is not set (or is a placeholder); the trainer refuses "
                          "to start without the admin credential")
    try:
        # Writes the verifier on a store without one (submitters are checked against it);
        # a store that verifies another token refuses this worker (ctscan.access.admin_credential).
        AdminVerifier.for_store(settings.store.model_store).init(token)
    except AdminCredentialError as exc:
        raise CTScanError(f"the trainer refuses to start: {exc}") from None
    except CTScanError as exc:  # the store may be down now; jobs are still checked one by one
        log.warning("could not publish the admin token's verifier: %s", exc)
    gpus = visible_gpus()
    if gpus:
        # Several jobs can share a GPU only if none grabs all of its memory up front.
        os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    logging.basicConfig(level=logging.INFO)
    log.info("trainer worker: %s, concurrency %d, queue %s, store %s", "GPU: " + "; ".join(gpus) if gpus
             else "CPU (no GPU found)", concurrency, settings.queue, settings.store.model_store)
    from services.trainer.celery_app import app

    _start_reaper()
    # prefork: time limits and "worker lost" detection need child processes.
    app.worker_main(["worker", f"--concurrency={concurrency}", "--pool=prefork", "--loglevel=INFO",
                     f"--queues={settings.queue}", "--without-gossip", "--without-mingle"])
