"""The inference app factory: settings in, FastAPI app out; models load in the lifespan."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartParser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ctscan import DISCLAIMER
from ctscan.settings import InferenceSettings, get_inference_settings
from ctscan.storage.store import open_store
from services.inference.auth import PUBLIC, Access, AccessControl, RouteRules, action_of
from services.inference.docs import install_offline_docs
from services.inference.errors import APIError, error_response, install_error_handlers
from services.inference.metrics import InferenceMetrics
from services.inference.registry import ModelRegistry
from services.inference.routes import client_request_id_from, new_request_id, router

logger = logging.getLogger(__name__)
# Multipart framing around the file; anything announced above limit + this is refused unread.
MULTIPART_OVERHEAD = 64 * 1024


class UploadTooLarge(HTTPException):
    """Raised from `receive` when a streamed (chunked) body passes its route's limit; FastAPI
    lets HTTP exceptions out of its form parsing, so the answer is a 413, not a 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the upload exceeds the {limit} byte limit")


class RequestContext:
    """Request ids, the access each route declares, early refusal of oversize uploads, and
    metrics, logs and audit events of every upload route.

    A plain ASGI middleware rather than `@app.middleware("http")`: the latter wraps every
    request in extra tasks and streams, a measurable cost on the /predict hot path.
    """

    def __init__(self, app: ASGIApp, *, settings: InferenceSettings, metrics: InferenceMetrics,
                 access: AccessControl, rules: RouteRules) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.access = access
        self.rules = rules

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        # Always our own id; the caller's is kept beside it, never instead (a forged id must
        # not mix two requests in the audit trail).
        request_id = new_request_id()
        client_request_id = client_request_id_from(headers.get("x-request-id", ""))
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["client_request_id"] = client_request_id
        rule = self.rules.for_scope(scope)
        upload_limit = None if rule is None or rule.upload_setting is None else int(
            getattr(self.settings, rule.upload_setting))
        action = action_of(scope["path"])
        started = time.perf_counter()
        status = 500  # unless a response starts

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                response_headers = MutableHeaders(scope=message)
                response_headers["X-Request-ID"] = request_id
                if client_request_id:
                    response_headers["X-Client-Request-ID"] = client_request_id
            await send(message)

        async def refuse(error: APIError) -> None:
            await error_response(error.status_code, error.code, error.message,
                                 headers=error.headers)(scope, receive, send_with_id)

        try:
            if rule is not None and rule.access is None:
                await refuse(APIError(403, "access_undeclared", "this route declares no access; it is refused"))
                return
            if rule is not None and rule.access is Access.API_KEY:
                admitted = await self.access.admit(headers, path=scope["path"], request_id=request_id,
                                                   client_request_id=client_request_id)
                if isinstance(admitted, APIError):
                    await refuse(admitted)
                    return
                state["caller"] = admitted
            if upload_limit is None:
                await self.app(scope, receive, send_with_id)
                return
            announced = headers.get("content-length", "")
            if announced.isdigit() and int(announced) > upload_limit + MULTIPART_OVERHEAD:
                state["error_code"] = "upload_too_large"
                await refuse(APIError(413, "upload_too_large", f"the upload exceeds the {upload_limit} byte limit"))
                return
            await self.app(scope, _counted(receive, upload_limit + MULTIPART_OVERHEAD), send_with_id)
        finally:
            if upload_limit is not None:
                model = str(state.get("model", "invalid"))
                self.metrics.requests.labels(model=model, status=str(status), action=action).inc()
                self.metrics.latency.labels(model=model, status=str(status), action=action).observe(
                    time.perf_counter() - started)
                # Only the request id, model and status: never anything of the upload (patient data).
                logger.info("%s %s model=%s status=%s", action, request_id, model, status)
                if "caller" in state:  # refusals at the door are audited by admit
                    self.access.audit_request(state, action=action, status=status)


def _counted(receive: Receive, limit: int) -> Receive:
    """`receive` that refuses a body once more than `limit` bytes have come (a chunked upload
    announces no length)."""
    received = 0

    async def counted() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise UploadTooLarge(limit - MULTIPART_OVERHEAD)
        return message

    return counted


def keep_uploads_in_memory(settings: InferenceSettings) -> None:
    """Starlette spools each uploaded file above 1 MB to a (deleted) temporary file, where a
    DICOM's patient data would sit on the disk. Raise the spool size to the largest body any
    route accepts: bodies are bounded before parsing (RequestContext), so the part stays in
    memory. Process-wide (a class attribute), as one process serves one app."""
    largest = max(settings.max_upload_bytes, settings.max_study_bytes) + MULTIPART_OVERHEAD
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, largest)


def create_app(settings: InferenceSettings | None = None) -> FastAPI:
    settings = settings or get_inference_settings()
    metrics = InferenceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = open_store(settings.store.model_store)
        registry = ModelRegistry(settings=settings, store=store, metrics=metrics)
        app.state.registry = registry
        # Loading runs in the background so /healthz answers and /readyz reports progress.
        registry.start()
        try:
            yield
        finally:
            registry.stop()

    app = FastAPI(
        title="ctscan inference",
        version="2.0",  # the answer's api_version
        description=f"COVID-19 chest-CT classification. {DISCLAIMER}",
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc come from local files (works offline): see docs.py
        redoc_url=None,
        openapi_url=None,  # added below, with its access stated
    )
    app.openapi_url = "/openapi.json"

    @app.get(app.openapi_url, include_in_schema=False, dependencies=[PUBLIC])
    async def openapi_schema() -> JSONResponse:
        return JSONResponse(app.openapi())

    install_offline_docs(app)
    app.state.settings = settings
    app.state.metrics = metrics
    access = AccessControl(settings)
    app.state.access = access
    install_error_handlers(app)
    app.include_router(router)

    # Inside only the error middleware: it counts every answer, 422s and 500s included.
    keep_uploads_in_memory(settings)
    app.add_middleware(RequestContext, settings=settings, metrics=metrics, access=access,
                       rules=RouteRules(app.router.routes))
    return app
