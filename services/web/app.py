"""Flask application factory: settings, security headers, CSRF, error pages, blueprints."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from flask import Flask, Request, Response, jsonify, render_template, request
from flask_wtf.csrf import CSRFError, CSRFProtect  # type: ignore[import-untyped]
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.middleware.proxy_fix import ProxyFix

from ctscan import DISCLAIMER
from ctscan.imaging.formats import accept_attribute
from ctscan.settings import WebSettings, get_web_settings
from ctscan.storage.store import ModelStore
from services.web.access_views import account, current_user, guard
from services.web.auth import Access, allow, register_page_key
from services.web.console import JobsClientLike, default_jobs_client, default_store
from services.web.extensions import WebServices, services
from services.web.inference_client import InferenceClient
from services.web.views import admin, clinic, render_index, render_study

log = logging.getLogger("ctscan.web")

# Images are shown inline as data: URLs; nothing is loaded from other origins.
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                           "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


class InMemoryRequest(Request):
    """Werkzeug spools each uploaded file above 500 KB to a temporary file, where a DICOM's
    patient data would sit on the disk; here every part stays in memory. Bodies are bounded
    before they are read (`access_views.guard`: the route's limit, by Content-Length and while
    streaming), so memory is bounded too."""

    def _get_file_stream(self, total_content_length: int | None, content_type: str | None,
                         filename: str | None = None, content_length: int | None = None) -> io.BytesIO:
        return io.BytesIO()


def create_app(settings: WebSettings | None = None, *, inference: InferenceClient | None = None,
               jobs_client_factory: Callable[[], JobsClientLike] | None = None,
               store_factory: Callable[[str], ModelStore] | None = None) -> Flask:
    settings = settings or get_web_settings()
    app = Flask(__name__, static_folder="static", template_folder="templates")
    app.request_class = InMemoryRequest
    allow(Access.PUBLIC)(app.view_functions["static"])  # the stylesheet and scripts
    app.config.update(
        SECRET_KEY=settings.secret_key.get_secret_value(),
        # The larger limit is the study page's; /predict checks its own (one slice).
        MAX_CONTENT_LENGTH=max(settings.max_upload_bytes, settings.max_study_bytes),
        # Form fields in memory (files: InMemoryRequest); uploads must never touch the disk.
        MAX_FORM_MEMORY_SIZE=settings.max_upload_bytes,
        SESSION_COOKIE_NAME="ctscan_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.session_cookie_secure,
        PERMANENT_SESSION_LIFETIME=timedelta(hours=settings.session_hours),
        MAX_FORM_PARTS=settings.max_study_files + 10,  # a study's slices, and the form's fields
        WTF_CSRF_TIME_LIMIT=int(settings.session_hours * 3600),
    )
    if settings.trusted_proxy_hops:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxy_hops,  # type: ignore[method-assign]
                                x_proto=settings.trusted_proxy_hops)
    api_key = settings.inference_api_key.get_secret_value().strip() if settings.inference_api_key else None
    app.extensions["ctscan_web"] = WebServices(
        settings=settings,
        inference=inference or InferenceClient(
            settings.inference_url, connect_timeout_s=settings.inference_connect_timeout_s,
            read_timeout_s=settings.inference_read_timeout_s, retries=settings.inference_retries,
            study_timeout_s=settings.inference_study_timeout_s, api_key=api_key),
        jobs_client_factory=jobs_client_factory or default_jobs_client,
        store_factory=store_factory or default_store,
    )
    register_page_key(settings)
    if settings.auth != "accounts":
        log.warning("WEB_AUTH=%s: %s", settings.auth,
                    "people are named by the proxy's headers, which it must strip from clients"
                    if settings.auth == "proxy" else "no login; everyone is clinician and admin (local use only)")

    app.register_blueprint(account)
    app.register_blueprint(clinic)
    app.register_blueprint(admin)
    # The guard runs before CSRF's check, which reads the form: an oversize or anonymous
    # upload is refused unread.
    app.before_request(guard)
    CSRFProtect(app)

    @app.context_processor
    def _globals() -> dict[str, Any]:
        return {"disclaimer": DISCLAIMER, "max_upload_mb": settings.max_upload_mb,
                "max_study_mb": settings.max_study_mb, "max_study_files": settings.max_study_files,
                "accept_formats": accept_attribute(), "current_user": current_user(),
                "auth_mode": settings.auth}

    @app.after_request
    def _security_headers(response: Response) -> Response:
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        # Same-origin only: Flask-WTF refuses an HTTPS form post without a Referer from this
        # site (WTF_CSRF_SSL_STRICT), and other sites still learn nothing.
        response.headers.setdefault("Referrer-Policy", "same-origin")
        if request.is_secure or settings.session_cookie_secure:
            # Browsers then refuse plain HTTP to this host for a year: no downgrade of the login.
            response.headers.setdefault("Strict-Transport-Security", "max-age=31536000; includeSubDomains")
        if not request.path.startswith("/static/"):
            # Result pages hold a patient's image: no browser or proxy cache may keep them.
            response.headers["Cache-Control"] = "no-store"
        return response

    _register_error_pages(app)
    return app


def _wants_json() -> bool:
    return request.path in ("/healthz",) or request.accept_mimetypes.best == "application/json"


def _error_page(status: int, title: str, message: str) -> tuple[Any, int]:
    if _wants_json():
        return jsonify({"error": {"code": str(status), "message": message}}), status
    return render_template("error.html", title=title, message=message, status=status), status


def _register_error_pages(app: Flask) -> None:
    @app.errorhandler(CSRFError)
    def _csrf(_: CSRFError) -> tuple[Any, int]:
        return _error_page(400, "This form has expired",
                           "The form was missing its security token or it had expired. Please go "
                           "back, reload the page and try again.")

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(_: RequestEntityTooLarge) -> tuple[Any, int]:
        limit = services().settings.max_upload_mb
        if current_user() is None:  # raised before the route's guard ran: no form for strangers
            return _error_page(413, "Too large", f"The request is larger than the {limit:g} MB limit.")
        if request.path == "/study":
            study_limit = services().settings.max_study_mb
            return render_study(error=f"These files are larger than the {study_limit:g} MB limit for a "
                                      "study (or too many). Please send one series.", status=413)
        if request.path == "/predict":
            return render_index(error=f"This file is larger than the {limit:g} MB limit. Please "
                                      "upload a single CT slice (PNG, JPEG or DICOM).", status=413)
        return _error_page(413, "Too large", f"The request is larger than the {limit:g} MB limit.")

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> tuple[Any, int]:
        status = exc.code or 500
        titles = {404: "Page not found", 405: "Not allowed", 401: "Login required", 403: "Not allowed"}
        messages = {404: "There is no page at this address.",
                    405: "This address does not accept that kind of request.",
                    401: "Please log in to use this page.",
                    403: "Your account may not do this."}
        return _error_page(status, titles.get(status, "Request refused"),
                           messages.get(status, exc.description or "The request was refused."))

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Any, int]:
        # Logged for operators (type and message only); people never see a traceback.
        log.exception("unexpected error on %s %s", request.method, request.path)
        return _error_page(500, "Something went wrong",
                           "An unexpected problem stopped this page. Please try again; if it "
                           "keeps happening, tell the service desk.")
