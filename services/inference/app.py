"""The inference app factory: settings in, FastAPI app out; models load in the lifespan."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ctscan import DISCLAIMER
from ctscan.settings import InferenceSettings, get_inference_settings
from ctscan.storage.store import open_store
from services.inference.auth import AccessControl, action_of
from services.inference.docs import install_offline_docs
from services.inference.errors import APIError, error_response, install_error_handlers
from services.inference.metrics import InferenceMetrics
from services.inference.registry import ModelRegistry
from services.inference.routes import request_id_from, router

logger = logging.getLogger(__name__)
# Everything that takes patient data or tells what is served needs a key; probes and metrics
# do not (k8s keeps /metrics inside the cluster: k8s/networkpolicy.yaml, k8s/ingress.yaml).
PROTECTED_PATHS = frozenset({"/predict", "/predict/study", "/models"})
# Multipart framing around the file; anything announced above limit + this is refused unread.
MULTIPART_OVERHEAD = 64 * 1024


class RequestContext:
    """Request id, early refusal of announced oversize uploads, and per-request metrics.

    A plain ASGI middleware rather than `@app.middleware("http")`: the latter wraps every
    request in extra tasks and streams, a measurable cost on the /predict hot path.
    """

    def __init__(self, app: ASGIApp, *, max_upload_bytes: int, metrics: InferenceMetrics,
                 access: AccessControl) -> None:
        self.app = app
        self.max_upload_bytes = max_upload_bytes
        self.metrics = metrics
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = request_id_from(headers.get("x-request-id", ""))
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        is_predict = scope["path"] == "/predict"
        is_study = scope["path"] == "/predict/study"
        started = time.perf_counter()
        status = 500  # unless a response starts

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        try:
            if scope["path"] in PROTECTED_PATHS:
                admitted = await self.access.admit(headers, path=scope["path"], request_id=request_id)
                if isinstance(admitted, APIError):
                    await error_response(admitted.status_code, admitted.code, admitted.message,
                                         headers=admitted.headers)(scope, receive, send_with_id)
                    return
                state["caller"] = admitted
            announced = headers.get("content-length", "")
            if is_predict and announced.isdigit() and int(announced) > self.max_upload_bytes + MULTIPART_OVERHEAD:
                response = error_response(413, "upload_too_large",
                                          f"the upload exceeds the {self.max_upload_bytes} byte limit")
                await response(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            if is_predict:
                model = state.get("model", "invalid")
                self.metrics.requests.labels(model=model, status=str(status)).inc()
                self.metrics.latency.labels(model=model, status=str(status)).observe(
                    time.perf_counter() - started)
                # Only the request id, model and status: never anything of the upload (patient data).
                logger.info("predict %s model=%s status=%s", request_id, model, status)
            elif is_study:
                logger.info("study %s model=%s status=%s", request_id, state.get("model", "invalid"), status)
            if (is_predict or is_study) and "caller" in state:  # refusals at the door are audited by admit
                self.access.audit_request(state, action=action_of(scope["path"]), status=status)


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
    )
    install_offline_docs(app)
    app.state.settings = settings
    app.state.metrics = metrics
    access = AccessControl(settings)
    app.state.access = access
    install_error_handlers(app)
    app.include_router(router)

    # Inside only the error middleware: it counts every answer, 422s and 500s included.
    app.add_middleware(RequestContext, max_upload_bytes=settings.max_upload_bytes, metrics=metrics,
                       access=access)
    return app
