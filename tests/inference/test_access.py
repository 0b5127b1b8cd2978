"""API keys on the real inference service: 401 without a valid key, revocation through the
CLI takes effect while the service runs, per-key rate limits answer 429 with Retry-After,
probes stay open, and every prediction request leaves one audit event without patient data."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from ctscan.access.audit_trail import AuditEvent, read_events
from ctscan.access.keys_and_accounts import open_access
from ctscan.cli_access import cli_actor
from inference.conftest import RunningService
from inference.test_api import _dicom_bytes

ADMIN_TOKEN = "inference-access-tests-admin-token"


def _ctscan(*args: str, store: Path, audit_dir: Path, admin: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CTSCAN_AUDIT_DIR": str(audit_dir)}
    env.pop("CTSCAN_ADMIN_TOKEN", None)
    if admin:
        env["CTSCAN_ADMIN_TOKEN"] = ADMIN_TOKEN
    return subprocess.run([sys.executable, "-m", "ctscan.cli", *args, "--store", str(store)], env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def _png(real_ct_images: dict[str, Path]) -> bytes:
    return next(p for n, p in sorted(real_ct_images.items()) if p.suffix == ".png").read_bytes()


def _events(service: RunningService, request_id: str) -> list[AuditEvent]:
    # The event is written as the answer goes out: allow the service a moment.
    deadline = time.monotonic() + 10
    while True:
        events = list(read_events(service.audit_dir, request_id=request_id))
        if events or time.monotonic() > deadline:
            return events
        time.sleep(0.1)


@pytest.mark.parametrize("headers, expected", [
    ({}, "an API key is required"),
    ({"X-API-Key": "ctk_" + "x" * 40}, "not valid"),
    ({"Authorization": "Bearer " + "y" * 40}, "not valid"),
])
def test_prediction_without_a_valid_key_is_401_json(inference_service: RunningService,
                                                    real_ct_images: dict[str, Path],
                                                    headers: dict[str, str], expected: str) -> None:
    response = requests.post(inference_service.url + "/predict", files={"file": ("a.png", _png(real_ct_images))},
                             headers=headers, timeout=60)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorised"
    assert expected in response.json()["error"]["message"]
    assert response.headers["WWW-Authenticate"] == "Bearer"
    for path in ("/models", "/predict/study"):
        assert requests.request("GET" if path == "/models" else "POST", inference_service.url + path,
                                headers=headers, timeout=30).status_code == 401


def test_bearer_header_works_like_x_api_key(inference_service: RunningService,
                                            real_ct_images: dict[str, Path]) -> None:
    assert inference_service.api_key
    response = requests.post(inference_service.url + "/predict", params={"model": "mobilenetv2"},
                             files={"file": ("a.png", _png(real_ct_images))},
                             headers={"Authorization": f"Bearer {inference_service.api_key}"}, timeout=60)
    assert response.status_code == 200, response.text


def test_probes_metrics_and_docs_need_no_key(inference_service: RunningService) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert requests.get(inference_service.url + path, timeout=30).status_code == 200, path
    schema = requests.get(inference_service.url + "/openapi.json", timeout=30).json()
    assert "X-API-Key" in str(schema["components"]["securitySchemes"])


def test_a_key_revoked_with_the_cli_stops_working_while_the_service_runs(
        inference_service: RunningService, real_ct_images: dict[str, Path]) -> None:
    # Set-up writes the store's admin verifier (make up, the compose seed, the k8s job).
    # (--replace: this copy of the shared tiny store may hold another suite's verifier)
    initialised = _ctscan("admin", "init", "--replace", store=inference_service.store_dir,
                          audit_dir=inference_service.audit_dir)
    assert initialised.returncode == 0, initialised.stderr
    created = _ctscan("keys", "create", "ward-7-pacs", store=inference_service.store_dir,
                      audit_dir=inference_service.audit_dir)
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)["key"]
    assert "not stored" in created.stderr and key not in inference_service.log()
    headers = {"X-API-Key": key}
    # A new key works at once (the service looks up keys it has not seen).
    assert requests.get(inference_service.url + "/models", headers=headers, timeout=30).status_code == 200
    listed = _ctscan("keys", "list", store=inference_service.store_dir, audit_dir=inference_service.audit_dir)
    assert "ward-7-pacs" in listed.stdout and key not in listed.stdout
    assert hashlib.sha256(key.encode()).hexdigest() not in listed.stdout

    # Changing keys needs the admin credential.
    refused = _ctscan("keys", "revoke", "ward-7-pacs", store=inference_service.store_dir,
                      audit_dir=inference_service.audit_dir, admin=False)
    assert refused.returncode == 2 and "CTSCAN_ADMIN_TOKEN" in refused.stderr
    revoked = _ctscan("keys", "revoke", "ward-7-pacs", store=inference_service.store_dir,
                      audit_dir=inference_service.audit_dir)
    assert revoked.returncode == 0, revoked.stderr
    deadline = time.monotonic() + 30  # the service re-reads a known key every 5 s
    while True:
        response = requests.post(inference_service.url + "/predict", files={"file": ("a.png", _png(real_ct_images))},
                                 headers=headers, timeout=60)
        if response.status_code == 401 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert response.status_code == 401 and "revoked" in response.json()["error"]["message"]
    # A revoked key cannot be registered again under any name.
    with pytest.raises(Exception, match="revoked"):
        open_access(str(inference_service.store_dir)).register_key("again", key)
    actions = [e.action for e in read_events(inference_service.audit_dir, actor=cli_actor())]
    assert "key_create" in actions and "key_revoke" in actions
    refusal = _events(inference_service, response.headers["X-Request-ID"])
    assert [(e.outcome, e.actor, e.status) for e in refusal] == [("key_revoked", "ward-7-pacs", 401)]


def test_rate_limit_per_key_is_429_with_retry_after(inference_service: RunningService,
                                                    real_ct_images: dict[str, Path]) -> None:
    key = "rate-limited-key-" + "z" * 24
    open_access(str(inference_service.store_dir)).register_key("slow-client", key, rate_limit_per_minute=3)
    statuses = [requests.get(inference_service.url + "/models", headers={"X-API-Key": key}, timeout=30)
                for _ in range(4)]
    assert [r.status_code for r in statuses[:3]] == [200, 200, 200]
    limited = statuses[3]
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(limited.headers["Retry-After"]) <= 20  # 3 a minute: one more every 20 s
    # Other keys are not slowed down by this one.
    assert inference_service.get("/models").status_code == 200
    upload = requests.post(inference_service.url + "/predict", files={"file": ("a.png", _png(real_ct_images))},
                           headers={"X-API-Key": key}, timeout=60)
    assert upload.status_code == 429
    events = _events(inference_service, upload.headers["X-Request-ID"])
    assert [(e.outcome, e.actor, e.status) for e in events] == [("rate_limited", "slow-client", 429)]


def test_predictions_are_audited_without_patient_data(inference_service: RunningService) -> None:
    dicom = _dicom_bytes()
    response = inference_service.predict(dicom, filename="Doe_Jane.dcm", params={"model": "mobilenetv2"},
                                         headers={"X-Request-ID": "audit-dicom-1"})
    assert response.status_code == 200, response.text
    [event] = _events(inference_service, response.headers["X-Request-ID"])
    assert event.client_request_id == "audit-dicom-1"
    assert (event.action, event.actor, event.actor_kind, event.service) == ("predict", "tests", "key", "inference")
    assert event.model == "mobilenetv2" and event.model_version == response.json()["model_version"]
    assert event.outcome == response.json()["outcome"] and event.status == 200
    assert event.upload_sha256 == hashlib.sha256(dicom).hexdigest()
    refused = inference_service.predict(b"not an image at all", params={"model": "mobilenetv2"},
                                        headers={"X-Request-ID": "audit-refused-1"})
    assert refused.status_code == 415
    [event] = _events(inference_service, refused.headers["X-Request-ID"])
    assert (event.outcome, event.status) == ("unsupported_media_type", 415)
    trail = "".join(p.read_text() for p in inference_service.audit_dir.rglob("*.jsonl"))
    for secret in ("Doe", "Jane", "SECRET-PATIENT-4711"):
        assert secret not in trail and secret not in inference_service.log()
