"""Who is calling: API keys (hot-reloaded from the store), per-key and per-user rate limits,
the access each route declares, and the audit trail of every upload (answered or refused).

Access is refused by default: every route states where it is declared who may call it
(`dependencies=[PUBLIC]` or `dependencies=[API_KEY]`, `public_mount` for a mounted app); a
route that states nothing answers 403 to everyone. The request middleware reads the
statement of the route a request matches and checks the key before the body is read.

The web page calls with its own key (named `PAGE_KEY_NAME` in the store) and names the
signed-in person in `USER_HEADER`; that header is believed from the page's key only, and
then rate limits and audit events are per person, so one clinician cannot use up the page's
share for everyone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi import params as fastapi_params
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match, Mount
from starlette.types import ASGIApp, Scope

from ctscan.access.audit_trail import ActorKind, AuditTrail
from ctscan.access.keys_and_accounts import PAGE_KEY_NAME, KeyRing, RateLimiter, check_name, open_access
from ctscan.errors import CTScanError
from ctscan.settings import InferenceSettings
from services.inference.errors import APIError

logger = logging.getLogger(__name__)
KEY_HEADER = "x-api-key"
# The signed-in person the page calls for; believed from the page's own key only.
USER_HEADER = "x-ctscan-user"
_UNAUTHORISED = {
    "missing": "an API key is required: send it in the X-API-Key header (or Authorization: Bearer)",
    "unknown": "this API key is not valid",
    "revoked": "this API key has been revoked",
    "expired": "this API key has expired",
}


class Access(StrEnum):
    PUBLIC = "public"  # probes, metrics, the API's documentation: nothing of a patient's
    API_KEY = "api_key"  # anything that takes patient data or tells what is served


def _public() -> None:
    """Marks a route open to anyone (a probe or documentation)."""


_KEY_SCHEME = APIKeyHeader(name="X-API-Key", auto_error=False, description=(
    "An API key from `ctscan keys create` (or Authorization: Bearer KEY); not needed when the "
    "service runs with INFERENCE_AUTH=off"))


def _key_required(request: Request, _documented: Annotated[str | None, Security(_KEY_SCHEME)] = None) -> None:
    """Marks a route that needs an API key (the parameter documents the key in the OpenAPI
    schema: "Authorize" in /docs). The middleware has checked the key before the body was
    read; this refuses too if a request ever reached the route without that check."""
    if not isinstance(getattr(request.state, "caller", None), Caller):
        raise APIError(401, "unauthorised", _UNAUTHORISED["missing"], headers={"WWW-Authenticate": "Bearer"})


# Put in a route's `dependencies`: its access, stated where it is declared.
PUBLIC = Depends(_public)
API_KEY = Depends(_key_required)


class UploadLimit:
    """Marks an upload route and names the setting that bounds its body (default
    `max_upload_bytes`): the middleware refuses a larger body, announced or streamed, with 413,
    and counts and audits every request to it."""

    def __init__(self, setting: str = "max_upload_bytes") -> None:
        self.setting = setting

    def __call__(self) -> None:
        return None


def public_mount(path: str, app: ASGIApp, *, name: str) -> Mount:
    """A mounted app (static files) open to anyone; mounts have no dependencies to say so."""
    mount = Mount(path, app=app, name=name)
    mount.ctscan_access = Access.PUBLIC  # type: ignore[attr-defined]
    return mount


@dataclass(frozen=True)
class RouteRule:
    """What a route declares: its access (None: nothing declared, refused) and, for an upload
    route, the setting bounding its body."""

    access: Access | None
    upload_setting: str | None = None


def rule_of(route: BaseRoute) -> RouteRule:
    if isinstance(route, APIRoute):
        marks = [dependency.dependency for dependency in route.dependencies]
        access = Access.API_KEY if _key_required in marks else Access.PUBLIC if _public in marks else None
        limits = [mark.setting for mark in marks if isinstance(mark, UploadLimit)]
        takes_files = any(isinstance(field.field_info, fastapi_params.File) for field in route.dependant.body_params)
        upload = limits[0] if limits else ("max_upload_bytes" if takes_files else None)
        return RouteRule(access, upload)
    access = getattr(route, "ctscan_access", None)
    if access is None and getattr(route, "endpoint", None) is not None:
        access = getattr(route.endpoint, "ctscan_access", None)  # type: ignore[attr-defined]
    return RouteRule(access if isinstance(access, Access) else None)


def flat_routes(routes: Sequence[BaseRoute]) -> Iterator[BaseRoute]:
    """The routes an app serves: FastAPI keeps an included router as one entry that holds the
    router's own (growing) list. Routers are included without a prefix here."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from flat_routes(inner.routes)
        else:
            yield route


class RouteRules:
    """The rule of the route a request matches, read from the app's (growing) route list."""

    def __init__(self, routes: Sequence[BaseRoute]) -> None:
        self.routes = routes
        self._rules: dict[int, tuple[BaseRoute, RouteRule]] = {}

    def for_scope(self, scope: Scope) -> RouteRule | None:
        """The matching route's rule; None when no route matches (the router answers 404)."""
        partial = None
        for route in flat_routes(self.routes):
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return self._rule(route)
            if match == Match.PARTIAL and partial is None:
                partial = route  # the path matches, not the method: 405 for those let in
        return None if partial is None else self._rule(partial)

    def _rule(self, route: BaseRoute) -> RouteRule:
        cached = self._rules.get(id(route))
        if cached is not None and cached[0] is route:  # (an id may be reused by a new route)
            return cached[1]
        rule = rule_of(route)
        self._rules[id(route)] = (route, rule)
        if rule.access is None:
            logger.error("route %s declares no access: refused to everyone", getattr(route, "path", route))
        return rule


@dataclass
class Caller:
    actor: str
    kind: ActorKind
    key: str | None = None  # the API key's name (for a person behind the page: the page's)


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

    async def admit(self, headers: Headers, *, path: str, request_id: str,
                    client_request_id: str | None = None) -> Caller | APIError:
        """The caller, or the error to answer. Runs before the body is read: an upload
        without a valid key is refused unread."""
        if not self.enabled:
            return Caller("anonymous", "anonymous")
        ids = {"request_id": request_id, "client_request_id": client_request_id}
        # A key seen in the last seconds is answered from memory; otherwise the store (maybe
        # S3) is read off the event loop.
        key = self.presented_key(headers)
        check = self.keys.cached(key)
        if check is None:
            check = await run_in_threadpool(self.keys.check, key)
        action = action_of(path)
        if check.outcome != "ok" or check.name is None:
            self.trail.record(action=action, outcome=f"key_{check.outcome}", actor=check.name or "anonymous",
                              actor_kind="key" if check.name else "anonymous", status=401, **ids)
            return APIError(401, "unauthorised", _UNAUTHORISED[check.outcome], headers={"WWW-Authenticate": "Bearer"})
        caller = Caller(check.name, "key", key=check.name)
        limit = check.rate_limit_per_minute or self.settings.rate_limit_per_minute
        bucket, whose = check.name, f"key {check.name!r}"
        named = headers.get(USER_HEADER)
        if named and check.name == PAGE_KEY_NAME:
            try:
                person = check_name("user", named.strip())
            except CTScanError:
                return APIError(400, "invalid_user", "the user named in X-CTScan-User is not a valid name")
            # Each person behind the page has a share of their own (the page's key has no
            # bucket of its own then: its users are signed in and each one is limited).
            caller = Caller(person, "user", key=check.name)
            limit, bucket, whose = self.settings.user_rate_limit_per_minute, f"{check.name}/{person}", "you"
        wait = self.limiter.take(bucket, limit)
        if wait > 0:
            self.trail.record(action=action, outcome="rate_limited", actor=caller.actor, actor_kind=caller.kind,
                              status=429, detail={"key": check.name}, **ids)
            retry = str(math.ceil(wait))
            return APIError(429, "rate_limited", f"too many requests for {whose}; retry in {retry} s",
                            headers={"Retry-After": retry})
        return caller

    def audit_request(self, state: dict[str, object], *, action: str, status: int) -> None:
        """One event per admitted prediction request, from what the route left in the request
        state: the answer's outcome and version, or the error code; the upload's SHA-256."""
        caller = state["caller"]
        assert isinstance(caller, Caller)
        outcome = state.get("outcome") or state.get("error_code") or ("ok" if status < 400 else "error")
        model = state.get("model")
        self.trail.record(action=action, outcome=str(outcome), actor=caller.actor, actor_kind=caller.kind,
                          request_id=str(state.get("request_id")), status=status,
                          client_request_id=_text(state.get("client_request_id")),
                          detail={"key": caller.key} if caller.key and caller.kind == "user" else {},
                          model=str(model) if model and model != "invalid" else None,
                          model_version=_text(state.get("model_version")),
                          upload_sha256=_text(state.get("upload_sha256")))


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def action_of(path: str) -> str:
    return {"/predict": "predict", "/predict/study": "predict_study"}.get(path, path.strip("/") or "root")
