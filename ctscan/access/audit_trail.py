"""The audit trail: one JSON line per prediction and per admin action, append-only.

Files are `<dir>/<YYYY-MM-DD>/<service>-<host>-<pid>.jsonl`: a new file each day (rotation
without renaming) and each process writes only its own file, so replicas and workers sharing
one volume never interleave or rotate each other's lines. Nothing is ever rewritten.

An event names who (API key name or user), what, which model and version, the outcome, the
request id and the SHA-256 of the uploaded bytes. Never pixels, file names or DICOM fields:
`AuditEvent` has no field that could hold them, and `detail` takes short scalars only.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Iterable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

Scalar = str | int | float | bool | None
ActorKind = Literal["key", "user", "cli", "anonymous", "service"]
_MAX_DETAIL = 200
FILE_MODE = 0o640


class AuditEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a field no one reviewed is never written

    time: datetime
    service: str
    action: str  # predict, predict_study, login, logout, promote, rollback, job_queue, key_create...
    outcome: str  # ok, refused, error, or the prediction's outcome (covid, non_covid, indeterminate...)
    actor: str
    actor_kind: ActorKind
    request_id: str | None = None  # always minted by the service that writes the event
    # The id a caller sent (X-Request-ID), kept apart: a forged one never mixes two requests.
    client_request_id: str | None = None
    model: str | None = None
    model_version: str | None = None
    upload_sha256: str | None = None
    status: int | None = None  # the HTTP status answered
    detail: dict[str, Scalar] = Field(default_factory=dict)

    @field_validator("detail")
    @classmethod
    def _short_scalars(cls, value: dict[str, Scalar]) -> dict[str, Scalar]:
        return {k[:64]: (v[:_MAX_DETAIL] if isinstance(v, str) else v) for k, v in list(value.items())[:20]}


def upload_digest(parts: Iterable[bytes]) -> str:
    """SHA-256 of the uploaded bytes (of all parts in order, for a study)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


class AuditTrail:
    """Appends events for one service process; thread-safe."""

    def __init__(self, directory: Path | str, *, service: str) -> None:
        self.directory = Path(directory).expanduser()
        self.service = service
        self._file_stem = f"{service}-{socket.gethostname()}-{os.getpid()}"
        self._lock = threading.Lock()

    def path_for(self, day: date) -> Path:
        return self.directory / day.isoformat() / f"{self._file_stem}.jsonl"

    def record(self, *, action: str, outcome: str, actor: str, actor_kind: ActorKind,
               **fields: object) -> AuditEvent:
        event = AuditEvent(time=datetime.now(UTC), service=self.service, action=action, outcome=outcome,
                           actor=actor, actor_kind=actor_kind, **fields)  # type: ignore[arg-type]
        line = (event.model_dump_json(exclude_none=True) + "\n").encode()
        path = self.path_for(event.time.date())
        with self._lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            # O_APPEND: each event is one write at the end, whatever else has the file open.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        return event


def read_events(directory: Path | str, *, since: datetime | None = None, until: datetime | None = None,
                actor: str | None = None, request_id: str | None = None,
                action: str | None = None, client_request_id: str | None = None) -> Iterator[AuditEvent]:
    """Events in time order, filtered; damaged lines are skipped."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        return
    first = (since - timedelta(days=1)).date() if since else None
    last = (until + timedelta(days=1)).date() if until else None
    events: list[AuditEvent] = []
    for day_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            day = date.fromisoformat(day_dir.name)
        except ValueError:
            continue
        if (first and day < first) or (last and day > last):
            continue
        for path in sorted(day_dir.glob("*.jsonl")):
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    event = AuditEvent.model_validate_json(line)
                except ValidationError:
                    continue
                if since and event.time < since:
                    continue
                if until and event.time > until:
                    continue
                if actor and event.actor != actor:
                    continue
                if request_id and event.request_id != request_id:
                    continue
                if client_request_id and event.client_request_id != client_request_id:
                    continue
                if action and event.action != action:
                    continue
                events.append(event)
    yield from sorted(events, key=lambda e: e.time)
