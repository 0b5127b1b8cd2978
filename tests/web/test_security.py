"""The attacks of issue 24 (and 23's default-deny walk) run against the web page: every route
states its access; an oversize anonymous body is refused unread; uploads never reach a
temporary file; a cookie saved before logout (or a password, role or account change) is
refused; guessing one name from many addresses slows the guesser, not the person; the page
names each person to the API and shows "too many requests, wait N s"."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from harness import TempFileWatch
from werkzeug.datastructures import FileStorage
from werkzeug.test import encode_multipart

from ctscan.access.audit_trail import read_events
from ctscan.access.keys_and_accounts import open_access
from services.web.app import create_app
from services.web.auth import NameDelay

from .conftest import ADMIN_ACCOUNT, ADMIN_PASSWORD, CLINICIAN, ContractServer, csrf_token, ensure_account, log_in

# What anyone may reach: the login (and its old address), logging out, the probe, static files.
PUBLIC_ENDPOINTS = {"account.login", "account.admin_login", "account.logout", "account.admin_logout",
                    "account.healthz", "static"}


@pytest.fixture()
def app(make_settings: Callable[..., Any], contract_server: ContractServer, tmp_path: Path) -> Flask:
    store = str(tmp_path / "store")
    ensure_account(store, *CLINICIAN)
    ensure_account(store, *ADMIN_ACCOUNT, role="admin")
    return create_app(make_settings(inference_url=contract_server.url, model_store=store, max_upload_mb=4.0,
                                    max_study_mb=8.0))


def _concrete(rule: str) -> str:
    return re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"\1", rule)


def test_only_the_declared_public_routes_answer_without_a_session(app: Flask) -> None:
    client = app.test_client()
    walked: dict[str, tuple[str, int]] = {}
    for rule in app.url_map.iter_rules():
        path = _concrete(rule.rule) + ("style.css" if rule.endpoint == "static" else "")
        path = path.replace("/static/filename", "/static/")
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            response = client.open(path, method=method)
            walked[f"{method} {path}"] = (rule.endpoint, response.status_code)
    assert len(walked) >= 15, walked
    refused_statuses = {401, 403}
    for entry, (endpoint, status) in walked.items():
        if endpoint in PUBLIC_ENDPOINTS:
            # Open (a POST without its CSRF token is refused by CSRF, not by the guard).
            assert status not in refused_statuses and not (status == 302 and entry.startswith("GET")), entry
        elif entry.startswith("GET") and endpoint != "admin.jobs_table":
            assert status == 302 and endpoint != "static", (entry, status)  # to the login
        elif entry.startswith("GET"):
            assert status == 401, (entry, status)  # the console's polling script: no redirect
        else:
            assert status == 401, (entry, status)
    assert {endpoint for endpoint, _ in walked.values()} >= PUBLIC_ENDPOINTS


def test_a_route_that_states_no_access_is_refused_to_everyone(make_settings: Callable[..., Any],
                                                             contract_server: ContractServer) -> None:
    app = create_app(make_settings(inference_url=contract_server.url))

    @app.get("/undeclared")
    def undeclared() -> str:
        return "patient data"

    anonymous = app.test_client().get("/undeclared")
    assert anonymous.status_code == 403
    admin = app.test_client()
    assert log_in(admin, "admin", ADMIN_PASSWORD).status_code == 302
    refused = admin.get("/undeclared")
    assert refused.status_code == 403 and "patient data" not in refused.get_data(as_text=True)


class CountingStream(io.RawIOBase):
    """A request body that counts what the server reads of it (the attack's 100 MB)."""

    def __init__(self, size: int) -> None:
        self.size, self.read_bytes = size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0  # the test client rewinds before sending; nothing has been read then

    def readinto(self, buffer: Any) -> int:
        count = min(len(buffer), self.size - self.read_bytes)
        buffer[:count] = b"x" * count
        self.read_bytes += count
        return count


@pytest.mark.parametrize("path", ["/login", "/predict", "/study"])
def test_an_oversize_anonymous_post_is_refused_unread(app: Flask, path: str) -> None:
    body = CountingStream(100 * 1024 * 1024)
    response = app.test_client().post(path, input_stream=body, content_type="multipart/form-data; boundary=x",
                                      environ_overrides={"CONTENT_LENGTH": str(body.size)})
    assert response.status_code == 413
    assert body.read_bytes == 0


def test_a_login_form_of_more_than_64_kb_is_refused_unread(app: Flask) -> None:
    body = CountingStream(200 * 1024)
    response = app.test_client().post("/login", input_stream=body, content_type="application/x-www-form-urlencoded",
                                      environ_overrides={"CONTENT_LENGTH": str(body.size)})
    assert response.status_code == 413 and body.read_bytes == 0


def test_uploads_never_reach_a_temporary_file(app: Flask, contract_server: ContractServer,
                                              temp_file_watch: TempFileWatch) -> None:
    client = app.test_client()
    assert log_in(client, *CLINICIAN).status_code == 302
    token = csrf_token(client.get("/").get_data(as_text=True))
    # 3 MB: far above Werkzeug's 500 KB spool threshold, within this page's 4 MB limit. The
    # bodies are encoded in memory first (the test client would spool its own copy).
    upload = b"PATIENT^NAME" + b"\0" * (3 * 1024 * 1024)
    temp_file_watch.on = False
    single = encode_multipart({"csrf_token": token, "model": "ensemble",
                               "file": FileStorage(io.BytesIO(upload), "scan.dcm")})
    series = encode_multipart({"csrf_token": token, "model": "ensemble",
                               "files": [FileStorage(io.BytesIO(upload), "a.dcm"),
                                         FileStorage(io.BytesIO(upload), "b.dcm")]})
    temp_file_watch.on = True
    response = client.post("/predict", data=single[1], content_type=f"multipart/form-data; boundary={single[0]}")
    assert response.status_code in (200, 415), response.status_code  # read in full, then checked
    study = client.post("/study", data=series[1], content_type=f"multipart/form-data; boundary={series[0]}")
    assert study.status_code in (200, 415, 422), study.status_code
    assert temp_file_watch.opened == []


def _session_cookie(client: Any) -> str:
    cookie = client.get_cookie("ctscan_session")
    assert cookie is not None
    return str(cookie.value)


def test_a_cookie_saved_before_logout_is_refused(app: Flask, make_settings: Callable[..., Any],
                                                 contract_server: ContractServer) -> None:
    client = app.test_client()
    assert log_in(client, *CLINICIAN).status_code == 302
    saved = _session_cookie(client)
    # A second browser of the same person, and another replica of the page on the same store.
    other_browser = app.test_client()
    assert log_in(other_browser, *CLINICIAN).status_code == 302
    replica = create_app(app.extensions["ctscan_web"].settings)
    replica.extensions["ctscan_web"].auth.recheck_s = 0.0  # what the default 30 s comes to
    replica_client = replica.test_client()
    replica_client.set_cookie("ctscan_session", saved)
    assert replica_client.get("/").status_code == 200

    token = csrf_token(client.get("/").get_data(as_text=True))
    assert client.post("/logout", data={"csrf_token": token}).status_code == 302
    thief = app.test_client()
    thief.set_cookie("ctscan_session", saved)
    replayed = thief.get("/")
    assert replayed.status_code == 302 and replayed.headers["Location"].startswith("/login")
    assert other_browser.get("/").status_code == 302  # every session of that person ended
    assert replica_client.get("/").status_code == 302
    # Logging in again works at once.
    assert log_in(client, *CLINICIAN).status_code == 302 and client.get("/").status_code == 200


@pytest.mark.parametrize("change", ["password", "role", "disable", "remove"])
def test_account_changes_end_every_session(app: Flask, change: str) -> None:
    client = app.test_client()
    assert log_in(client, *CLINICIAN).status_code == 302
    assert client.get("/").status_code == 200
    access = open_access(app.extensions["ctscan_web"].settings.store.model_store)
    {"password": lambda: access.set_password(CLINICIAN[0], "a-new-password-4711"),
     "role": lambda: access.set_role(CLINICIAN[0], "admin"),
     "disable": lambda: access.disable_account(CLINICIAN[0]),
     "remove": lambda: access.remove_account(CLINICIAN[0])}[change]()
    app.extensions["ctscan_web"].auth.recheck_s = 0.0  # the test does not wait the 30 s
    assert client.get("/").status_code == 302


def test_the_built_in_admins_sessions_end_at_logout_too(app: Flask) -> None:
    client = app.test_client()
    assert log_in(client, "admin", ADMIN_PASSWORD).status_code == 302
    saved = _session_cookie(client)
    token = csrf_token(client.get("/").get_data(as_text=True))
    client.post("/logout", data={"csrf_token": token})
    thief = app.test_client()
    thief.set_cookie("ctscan_session", saved)
    assert thief.get("/admin").status_code == 302


def test_guessing_a_name_from_many_addresses_slows_the_guesser_not_the_person(app: Flask, tmp_path: Path) -> None:
    # The person logged in before from their own browser (it keeps a signed device cookie).
    own_browser = app.test_client()
    assert log_in(own_browser, *CLINICIAN, environ_base={"REMOTE_ADDR": "10.1.0.1"}).status_code == 302
    token = csrf_token(own_browser.get("/").get_data(as_text=True))
    own_browser.post("/logout", data={"csrf_token": token})
    # The attack as run: 10 wrong passwords for that name from three addresses.
    attacker = app.test_client()
    statuses = [log_in(attacker, CLINICIAN[0], f"guess-{n}", environ_base={"REMOTE_ADDR": f"10.9.0.{n % 3}"}
                       ).status_code for n in range(10)]
    free = app.extensions["ctscan_web"].name_delay.free
    assert statuses[:free] == [401] * free and 429 in statuses[free:]  # slowed after the free tries
    # A fresh address without the cookie waits (even with the right password)...
    stranger = log_in(app.test_client(), *CLINICIAN, environ_base={"REMOTE_ADDR": "10.9.9.9"})
    assert stranger.status_code == 429 and "Please wait" in stranger.get_data(as_text=True)
    # ...but the person's own browser, now from a fourth address, is not locked out.
    assert log_in(own_browser, *CLINICIAN, environ_base={"REMOTE_ADDR": "10.2.0.2"}).status_code == 302
    refused = [e for e in read_events(tmp_path / "audit", action="login") if e.status == 429]
    assert refused and all(e.detail.get("reason") == "throttled" for e in refused)


def test_the_name_delay_doubles_and_is_capped() -> None:
    now = [0.0]
    delay = NameDelay(free=3, base_s=1.0, max_s=60.0, clock=lambda: now[0])
    for _ in range(3):
        delay.fail("alice")
    assert delay.wait_s("alice") == 1.0
    waits = []
    for _ in range(8):
        now[0] += delay.wait_s("alice")
        delay.fail("alice")
        waits.append(delay.wait_s("alice"))
    assert waits == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert delay.wait_s("bob") == 0.0
    now[0] += 3601
    assert delay.wait_s("alice") == 0.0  # forgotten an hour after the last failure


def test_the_page_names_the_person_and_says_how_long_to_wait(app: Flask, contract_server: ContractServer,
                                                             tmp_path: Path) -> None:
    from .conftest import tiny_png

    client = app.test_client()
    assert log_in(client, *CLINICIAN).status_code == 302
    token = csrf_token(client.get("/").get_data(as_text=True))

    def predict() -> Any:
        return client.post("/predict", data={"csrf_token": token, "model": "ensemble",
                                             "file": (io.BytesIO(tiny_png()), "scan.png")},
                           content_type="multipart/form-data")

    assert predict().status_code == 200
    assert contract_server.requests_seen[-1]["headers"]["X-CTScan-User"] == CLINICIAN[0]
    contract_server.mode = "busy"  # the service's answer to this person's 31st request a minute
    busy = predict()
    page = busy.get_data(as_text=True)
    assert busy.status_code == 429 and "Too many requests: please wait 7 s" in page
    events = [e for e in read_events(tmp_path / "audit", action="predict") if e.outcome == "rate_limited"]
    assert [(e.actor, e.status) for e in events] == [(CLINICIAN[0], 429)]
