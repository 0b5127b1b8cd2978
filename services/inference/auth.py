"""Who is calling: API keys (hot-reloaded from the store), per-key rate limits, and the audit
trail of every prediction request (answered or refused)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers

from ctscan.access import KeyRing, RateLimiter, open_access
from ctscan.audit_trail import ActorKind, AuditTrail
from ctscan.settings import InferenceSettings
from services.inference.errors import APIError

KEY_HEADER = "x-api-key"
_UNAUTHORISED = {
    "missing": "an API key is required: send it in the X-API-Key header (or Authorization: Bearer)",
    "unknown": "this API key is not valid",
    "revoked": "this API key has been revoked",
    "expired": "this API key has expired",
}


@dataclass
class Caller:
    actor: str
    kind: ActorKind


class AccessControl:
    """Built once per app: the key ring, the rate limiter and the audit trail."""

    def __init__(self, settings: InferenceSettings) -> None:
        self.settings = settings
        self.enabled = settings.auth == "keys"
        self.keys = KeyRing(open_access(settings.store.model_store), reload_seconds=settings.key_reload_seconds)
        self.limiter = RateLimiter()
        self.trail = AuditTrail(settings.audit.audit_dir, service="inference")

    @staticmethod
    def presented_key(headers: Headers) -> str | None:
        key = headers.get(KEY_HEADER)
        if key:
            return key
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        return credentials.strip() if scheme.lower() == "bearer" and credentials.strip() else None

    async def admit(self, headers: Headers, *, path: str, request_id: str) -> Caller | APIError:
        """The caller, or the error to answer. Runs before the body is read: an upload
        without a valid key is refused unread."""
        if not self.enabled:
            return Caller("anonymous", "anonymous")
        # A key seen in the last seconds is answered from memory; otherwise the store (maybe
        # S3) is read off the event loop.
        key = self.presented_key(headers)
        check = self.keys.cached(key)
        if check is None:
            check = await run_in_threadpool(self.keys.check, key)
        action = action_of(path)
        if check.outcome != "ok" or check.name is None:
            self.trail.record(action=action, outcome=f"key_{check.outcome}", actor=check.name or "anonymous",
                              actor_kind="key" if check.name else "anonymous", request_id=request_id, status=401)
            return APIError(401, "unauthorised", _UNAUTHORISED[check.outcome], headers={"WWW-Authenticate": "Bearer"})
        wait = self.limiter.take(check.name, check.rate_limit_per_minute or self.settings.rate_limit_per_minute)
        if wait > 0:
            self.trail.record(action=action, outcome="rate_limited", actor=check.name, actor_kind="key",
                              request_id=request_id, status=429)
            retry = str(math.ceil(wait))
            return APIError(429, "rate_limited", f"too many requests for key {check.name!r}; retry in {retry} s",
                            headers={"Retry-After": retry})
        return Caller(check.name, "key")

    def audit_request(self, state: dict[str, object], *, action: str, status: int) -> None:
        """One event per admitted prediction request, from what the route left in the request
        state: the answer's outcome and version, or the error code; the upload's SHA-256."""
        caller = state["caller"]
        assert isinstance(caller, Caller)
        outcome = state.get("outcome") or state.get("error_code") or ("ok" if status < 400 else "error")
        model = state.get("model")
        self.trail.record(action=action, outcome=str(outcome), actor=caller.actor, actor_kind=caller.kind,
                          request_id=str(state.get("request_id")), status=status,
                          model=str(model) if model and model != "invalid" else None,
                          model_version=_text(state.get("model_version")),
                          upload_sha256=_text(state.get("upload_sha256")))


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def action_of(path: str) -> str:
    return {"/predict": "predict", "/predict/study": "predict_study"}.get(path, path.strip("/") or "root")


def get_access(request: Request) -> AccessControl:
    access: AccessControl = request.app.state.access
    return access


def get_caller(request: Request) -> Caller:
    caller: Caller = getattr(request.state, "caller", None) or Caller("anonymous", "anonymous")
    return caller

