"""`ctscan jobs submit|list|show|cancel`: the trainer's API on the command line.

Plugged into the `ctscan` command through pyproject.toml's `ctscan.commands` entry points.
The admin credential comes from CTSCAN_ADMIN_TOKEN (never from the command line, where
other users could read it in the process list).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ctscan.errors import CTScanError
from ctscan.storage.job_records import FINISHED_STATES
from ctscan.storage.records import JobProgress, JobRecord


def _hyperparameter(text: str) -> tuple[str, Any]:
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    try:
        value = json.loads(raw)  # numbers, true/false, null; anything else stays a string
    except json.JSONDecodeError:
        value = raw
    return name.replace("-", "_"), value


def register(commands: Any) -> None:
    """Add `ctscan jobs` to the `ctscan` command's sub-parsers."""
    jobs = commands.add_parser("jobs", help="training jobs (trainer service)")
    add_jobs_arguments(jobs)
    jobs.set_defaults(func=run_jobs_command)


def add_jobs_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="jobs_command", required=True)
    submit = sub.add_parser("submit", help="queue a training job (needs CTSCAN_ADMIN_TOKEN)")
    submit.add_argument("--model", required=True)
    submit.add_argument("--dataset", required=True, help="dataset name (see `ctscan data upload`)")
    submit.add_argument("--dataset-version", required=True)
    submit.add_argument("--init", default="imagenet", help="imagenet | none | PATH to backbone weights")
    submit.add_argument("--epochs", type=int, default=30)
    submit.add_argument("--hp", "--hyperparameter", dest="hyperparameters", action="append",
                        type=_hyperparameter, default=[], metavar="NAME=VALUE",
                        help="e.g. --hp batch_size=16 --hp learning_rate=0.0005 (repeatable)")
    submit.add_argument("--wait", action="store_true", help="follow progress until the job ends")
    listing = sub.add_parser("list", help="recent jobs, newest first")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--json", action="store_true")
    show = sub.add_parser("show", help="one job's record")
    show.add_argument("id")
    show.add_argument("--wait", action="store_true", help="follow progress until the job ends")
    cancel = sub.add_parser("cancel", help="stop a job (needs CTSCAN_ADMIN_TOKEN)")
    cancel.add_argument("id")
    requeue = sub.add_parser("requeue", help="send again queued jobs whose message the broker lost "
                             "(needs CTSCAN_ADMIN_TOKEN)")
    requeue.add_argument("ids", nargs="*", help="only these jobs (default: every queued job)")


def _token() -> str:
    from pydantic import ValidationError

    from ctscan.settings import describe_settings_error, get_admin_settings
    from services.trainer.api import AdminAuthError

    try:
        token = get_admin_settings().token()
    except ValidationError as exc:
        raise AdminAuthError(describe_settings_error(exc)) from None
    if not token:
        raise AdminAuthError("set CTSCAN_ADMIN_TOKEN to queue or cancel jobs")
    return token


def _progress_line(job_id: str, entry: JobProgress) -> str:
    return (f"{job_id} epoch {entry.epoch}/{entry.total_epochs} loss {entry.loss:.4f} "
            f"val_loss {entry.val_loss:.4f} val_auc {entry.val_auc:.4f} "
            f"val_acc {entry.val_accuracy:.4f} ({entry.seconds:.0f}s)")


def _follow(client: Any, job_id: str, poll_seconds: float = 2.0) -> JobRecord:
    printed = 0
    last_state = None
    while True:
        record: JobRecord = client.get(job_id)
        if record.state != last_state:
            print(f"{job_id} {record.state}", file=sys.stderr, flush=True)
            last_state = record.state
        progress = record.progress
        printed = min(printed, len(progress))  # a resumed job drops epochs after its checkpoint
        for entry in progress[printed:]:
            print(_progress_line(job_id, entry), file=sys.stderr, flush=True)
        printed = len(progress)
        if record.state in FINISHED_STATES:
            return record
        time.sleep(poll_seconds)


def serving_role(record: JobRecord, production: dict[str, str | None]) -> str:
    """What the job's model is now, from the current production pointer (a rollback or a
    manual promotion after the job changes it), not from the decision when the job ended."""
    if record.result_version is None:
        return ""
    if production.get(record.model) == record.result_version:
        return "production"
    return "candidate (was production)" if record.promoted else "candidate"


def _summary(record: JobRecord, production: dict[str, str | None]) -> str:
    epoch = f"{record.progress[-1].epoch if record.progress else 0}/{record.epochs}"
    result = record.result_version or "-"
    promoted = serving_role(record, production)
    return (f"{record.id}  {record.state:9s}  {record.model:12s}  "
            f"{record.dataset}@{record.dataset_version}  epoch {epoch}  {result} {promoted}").rstrip()


def _dump(record: JobRecord) -> dict[str, Any]:
    return record.model_dump(mode="json", exclude={"signature"})


def run_jobs_command(args: argparse.Namespace) -> int:
    from services.trainer.api import JobsClient

    client = JobsClient.from_settings()
    command = args.jobs_command
    if command == "submit":
        record = client.submit(model=args.model, dataset=args.dataset, dataset_version=args.dataset_version,
                               init=args.init, epochs=args.epochs,
                               hyperparameters=dict(args.hyperparameters), admin_token=_token())
        if args.wait:
            record = _follow(client, record.id)
    elif command == "list":
        records = client.list_jobs(limit=args.limit)
        production = client.production_versions({record.model for record in records})
        if args.json:
            print(json.dumps([{**_dump(record), "serving": serving_role(record, production) or None}
                              for record in records], indent=2))
        else:
            for record in records:
                print(_summary(record, production))
        return 0
    elif command == "show":
        record = _follow(client, args.id) if args.wait else client.get(args.id)
    elif command == "cancel":
        record = client.cancel(args.id, admin_token=_token())
    elif command == "requeue":
        done = client.requeue(args.ids or None, admin_token=_token())
        print(json.dumps({"requeued": done}, indent=2))
        return 0
    else:
        raise CTScanError(f"unknown jobs command {command!r}")
    print(json.dumps(_dump(record), indent=2))
    # With --wait the exit status tells scripts how the job ended.
    return 1 if getattr(args, "wait", False) and record.state != "succeeded" else 0
