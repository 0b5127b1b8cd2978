"""The audit trail across the real services: a clinician's prediction through the real web
page and the real inference service (which checks the page's own key) leaves one event in
each service's file under the same request id, admin actions leave theirs, and no patient
data (DICOM header, file name) reaches an audit file or a service's log."""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

import requests

from ctscan.access.audit_trail import AuditEvent, read_events

from .conftest import ADMIN_ACCOUNT, CLINICIAN, FAKE_PATIENT_ID, FAKE_PATIENT_NAME, Service, csrf_token, phi_dicom

PATIENT_FILE_NAME = "Doe_Jane_FAKE-123456_chest.dcm"


def log_in(browser: requests.Session, web_url: str, username: str, password: str, next_page: str) -> str:
    form = browser.get(f"{web_url}/login", params={"next": next_page}, timeout=30)
    answer = browser.post(f"{web_url}/login", timeout=60, data={
        "csrf_token": csrf_token(form.text), "username": username, "password": password, "next": next_page})
    assert answer.status_code == 200 and answer.url == web_url + next_page, answer.text[-1500:]
    return answer.text


def events_for(audit_dir: Path, request_id: str, count: int, timeout_s: float = 15.0) -> list[AuditEvent]:
    # The inference service writes its event once its answer has gone out: wait for it.
    deadline = time.monotonic() + timeout_s
    while True:
        found = list(read_events(audit_dir, request_id=request_id))
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_a_prediction_and_admin_actions_are_audited_by_both_services_without_patient_data(
        web_service: Service, inference_service: Service, service_audit_dir: Path,
        published_datasets: tuple[str, str, str]) -> None:
    started = time.time()
    dicom = phi_dicom()
    with requests.Session() as browser:
        page = log_in(browser, web_service.url, *CLINICIAN, next_page="/")
        result = browser.post(web_service.url + "/predict", timeout=180,
                              data={"csrf_token": csrf_token(page), "model": "mobilenetv2"},
                              files={"file": (PATIENT_FILE_NAME, dicom, "application/dicom")})
    assert result.status_code == 200, result.text[-2000:]
    assert 'id="verdict"' in result.text
    shown = re.search(r"<dt>Request ID</dt><dd><code>([^<]+)</code>", result.text)
    assert shown, "the result page names no request id"
    request_id = shown.group(1)  # the id the service minted

    # Each service names the request with its own id; each event names the other's beside it.
    [inference] = events_for(service_audit_dir, request_id, count=1)
    assert inference.service == "inference" and inference.client_request_id
    [web] = events_for(service_audit_dir, inference.client_request_id, count=1)
    assert web.service == "web" and web.detail["service_request_id"] == request_id
    # Who: the clinician on the page, and at the service too (named by the page's own key).
    assert (web.actor, web.actor_kind, web.action) == (CLINICIAN[0], "user", "predict")
    assert (inference.actor, inference.actor_kind, inference.action) == (CLINICIAN[0], "user", "predict")
    assert inference.detail["key"] == "web"
    # What: the same bytes, model, version, outcome and status on both sides.
    assert web.upload_sha256 == inference.upload_sha256 == hashlib.sha256(dicom).hexdigest()
    assert web.model == inference.model == "mobilenetv2"
    assert web.model_version == inference.model_version and web.model_version
    assert web.outcome == inference.outcome and web.status == inference.status == 200

    # An admin (a stored account) queues a training job and cancels it.
    with requests.Session() as browser:
        console = log_in(browser, web_service.url, *ADMIN_ACCOUNT, next_page="/admin")
        queued = browser.post(web_service.url + "/admin/jobs", timeout=120, data={
            "csrf_token": csrf_token(console), "model": "mobilenetv2", "init": "none", "input_size": "64",
            "dataset": published_datasets[1], "dataset_version": published_datasets[2], "epochs": "1"})
        message = re.search(r"Queued job (\S+) \(mobilenetv2, 1 epochs\)", queued.text)
        assert message, queued.text[-2000:]
        job_id = message.group(1)
        cancelled = browser.post(f"{web_service.url}/admin/jobs/{job_id}/cancel", timeout=60,
                                 data={"csrf_token": csrf_token(queued.text)})
        assert f"Job {job_id} is cancelled" in cancelled.text

    since = [e for e in read_events(service_audit_dir) if e.time.timestamp() >= started - 1]
    logins = {(e.actor, e.outcome) for e in since if e.action == "login"}
    assert {(CLINICIAN[0], "ok"), (ADMIN_ACCOUNT[0], "ok")} <= logins
    admin_actions = [(e.action, e.outcome, e.detail.get("job_id")) for e in since
                     if e.actor == ADMIN_ACCOUNT[0] and e.action.startswith("job_")]
    assert admin_actions == [("job_queue", "ok", job_id), ("job_cancel", "ok", job_id)]

    # No patient data anywhere: not in any audit file, not in either service's log.
    written = "".join(path.read_text() for path in sorted(service_audit_dir.rglob("*.jsonl")))
    assert request_id in written and web.request_id in written and written.count(request_id) >= 2
    for text, where in ((written, "audit trail"), (web_service.log(), "web log"),
                        (inference_service.log(), "inference log")):
        for secret in (FAKE_PATIENT_NAME, FAKE_PATIENT_ID, "Doe_Jane", PATIENT_FILE_NAME):
            assert secret not in text, f"{secret!r} found in the {where}"
