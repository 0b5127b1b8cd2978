"""Who may use the page (Flask's test client, real local stores, real audit files): logins,
roles, throttling, session age, disabled accounts, the proxy and local modes, HSTS, the
page's own API key and the audit events all of these write."""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from ctscan.access.audit_trail import AuditEvent, read_events
from ctscan.access.keys_and_accounts import open_access
from ctscan.storage.store import open_store
from services.web.app import create_app

from .conftest import (
    ADMIN_ACCOUNT,
    ADMIN_PASSWORD,
    CLINICIAN,
    FAKE_PATIENT_ID,
    FAKE_PATIENT_NAME,
    WEB_API_KEY,
    ContractServer,
    clinician_client,
    csrf_token,
    ensure_account,
    log_in,
    phi_dicom,
    tiny_png,
)


def events(audit_dir: Path, **filters: Any) -> list[AuditEvent]:
    return list(read_events(audit_dir, **filters))


def audit_text(audit_dir: Path) -> str:
    return "".join(path.read_text() for path in sorted(audit_dir.rglob("*.jsonl")))


def post_image(client: FlaskClient, data: bytes, *, filename: str = "scan.png", **options: Any) -> Any:
    token = csrf_token(client.get("/", **options).get_data(as_text=True))
    return client.post("/predict", data={"csrf_token": token, "model": "ensemble", "explain": "y",
                                         "file": (io.BytesIO(data), filename)},
                       content_type="multipart/form-data", **options)


@pytest.fixture()
def app(make_settings: Callable[..., Any], contract_server: ContractServer, tmp_path: Path) -> Flask:
    """The page in accounts mode in front of the contract server, with a clinician and an
    admin account in its store and one version of a model to promote."""
    store = open_store(tmp_path / "store")
    for version in ("20260101T000000Z-aaaa", "20260102T000000Z-aaaa"):
        store.save("mobilenetv2", weights=b"w-" + version.encode(), version=version,
                   card={"architecture": "mobilenetv2", "input_size": 64, "threshold": 0.5, "metrics": {}})
    store.promote("mobilenetv2", "20260101T000000Z-aaaa")
    ensure_account(store.url, *CLINICIAN)
    ensure_account(store.url, *ADMIN_ACCOUNT, role="admin")
    return create_app(make_settings(inference_url=contract_server.url, model_store=store.url))


# --- anonymous ----------------------------------------------------------------------------------
def test_anonymous_pages_redirect_to_the_login(app: Flask, contract_server: ContractServer) -> None:
    client = app.test_client()
    for path in ("/", "/study", "/predict", "/admin"):
        response = client.get(path)
        assert response.status_code == 302, path
        assert response.headers["Location"] == f"/login?next={path}", path
    login_page = client.get("/login?next=/study").get_data(as_text=True)
    assert 'id="username"' in login_page and 'id="password"' in login_page and 'value="/study"' in login_page
    assert "Admin console" not in login_page and 'id="logout-button"' not in login_page
    # An upload without a session is refused before anything is sent on.
    token = csrf_token(login_page)
    response = client.post("/predict", data={"csrf_token": token, "model": "ensemble",
                                             "file": (io.BytesIO(tiny_png()), "scan.png")},
                           content_type="multipart/form-data")
    assert response.status_code == 401 and "Please log in" in response.get_data(as_text=True)
    assert contract_server.requests_seen == []
    # Probes and the stylesheet stay open.
    assert client.get("/healthz").status_code == 200
    assert client.get("/static/style.css").status_code == 200


def test_a_login_goes_back_to_the_page_asked_for(app: Flask) -> None:
    client = app.test_client()
    response = log_in(client, *CLINICIAN, next_page="/study")
    assert response.status_code == 302 and response.headers["Location"] == "/study"
    html = client.get("/study").get_data(as_text=True)
    assert 'id="study-form"' in html
    assert f"Logged in as <strong>{CLINICIAN[0]}</strong>" in html and 'id="logout-button"' in html


# --- roles --------------------------------------------------------------------------------------
def test_a_clinician_predicts_but_cannot_reach_the_console(app: Flask, contract_server: ContractServer,
                                                           tmp_path: Path) -> None:
    client = clinician_client(app)
    page = client.get("/").get_data(as_text=True)
    assert "Admin console" not in page  # no link for clinicians
    response = post_image(client, tiny_png())
    assert response.status_code == 200 and 'id="verdict"' in response.get_data(as_text=True)

    refused = client.get("/admin")
    assert refused.status_code == 403
    html = refused.get_data(as_text=True)
    assert "Administrators only" in html and "Training console" not in html
    assert client.get("/admin/jobs/table").status_code == 403
    token = csrf_token(page)
    promote = client.post("/admin/models/mobilenetv2/promote",
                          data={"csrf_token": token, "version": "20260102T000000Z-aaaa"})
    assert promote.status_code == 403
    assert open_store(tmp_path / "store").production("mobilenetv2") == "20260101T000000Z-aaaa"
    assert client.post("/admin/models/mobilenetv2/rollback", data={"csrf_token": token}).status_code == 403
    refusals = events(tmp_path / "audit", actor=CLINICIAN[0], action="promote")
    assert [(e.outcome, e.status) for e in refusals] == [("refused", 403)]


def test_an_admin_account_reaches_the_console_and_its_actions_are_audited(app: Flask, tmp_path: Path) -> None:
    client = app.test_client()
    assert log_in(client, *ADMIN_ACCOUNT, next_page="/admin").headers["Location"] == "/admin"
    page = client.get("/admin").get_data(as_text=True)
    assert "Training console" in page and "Admin console" in page
    assert client.get("/").status_code == 200  # admins analyse images too
    token = csrf_token(page)
    # Promote asks first (a confirmation page, nothing changed or audited), then acts on confirm=yes.
    client.post("/admin/models/mobilenetv2/promote", data={"csrf_token": token, "version": "20260102T000000Z-aaaa"})
    client.post("/admin/models/mobilenetv2/promote", data={"csrf_token": token, "version": "20260102T000000Z-aaaa",
                                                           "confirm": "yes"})
    client.post("/admin/models/mobilenetv2/rollback", data={"csrf_token": token})
    client.post("/admin/models/mobilenetv2/rollback", data={"csrf_token": token})  # nothing left to roll back
    client.post("/admin/models/mobilenetv2/promote", data={"csrf_token": token, "version": "20990101T000000Z-zzzz",
                                                           "confirm": "yes"})
    actions = [(e.action, e.outcome, e.model, e.model_version)
               for e in events(tmp_path / "audit", actor=ADMIN_ACCOUNT[0]) if e.action != "login"]
    assert actions == [("promote", "ok", "mobilenetv2", "20260102T000000Z-aaaa"),
                       ("rollback", "ok", "mobilenetv2", "20260101T000000Z-aaaa"),
                       ("rollback", "refused", "mobilenetv2", None),
                       ("promote", "refused", "mobilenetv2", "20990101T000000Z-zzzz")]
    assert all(e.actor_kind == "user" for e in events(tmp_path / "audit", actor=ADMIN_ACCOUNT[0]))
    # The store's history names who promoted.
    assert open_store(tmp_path / "store").production("mobilenetv2") == "20260101T000000Z-aaaa"


# --- logging in and out -------------------------------------------------------------------------
def test_logins_and_logouts_are_audited_without_what_was_typed(app: Flask, tmp_path: Path) -> None:
    client = app.test_client()
    assert log_in(client, CLINICIAN[0], "wrong-password-typed-1").status_code == 401
    # A password typed into the name field must not land in the audit trail.
    assert log_in(client, "hunter2-password-in-name", "x" * 12).status_code == 401
    assert log_in(client, "admin", "wrong-builtin-password").status_code == 401
    assert log_in(client, *CLINICIAN).status_code == 302
    page = client.get("/").get_data(as_text=True)
    assert client.post("/logout", data={"csrf_token": csrf_token(page)}).status_code == 302
    assert client.get("/").status_code == 302

    logins = [(e.action, e.actor, e.outcome, e.status, e.detail.get("reason"))
              for e in events(tmp_path / "audit") if e.action in ("login", "logout")]
    assert logins == [("login", CLINICIAN[0], "refused", 401, "bad_credentials"),
                      ("login", "unknown", "refused", 401, "bad_credentials"),
                      ("login", "admin", "refused", 401, "bad_credentials"),
                      ("login", CLINICIAN[0], "ok", 302, None),
                      ("logout", CLINICIAN[0], "ok", 302, None)]
    text = audit_text(tmp_path / "audit")
    for typed in ("wrong-password-typed-1", "hunter2", "wrong-builtin-password", CLINICIAN[1]):
        assert typed not in text


def test_login_sessions_start_afresh(app: Flask) -> None:
    client = app.test_client()
    with client.session_transaction() as session:
        session["planted"] = "by-an-attacker"
    log_in(client, *CLINICIAN)
    with client.session_transaction() as session:
        assert "planted" not in session
        assert session["user"] == CLINICIAN[0] and session["role"] == "clinician"
        assert isinstance(session["login_at"], float)


def test_guessing_from_one_address_is_throttled(app: Flask, tmp_path: Path) -> None:
    client = app.test_client()
    limit = app.extensions["ctscan_web"].login_throttle.limit
    for attempt in range(limit):  # a different name each time: only the address adds up
        assert log_in(client, f"guess{attempt}", "some-password-1").status_code == 401
    response = log_in(client, *CLINICIAN)  # even right credentials wait now
    assert response.status_code == 429
    assert "Too many failed attempts" in response.get_data(as_text=True)
    assert client.get("/").status_code == 302
    # Another address is not affected.
    other = app.test_client()
    assert log_in(other, *CLINICIAN, environ_base={"REMOTE_ADDR": "10.1.2.3"}).status_code == 302
    throttled = events(tmp_path / "audit", action="login", actor=CLINICIAN[0])
    assert ("refused", 429, "throttled") in [(e.outcome, e.status, e.detail.get("reason")) for e in throttled]


def test_guessing_one_name_from_many_addresses_is_delayed(app: Flask) -> None:
    # Exponential per name, skipped by the person's own browser: tests/web/test_security.py.
    client = app.test_client()
    free = app.extensions["ctscan_web"].name_delay.free
    for attempt in range(free):
        address = {"REMOTE_ADDR": f"10.9.0.{attempt + 1}"}
        assert log_in(client, CLINICIAN[0], f"guess-number-{attempt}", environ_base=address).status_code == 401
    fresh = {"REMOTE_ADDR": "10.9.1.1"}
    response = log_in(app.test_client(), CLINICIAN[0].upper(), CLINICIAN[1], environ_base=fresh)  # any case
    assert response.status_code == 429 and "Too many failed attempts" in response.get_data(as_text=True)
    # Other people log in from that address as usual.
    assert log_in(app.test_client(), *ADMIN_ACCOUNT, environ_base=fresh).status_code == 302


def test_behind_a_trusted_proxy_the_throttle_sees_each_persons_address(
        make_settings: Callable[..., Any], contract_server: ContractServer) -> None:
    app = create_app(make_settings(inference_url=contract_server.url, trusted_proxy_hops=1))
    ensure_account(app.extensions["ctscan_web"].settings.store.model_store, *CLINICIAN)
    limit = app.extensions["ctscan_web"].login_throttle.limit
    via_proxy = {"REMOTE_ADDR": "10.0.0.1"}  # the ingress, for everyone
    for attempt in range(limit):
        headers = {"X-Forwarded-For": "203.0.113.9"}
        assert log_in(app.test_client(), f"guess{attempt}", "some-password-1", environ_base=via_proxy,
                      headers=headers).status_code == 401
    blocked = log_in(app.test_client(), *CLINICIAN, environ_base=via_proxy, headers={"X-Forwarded-For": "203.0.113.9"})
    assert blocked.status_code == 429
    # Someone else behind the same proxy still logs in, and X-Forwarded-Proto makes it HTTPS.
    other = log_in(app.test_client(), *CLINICIAN, environ_base=via_proxy,
                   headers={"X-Forwarded-For": "198.51.100.7", "X-Forwarded-Proto": "https",
                            "Referer": "https://localhost/login"})
    assert other.status_code == 302 and other.headers["Strict-Transport-Security"]
    # Without trusted proxies the header is a client's word and changes nothing.
    plain = create_app(make_settings(inference_url=contract_server.url))
    for attempt in range(limit):
        log_in(plain.test_client(), f"guess{attempt}", "some-password-1",
               headers={"X-Forwarded-For": f"192.0.2.{attempt}"})
    assert log_in(plain.test_client(), *CLINICIAN, headers={"X-Forwarded-For": "192.0.2.99"}).status_code == 429


def test_a_session_older_than_session_hours_is_refused(make_settings: Callable[..., Any],
                                                      contract_server: ContractServer) -> None:
    app = create_app(make_settings(inference_url=contract_server.url, session_hours=1.0))
    client = clinician_client(app)
    assert client.get("/").status_code == 200
    # The cookie itself is still valid and signed: the server checks the login time.
    with client.session_transaction() as session:
        session["login_at"] = time.time() - 3600 - 60
    response = client.get("/")
    assert response.status_code == 302 and response.headers["Location"] == "/login?next=/"
    with client.session_transaction() as session:
        assert "user" not in session  # dropped, not merely ignored
    with client.session_transaction() as session:  # a login time in the future is refused too
        session.update({"user": CLINICIAN[0], "role": "clinician", "login_at": time.time() + 3600})
    assert client.get("/").status_code == 302


def test_a_disabled_account_is_logged_out_at_its_next_request(app: Flask, tmp_path: Path) -> None:
    services = app.extensions["ctscan_web"]
    assert services.auth.recheck_s <= 30
    services.auth.recheck_s = 0.5  # the test waits this long instead of the default
    client = clinician_client(app)
    assert client.get("/").status_code == 200
    open_access(str(tmp_path / "store")).disable_account(CLINICIAN[0])
    time.sleep(0.6)
    response = client.get("/")
    assert response.status_code == 302 and response.headers["Location"].startswith("/login")
    assert log_in(app.test_client(), *CLINICIAN).status_code == 401
    refused = events(tmp_path / "audit", action="login", actor=CLINICIAN[0])[-1]
    assert (refused.outcome, refused.detail.get("reason")) == ("refused", "disabled")


def test_the_built_in_admin_needs_its_password_setting(make_settings: Callable[..., Any]) -> None:
    without = create_app(make_settings(admin_password=None)).test_client()
    assert log_in(without, "admin", ADMIN_PASSWORD).status_code == 401
    with_password = create_app(make_settings()).test_client()
    assert log_in(with_password, "admin", ADMIN_PASSWORD, next_page="/admin").headers["Location"] == "/admin"


# --- predictions are audited --------------------------------------------------------------------
def test_a_prediction_is_audited_with_the_request_id_sent_and_no_patient_data(
        app: Flask, contract_server: ContractServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    client = clinician_client(app)
    dicom = phi_dicom()
    with caplog.at_level(logging.DEBUG):
        response = post_image(client, dicom, filename="Doe_Jane_FAKE-123456.dcm")
    assert response.status_code == 200
    sent = contract_server.requests_seen[-1]
    request_id = sent["headers"]["X-Request-ID"]
    (event,) = events(tmp_path / "audit", action="predict")
    assert (event.actor, event.actor_kind, event.request_id) == (CLINICIAN[0], "user", request_id)
    assert (event.model, event.model_version, event.outcome, event.status) == \
        ("ensemble", "ensemble-v1", "indeterminate", 200)
    assert event.upload_sha256 == hashlib.sha256(dicom).hexdigest()
    text = audit_text(tmp_path / "audit") + caplog.text
    for secret in (FAKE_PATIENT_NAME, FAKE_PATIENT_ID, "Doe", "Doe_Jane"):
        assert secret not in text


def test_a_refused_key_is_explained_and_audited(app: Flask, contract_server: ContractServer,
                                                tmp_path: Path) -> None:
    contract_server.mode = "unauthorised"
    client = clinician_client(app)
    response = post_image(client, tiny_png())
    assert response.status_code == 502
    assert "refused this page&#39;s credentials; tell the service desk" in response.get_data(as_text=True)
    (event,) = events(tmp_path / "audit", action="predict")
    assert (event.outcome, event.status) == ("unauthorised", 502)
    assert event.request_id == contract_server.requests_seen[-1]["headers"]["X-Request-ID"]


# --- proxy and local modes ----------------------------------------------------------------------
def test_proxy_mode_trusts_the_proxys_headers(make_settings: Callable[..., Any],
                                              contract_server: ContractServer, tmp_path: Path) -> None:
    client = create_app(make_settings(auth="proxy", inference_url=contract_server.url)).test_client()
    alice = {"X-Forwarded-User": "alice@hospital.example", "X-Forwarded-Groups": "radiology, staff"}
    page = client.get("/", headers=alice)
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "alice@hospital.example" in html and "(clinician)" in html and "Admin console" not in html
    assert 'id="logout-button"' not in html  # the proxy logs people out
    assert client.get("/admin", headers=alice).status_code == 403
    assert post_image(client, tiny_png(), headers=alice).status_code == 200
    (event,) = events(tmp_path / "audit", action="predict")
    assert event.actor == "alice@hospital.example"

    bob = {"X-Forwarded-User": "bob", "X-Forwarded-Groups": "staff,ctscan-admins"}
    assert "Training console" in client.get("/admin", headers=bob).get_data(as_text=True)

    # Without the proxy's header nobody is logged in, and there is no login form to use.
    anonymous = client.get("/")
    assert anonymous.status_code == 302 and anonymous.headers["Location"] == "/login?next=/"
    login_page = client.get("/login").get_data(as_text=True)
    assert 'id="proxy-login"' in login_page and 'id="password"' not in login_page
    token = csrf_token(client.get("/", headers=alice).get_data(as_text=True))
    assert client.post("/login", data={"csrf_token": token, "username": "admin",
                                       "password": ADMIN_PASSWORD}).status_code == 400
    assert client.get("/admin").status_code == 302


def test_local_mode_has_no_login(make_settings: Callable[..., Any], contract_server: ContractServer,
                                 tmp_path: Path) -> None:
    client = create_app(make_settings(auth="off", inference_url=contract_server.url)).test_client()
    html = client.get("/").get_data(as_text=True)
    assert "Local use, no login" in html and "Admin console" in html
    assert "Training console" in client.get("/admin").get_data(as_text=True)
    assert post_image(client, tiny_png()).status_code == 200
    (event,) = events(tmp_path / "audit", action="predict")
    assert (event.actor, event.actor_kind) == ("local", "user")


# --- transport ------------------------------------------------------------------------------------
def test_hsts_over_https_and_when_cookies_are_secure(make_settings: Callable[..., Any]) -> None:
    hsts = "max-age=31536000; includeSubDomains"
    app = create_app(make_settings())
    over_https = app.test_client().get("/login", base_url="https://localhost")
    assert over_https.headers["Strict-Transport-Security"] == hsts
    assert over_https.headers["Referrer-Policy"] == "same-origin"
    assert "Strict-Transport-Security" not in app.test_client().get("/login").headers
    secure = create_app(make_settings(session_cookie_secure=True))
    client = secure.test_client()
    assert client.get("/healthz").headers["Strict-Transport-Security"] == hsts
    ensure_account(secure.extensions["ctscan_web"].settings.store.model_store, *CLINICIAN)
    # Over HTTPS Flask-WTF also wants a same-site Referer (the page's Referrer-Policy sends it).
    response = log_in(client, *CLINICIAN, base_url="https://localhost",
                      headers={"Referer": "https://localhost/login"})
    assert response.status_code == 302
    cookie = response.headers["Set-Cookie"]
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie


def test_no_template_carries_inline_script_or_style() -> None:
    # The Content-Security-Policy allows neither; an inline one would silently not run.
    import re

    templates = Path(__file__).resolve().parents[2] / "services" / "web" / "templates"
    for template in templates.glob("*.html"):
        text = template.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)", text), template.name
        assert not re.search(r"\son[a-z]+=|\sstyle=|<style", text), template.name


# --- the page's own API key -----------------------------------------------------------------------
def test_the_page_registers_its_key_at_start(make_settings: Callable[..., Any], tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    access = open_access(str(tmp_path / "store"))
    create_app(make_settings(inference_api_key=WEB_API_KEY))
    record = access.find_key(WEB_API_KEY)
    assert record is not None and record.name == "web" and record.state() == "active"
    with caplog.at_level(logging.WARNING, logger="ctscan.web"):
        create_app(make_settings(inference_api_key=WEB_API_KEY))  # a restart: the same key again
    assert caplog.records == []

    other_key = "ctk_another-page-key-" + "z" * 20
    with caplog.at_level(logging.WARNING, logger="ctscan.web"):
        app = create_app(make_settings(inference_api_key=other_key))  # "web" is taken: starts anyway
    assert "could not be registered" in caplog.text and "an active key named 'web' exists" in caplog.text
    assert other_key not in caplog.text and WEB_API_KEY not in caplog.text
    assert app.test_client().get("/healthz").status_code == 200
    access.revoke_key("web")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ctscan.web"):
        create_app(make_settings(inference_api_key=WEB_API_KEY))
    assert "was revoked" in caplog.text and WEB_API_KEY not in caplog.text
