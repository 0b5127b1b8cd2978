"""The inference app factory: settings in, FastAPI app out; models load in the lifespan."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from ctscan import DISCLAIMER
from ctscan.store import open_store
from services.inference.errors import error_response, install_error_handlers
from services.inference.metrics import InferenceMetrics
from services.inference.registry import ModelRegistry
from services.inference.routes import request_id_for, router
from services.inference.settings import InferenceSettings, get_settings

logger = logging.getLogger(__name__)
# Multipart framing around the file; anything announced above limit + this is refused unread.
MULTIPART_OVERHEAD = 64 * 1024


def create_app(settings: InferenceSettings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = InferenceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = open_store(settings.store_url())
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
        version="1.0",
        description=f"COVID-19 chest-CT classification. {DISCLAIMER}",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    install_error_handlers(app)
    app.include_router(router)

    @app.middleware("http")
    async def request_context(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        request.state.request_id = request_id_for(request)
        is_predict = request.url.path == "/predict"
        started = time.perf_counter()
        announced = request.headers.get("content-length", "")
        if is_predict and announced.isdigit() and int(announced) > settings.max_upload_bytes + MULTIPART_OVERHEAD:
            response: Response = error_response(
                413, "upload_too_large",
                f"the upload exceeds the {settings.max_upload_bytes} byte limit")
        else:
            response = await call_next(request)
        response.headers["X-Request-ID"] = request.state.request_id
        if is_predict:
            model = getattr(request.state, "model", "invalid")
            status = str(response.status_code)
            metrics.requests.labels(model=model, status=status).inc()
            metrics.latency.labels(model=model, status=status).observe(time.perf_counter() - started)
            # Only the request id, model and status: never anything of the upload (patient data).
            logger.info("predict %s model=%s status=%s", request.state.request_id, model, status)
        return response

    return app
