"""The web app's shared per-app objects (settings, clients, throttles, audit trail), in a
module of their own: the app factory and the views both import it, never each other
(flaskr's `db.py`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from flask import current_app

from ctscan.access.audit_trail import AuditTrail
from ctscan.settings import WebSettings
from ctscan.storage.store import ModelStore
from services.web.auth import Authenticator, LoginThrottle, NameDelay
from services.web.console import JobsClientLike, default_jobs_client, default_store
from services.web.inference_client import InferenceClient


@dataclass
class WebServices:
    """What the routes use, created once per app (tests pass their own)."""

    settings: WebSettings
    inference: InferenceClient
    jobs_client_factory: Callable[[], JobsClientLike] = default_jobs_client
    store_factory: Callable[[str], ModelStore] = default_store
    # Failed logins per address (a lock for minutes), and per user name (guessing from many
    # addresses): an exponential delay that the person's own browser does not wait for.
    login_throttle: LoginThrottle = field(default_factory=LoginThrottle)
    name_delay: NameDelay = field(default_factory=NameDelay)
    auth: Authenticator = field(init=False)
    trail: AuditTrail = field(init=False)
    _jobs_client: JobsClientLike | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.auth = Authenticator(self.settings)
        self.trail = AuditTrail(self.settings.audit.audit_dir, service="web")

    def jobs(self) -> JobsClientLike:
        if self._jobs_client is None:
            self._jobs_client = self.jobs_client_factory()
        return self._jobs_client

    def store(self) -> ModelStore:
        return self.store_factory(self.settings.store.model_store)


def services() -> WebServices:
    web: WebServices = current_app.extensions["ctscan_web"]
    return web
