"""HTTP for who may use the page: log in and out, the guard run before every request (the
route's stated access and body limit), and the audit events that name the user.

The decisions themselves (passwords, session age, ended sessions, disabled accounts, proxy
headers, throttles) are in `services.web.auth`; this module only translates them to
redirects, 401, 403, 413 and 429.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, current_app, flash, g, jsonify, redirect, render_template, request, session, url_for
from itsdangerous import BadSignature, URLSafeTimedSerializer
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.wrappers import Response as WerkzeugResponse

from ctscan.access.audit_trail import ActorKind
from services.web.auth import (
    BUILTIN_ADMIN,
    STORE_READ_ERRORS,
    Access,
    Role,
    User,
    allow,
    body_limit,
    rule_of,
    username_key,
    wait_words,
)
from services.web.extensions import services
from services.web.forms import LoginForm

log = logging.getLogger("ctscan.web")

account = Blueprint("account", __name__)

RouteResult = Any
# Admin routes whose refusals are audited too (an attempt to change what is served).
ADMIN_ACTIONS = {"admin.queue_job": "job_queue", "admin.cancel_job": "job_cancel",
                 "admin.promote": "promote", "admin.rollback": "rollback"}


def current_user() -> User | None:
    """The user of this request (looked up once per request)."""
    if "ctscan_user" not in g:
        g.ctscan_user = services().auth.user_of(session, request.headers.get)
        if g.ctscan_user is None and session.get("user"):
            session.clear()  # expired, disabled or deleted: the cookie is dropped as well
    user: User | None = g.ctscan_user
    return user


def current_name() -> str:
    user = current_user()
    return user.username if user else "anonymous"


def audit(*, action: str, outcome: str, actor: str | None = None, **fields: Any) -> None:
    """One audit event, naming `actor` (a typed login name) or else the user of this request."""
    if actor is None:
        user = current_user()
        actor = user.username if user else None
    kind: ActorKind = "user" if actor else "anonymous"
    services().trail.record(action=action, outcome=outcome, actor=actor or "anonymous", actor_kind=kind, **fields)


def guard() -> RouteResult | None:
    """Run before every request, before CSRF and before the body is read: the matched route's
    stated access and body limit. A route that states nothing is refused to everyone."""
    view = current_app.view_functions.get(request.endpoint or "")
    if view is None:
        return None  # no route: Flask answers 404 / 405
    rule = rule_of(view)
    if rule is None:
        log.error("route %s declares no access: refused to everyone", request.endpoint)
        return _refusal(403, "Not allowed", "This address is not open to anyone.")
    limit = body_limit(rule, services().settings)
    # Refused unread, also for strangers; and a body without a length stops at the limit.
    request.max_content_length = limit
    if (request.content_length or 0) > limit:
        raise RequestEntityTooLarge()
    if rule.access is Access.PUBLIC:
        return None
    return require("admin" if rule.access is Access.ADMIN else "clinician")


def require(role: Role) -> RouteResult | None:
    """Run before each route of a blueprint: None to go on, else the refusal. Pages (GET) send
    people to the login; anything else answers 401 without a session and 403 without the role."""
    user = current_user()
    polling = request.path.endswith("/jobs/table")  # the console's script, not a person
    if user is None:
        if request.method == "GET" and not polling:
            return redirect(url_for("account.login", next=request.path))
        _audit_refused(401)
        return _refusal(401, "Login required", "Please log in to use this page.")
    if not user.may(role):
        _audit_refused(403)
        return _refusal(403, "Administrators only",
                        f"You are logged in as {user.username} ({user.role}). The training console is for "
                        "administrators; ask one if you need to train, promote or roll back models.")
    return None


def _audit_refused(status: int) -> None:
    action = ADMIN_ACTIONS.get(request.endpoint or "")
    if action and request.method == "POST":
        audit(action=action, outcome="refused", status=status, detail={"reason": "role"})


def _refusal(status: int, title: str, message: str) -> RouteResult:
    if request.accept_mimetypes.best == "application/json":
        return jsonify({"error": {"code": str(status), "message": message}}), status
    return render_template("error.html", title=title, message=message, status=status), status


def safe_next(target: str | None) -> str:
    # Only a path on this site: never send someone who just logged in to another one.
    if (target and target.startswith("/") and not target.startswith("//") and "\\" not in target
            and not urlsplit(target).netloc and not target.startswith(("/login", "/admin/login"))):
        return target
    return url_for("clinic.index")


def _login_page(form: LoginForm, *, error: str | None = None, status: int = 200) -> RouteResult:
    return render_template("login.html", form=form, error=error), status


@account.route("/login", methods=["GET", "POST"])
@account.route("/admin/login", methods=["GET", "POST"], endpoint="admin_login")  # old bookmarks
@allow(Access.PUBLIC)
def login() -> RouteResult:
    settings = services().settings
    if settings.auth != "accounts":
        # proxy: the proxy logs people in; off: nobody logs in. The page says which.
        return render_template("login.html", form=None, error=None), 200 if request.method == "GET" else 400
    form = LoginForm()
    if request.method == "GET":
        form.next.data = request.args.get("next", "")
        return _login_page(form)
    address = request.remote_addr or "unknown"
    typed_name = (form.username.data or "").strip()
    name_key = username_key(typed_name)
    known_browser = bool(typed_name) and _device_of(request.cookies.get(DEVICE_COOKIE)) == name_key
    name_wait = 0.0 if known_browser or not typed_name else services().name_delay.wait_s(name_key)
    if services().login_throttle.blocked(address) or name_wait > 0:
        actor = typed_name if _exists(typed_name) else "unknown"
        audit(action="login", outcome="refused", actor=actor, status=429,
              detail={"reason": "throttled", "address": address})
        wait = f"{wait_words(name_wait)}" if name_wait > 0 else "a few minutes"
        return _login_page(form, error=f"Too many failed attempts. Please wait {wait} before you try "
                                       "again.", status=429)
    if not form.validate_on_submit():
        return _login_page(form, error="Please enter your user name and password.", status=400)
    try:
        result = services().auth.login(typed_name, form.password.data)
    except STORE_READ_ERRORS as exc:
        log.warning("login could not be checked: %s", type(exc).__name__)
        return _login_page(form, error="Logins cannot be checked right now. Please try again in a few minutes.",
                           status=503)
    if result.user is None:
        services().login_throttle.fail(address)
        if not known_browser:  # the person's own browser never delays their name for others
            services().name_delay.fail(name_key)
        log.warning("login refused for %s from %s (%s)", result.actor, address, result.reason)
        audit(action="login", outcome="refused", actor=result.actor, status=401,
              detail={"reason": result.reason, "address": address})
        return _login_page(form, error="That user name or password is not correct.", status=401)
    services().login_throttle.clear(address)
    services().name_delay.clear(name_key)
    services().auth.start_session(session, result.user, builtin=result.user.username == BUILTIN_ADMIN
                                  and services().settings.admin_password is not None)
    session.permanent = True
    g.ctscan_user = result.user
    log.info("login %s (%s) from %s", result.user.username, result.user.role, address)
    audit(action="login", outcome="ok", actor=result.user.username, status=302, detail={"address": address})
    response = redirect(safe_next(form.next.data))
    _remember_device(response, name_key)
    return response


# A browser that has logged in as a person: guesses at that name from elsewhere do not delay it.
DEVICE_COOKIE = "ctscan_device"
DEVICE_DAYS = 90


def _device_signer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(current_app.secret_key or "", salt="ctscan-device")


def _device_of(cookie: str | None) -> str | None:
    if not cookie:
        return None
    try:
        name = _device_signer().loads(cookie, max_age=DEVICE_DAYS * 86400)
    except BadSignature:
        return None
    return name if isinstance(name, str) else None


def _remember_device(response: WerkzeugResponse, name_key: str) -> None:
    response.set_cookie(DEVICE_COOKIE, _device_signer().dumps(name_key), max_age=DEVICE_DAYS * 86400,
                        httponly=True, samesite="Lax", secure=services().settings.session_cookie_secure)


def _exists(username: str) -> bool:
    try:
        return bool(username) and services().auth.account_exists(username)
    except STORE_READ_ERRORS:
        return False


@account.post("/logout")
@account.post("/admin/logout", endpoint="admin_logout")
@allow(Access.PUBLIC)  # logging out needs no session (and does nothing without one)
def logout() -> RouteResult:
    # CSRFProtect has already checked the token before this runs.
    user = current_user()
    if user is not None and services().settings.auth == "accounts":
        try:
            # Every session of this person ends, here at once: a copied cookie is refused too.
            services().auth.end_sessions(user.username)
        except STORE_READ_ERRORS as exc:
            log.warning("ending the sessions of %s failed: %s", user.username, type(exc).__name__)
            flash("You are logged out on this browser, but the server could not end your other sessions; "
                  "tell the service desk.", "error")
        audit(action="logout", outcome="ok", actor=user.username, status=302)
    session.clear()
    flash("You have been logged out.", "info")
    return redirect(url_for("account.login"))


@account.get("/healthz")
@allow(Access.PUBLIC)
def healthz() -> RouteResult:
    # Liveness of the web process only: a slow inference service must not get it restarted.
    return jsonify({"status": "ok"})
