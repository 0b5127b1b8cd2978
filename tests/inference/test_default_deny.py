"""Access refused by default on the real inference app (over HTTP, auth on): every route
declared where it is written; without a credential only the public probes and documentation
answer; a route that states nothing is refused to everyone; every upload route gets the
early 413, the metrics and the audit event; the server mints its own request ids; uploads
never reach a temporary file."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from fastapi import File, UploadFile
from harness import TempFileWatch, serve_app_in_thread
from starlette.routing import Mount

from ctscan.access.audit_trail import read_events
from ctscan.access.keys_and_accounts import PAGE_KEY_NAME, open_access

KEY = "ctk_default-deny-tests-" + "d" * 24
PAGE_KEY = "ctk_default-deny-page-" + "p" * 24
# What anyone may fetch: the probes, the metrics (kept inside the cluster by k8s) and the
# API's documentation. Anything else must need a key.
PUBLIC_PATHS = {"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect",
                "/docs-static"}


def _app(store: Path, audit_dir: Path, **settings: object) -> Any:
    from ctscan.settings import AuditSettings, InferenceSettings, StoreSettings
    from services.inference.app import create_app

    settings = {"auth": "keys", **settings}
    return create_app(InferenceSettings.from_values(
        _env_file=None, models=["mobilenetv2"], reload_poll_seconds=0, verification_dir=str(store),
        store=StoreSettings.from_values(_env_file=None, model_store=str(store)),
        audit=AuditSettings.from_values(_env_file=None, audit_dir=str(audit_dir)), **settings))


@pytest.fixture()
def app_url(tmp_path: Path) -> Iterator[tuple[Any, str, Path]]:
    store = tmp_path / "store"
    access = open_access(str(store))
    access.register_key("tests", KEY, rate_limit_per_minute=100_000)
    access.register_key(PAGE_KEY_NAME, PAGE_KEY)
    app = _app(store, tmp_path / "audit", max_upload_bytes=4 * 1024 * 1024, max_study_bytes=8 * 1024 * 1024,
               user_rate_limit_per_minute=3)
    with serve_app_in_thread(app) as url:
        yield app, url, tmp_path / "audit"


def _concrete(path: str) -> str:
    return path.replace("{", "").replace("}", "")


def test_only_the_declared_public_routes_answer_without_a_key(app_url: tuple[Any, str, Path]) -> None:
    app, url, _ = app_url
    from services.inference.auth import flat_routes

    walked: dict[str, int] = {}
    for route in flat_routes(app.routes):
        if isinstance(route, Mount):
            paths, methods = [route.path + "/swagger-ui.css"], ["GET"]
        else:
            paths, methods = [_concrete(route.path)], sorted(route.methods or {"GET"})
        for path in paths:
            for method in methods:
                if method == "HEAD":
                    continue
                response = requests.request(method, url + path, timeout=30)
                walked[f"{method} {path}"] = response.status_code
    assert len(walked) >= 10, walked  # every route of the app was tried, not a few
    def route_of(entry: str) -> str:
        path = entry.split(" ")[1]
        return "/docs-static" if path.startswith("/docs-static/") else path

    answered = {route_of(entry) for entry, status in walked.items() if status not in (401, 403)}
    assert answered == PUBLIC_PATHS, walked
    refused = {entry: status for entry, status in walked.items() if route_of(entry) not in answered}
    assert refused and set(refused.values()) == {401}, refused  # a key is what they lack
    # With the key the same routes answer (an empty store: no model is loaded yet).
    assert requests.get(url + "/models", headers={"X-API-Key": KEY}, timeout=30).status_code == 200


def test_a_route_that_states_no_access_is_refused_even_with_a_key(tmp_path: Path) -> None:
    from services.inference.routes import router

    @router.get("/toy/undeclared")
    async def undeclared() -> dict[str, str]:
        return {"patient": "data"}

    try:
        store = tmp_path / "store"
        open_access(str(store)).register_key("tests", KEY)
        for auth in ("keys", "off"):
            with serve_app_in_thread(_app(store, tmp_path / "audit", auth=auth)) as url:
                for headers in ({}, {"X-API-Key": KEY}):
                    response = requests.get(url + "/toy/undeclared", headers=headers, timeout=30)
                    assert response.status_code == 403, (auth, headers, response.text)
                    assert response.json()["error"]["code"] == "access_undeclared"
    finally:
        router.routes[:] = [r for r in router.routes if getattr(r, "path", "") != "/toy/undeclared"]


def test_a_new_upload_route_gets_the_early_413_metrics_and_audit(tmp_path: Path) -> None:
    from services.inference.auth import API_KEY
    from services.inference.routes import router

    @router.post("/toy/upload", dependencies=[API_KEY])
    async def toy_upload(file: UploadFile = File(...)) -> dict[str, int]:  # noqa: B008 (FastAPI's idiom)
        return {"bytes": len(await file.read())}

    try:
        store = tmp_path / "store"
        open_access(str(store)).register_key("tests", KEY, rate_limit_per_minute=100_000)
        with serve_app_in_thread(_app(store, tmp_path / "audit", max_upload_bytes=100_000)) as url:
            ok = requests.post(url + "/toy/upload", files={"file": ("a", b"x" * 1000)},
                               headers={"X-API-Key": KEY}, timeout=30)
            assert ok.status_code == 200 and ok.json() == {"bytes": 1000}
            # Announced too large: refused before a byte of the body is read.
            big = requests.post(url + "/toy/upload", files={"file": ("a", b"x" * 400_000)},
                                headers={"X-API-Key": KEY}, timeout=30)
            assert big.status_code == 413 and big.json()["error"]["code"] == "upload_too_large"
            # Streamed without a length (chunked): refused once it passes the limit.
            chunked = requests.post(url + "/toy/upload", data=_chunked_multipart(400_000),
                                    headers={"X-API-Key": KEY, "Content-Type": "multipart/form-data; boundary=b0"},
                                    timeout=30)
            assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "upload_too_large"
            metrics = requests.get(url + "/metrics", timeout=30).text
            for status in (200, 413):
                assert f'inference_requests_total{{action="toy/upload",model="invalid",status="{status}"}}' in metrics
        _wait_for_events(tmp_path / "audit", 3)
        events = list(read_events(tmp_path / "audit", action="toy/upload"))
        assert [(e.actor, e.status) for e in events] == [("tests", 200), ("tests", 413), ("tests", 413)]
    finally:
        router.routes[:] = [r for r in router.routes if getattr(r, "path", "") != "/toy/upload"]


def _chunked_multipart(size: int) -> Iterator[bytes]:
    yield b'--b0\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
    for _ in range(size // 10_000):
        yield b"x" * 10_000
    yield b"\r\n--b0--\r\n"


def _wait_for_events(audit_dir: Path, count: int) -> None:
    # Events are written as the answer goes out: allow the server a moment.
    deadline = time.monotonic() + 10
    while len(list(read_events(audit_dir))) < count and time.monotonic() < deadline:
        time.sleep(0.05)


def test_the_server_mints_its_own_request_id_and_keeps_the_clients_apart(
        app_url: tuple[Any, str, Path]) -> None:
    _, url, audit_dir = app_url
    forged = "ward-7.scan-42"  # the id of someone else's request
    first = requests.post(url + "/predict", files={"file": ("a.png", b"not an image")},
                          headers={"X-API-Key": KEY, "X-Request-ID": forged}, timeout=30)
    second = requests.post(url + "/predict", files={"file": ("a.png", b"not an image")},
                           headers={"X-API-Key": KEY, "X-Request-ID": forged}, timeout=30)
    ids = [first.headers["X-Request-ID"], second.headers["X-Request-ID"]]
    assert forged not in ids and ids[0] != ids[1]
    assert first.headers["X-Client-Request-ID"] == forged
    # Each server id names exactly one event; the client's id is a field of its own.
    _wait_for_events(audit_dir, 2)
    for request_id in ids:
        [event] = read_events(audit_dir, request_id=request_id)
        assert event.client_request_id == forged
    assert len(list(read_events(audit_dir, request_id=forged))) == 0
    assert len(list(read_events(audit_dir, client_request_id=forged))) == 2
    bad = requests.get(url + "/healthz", headers={"X-Request-ID": "bad id with spaces"}, timeout=30)
    assert "X-Client-Request-ID" not in bad.headers and len(bad.headers["X-Request-ID"]) == 32


def test_the_page_names_each_user_who_gets_a_share_of_their_own(app_url: tuple[Any, str, Path]) -> None:
    _, url, audit_dir = app_url

    def as_user(user: str | None, key: str = PAGE_KEY) -> requests.Response:
        headers = {"X-API-Key": key, **({"X-CTScan-User": user} if user else {})}
        return requests.get(url + "/models", headers=headers, timeout=30)

    # One clinician floods: after their 3 a minute they wait, with the time to wait.
    statuses = [as_user("dr-flood").status_code for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    limited = as_user("dr-flood")
    assert limited.json()["error"]["code"] == "rate_limited" and 1 <= int(limited.headers["Retry-After"]) <= 20
    # The admin behind the same page key is not slowed down by them.
    assert as_user("admin").status_code == 200
    # The header is believed from the page's key only: another key cannot pose as a person.
    assert [as_user("dr-flood", key=KEY).status_code for _ in range(4)] == [200] * 4
    assert as_user("not a valid name!").status_code == 400
    _wait_for_events(audit_dir, 3)
    refusal = [e for e in read_events(audit_dir) if e.outcome == "rate_limited"]
    assert refusal and {(e.actor, e.actor_kind) for e in refusal} == {("dr-flood", "user")}
    assert all(e.detail["key"] == PAGE_KEY_NAME for e in refusal)


def test_uploads_never_reach_a_temporary_file(app_url: tuple[Any, str, Path], temp_file_watch: TempFileWatch) -> None:
    _, url, _ = app_url
    # 3 MB: above Starlette's 1 MB spool threshold, within this app's 4 MB limit.
    upload = b"PATIENT^NAME" + os.urandom(3 * 1024 * 1024)
    response = requests.post(url + "/predict", files={"file": ("a.dcm", upload)}, headers={"X-API-Key": KEY},
                             timeout=60)
    assert response.status_code in (400, 415, 422, 503), response.text  # read in full, then refused or not ready
    study = requests.post(url + "/predict/study", files=[("file", ("a", upload)), ("file", ("b", upload))],
                          headers={"X-API-Key": KEY}, timeout=60)
    assert study.status_code in (400, 413, 415, 422, 503), study.text
    assert temp_file_watch.opened == []
    # The watch does see a spooled upload when one happens (it is not blind).
    with tempfile.SpooledTemporaryFile(max_size=10) as spooled:
        spooled.write(b"x" * 100)
    assert temp_file_watch.opened
