"""Fixtures for the web service: settings, accounts, a misbehaving inference server, the
real services.

The real inference service (`ctscan serve inference` on the tiny model store, API keys
checked) answers the happy paths; the real web service in front of it logs people in with
accounts made in that store and calls it with its own key. `contract_server` is a small HTTP
server speaking the inference contract that can be told to be slow, broken or refusing: the
real service cannot be made to do that on demand, and those are the paths the web page must
survive. Its answers are built from the service's own response models (`ctscan.schemas`), so
they cannot drift from the real ones."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from harness import ServiceProcess, chromium_executable, free_port, start_service_process, stop_service_process

from ctscan import DISCLAIMER
from ctscan.schemas import MemberPrediction, Prediction, Timings

REPO_ROOT = Path(__file__).resolve().parents[2]
CTSCAN = str(REPO_ROOT / ".venv" / "bin" / "ctscan")
ADMIN_PASSWORD = "correct-horse-battery-staple"  # the built-in account "admin" (WEB_ADMIN_PASSWORD)
TRAINER_TOKEN = "web-tests-trainer-token-" + "x" * 8
SECRET_KEY = "web-tests-secret-key-0123456789abcdef"
# Accounts the tests create in the store with the library (`ctscan accounts create` does the same).
CLINICIAN = ("dr.jones", "clinician-pass-0123")
ADMIN_ACCOUNT = ("ada.admin", "admin-account-pass-0123")
# The page's own key for the inference service (WEB_INFERENCE_API_KEY); the page registers it.
WEB_API_KEY = "ctk_web-tests-page-key-" + "k" * 16


def csrf_token(html: str) -> str:
    match = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', html)
    assert match, "page has no CSRF token"
    return match.group(1)


def ensure_account(store_url: str, username: str, password: str, *, role: str = "clinician") -> None:
    """The account in this store (created once; a test store is shared by the tests that use it)."""
    from ctscan.access.keys_and_accounts import open_access

    access = open_access(store_url)
    if access.account(username) is None:
        access.create_account(username, role=role, password=password)


def log_in(client: FlaskClient, username: str, password: str, *, next_page: str = "/",
           **request_options: Any) -> Any:
    """Log in through the real form (CSRF token from the login page)."""
    token = csrf_token(client.get("/login", **request_options).get_data(as_text=True))
    return client.post("/login", data={"csrf_token": token, "username": username, "password": password,
                                       "next": next_page}, **request_options)


def clinician_client(app: Flask) -> FlaskClient:
    """A test client logged in as the clinician (the account made in the app's store)."""
    ensure_account(app.extensions["ctscan_web"].settings.store.model_store, *CLINICIAN)
    client = app.test_client()
    response = log_in(client, *CLINICIAN)
    assert response.status_code == 302, response.get_data(as_text=True)[-1500:]
    return client


def tiny_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (40, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


# Fake patient data: must never reach a page, a log or the audit trail.
FAKE_PATIENT_NAME, FAKE_PATIENT_ID = "Doe^Jane", "FAKE-123456"


def phi_dicom(rows: int = 96, columns: int = 96) -> bytes:
    """A CT slice as DICOM (lungs dark, body soft tissue, scanner noise) whose header carries
    a fake patient's name and id, as a real export from the PACS would."""
    import numpy as np
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset("slice.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.SOPClassUID, dataset.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    dataset.PatientName, dataset.PatientID, dataset.Modality = FAKE_PATIENT_NAME, FAKE_PATIENT_ID, "CT"
    y, x = np.mgrid[0:rows, 0:columns]
    body = ((x - columns / 2) / (columns * 0.45)) ** 2 + ((y - rows / 2) / (rows * 0.35)) ** 2 < 1
    lungs = (((x - columns * 0.32) ** 2 + (y - rows / 2) ** 2) < (rows / 6) ** 2) | \
            (((x - columns * 0.68) ** 2 + (y - rows / 2) ** 2) < (rows / 6) ** 2)
    hounsfield = np.where(lungs, -850, np.where(body, 40, -1000))
    hounsfield = (hounsfield + np.random.default_rng(7).normal(0, 15, (rows, columns))).round()
    dataset.Rows, dataset.Columns, dataset.SamplesPerPixel = rows, columns, 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 1
    dataset.RescaleSlope, dataset.RescaleIntercept = 1, -1024
    dataset.PixelData = (hounsfield + 1024).astype(np.int16).tobytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# --- a server speaking the inference contract, steerable per test -----------------------------
@dataclass
class ContractServer:
    url: str
    # ok | refused | slow | error500 | reject415 | reject413 | notready | garbage | unauthorised | busy
    mode: str = "ok"
    delay_s: float = 0.0
    requests_seen: list[dict[str, Any]] = field(default_factory=list)


def _prediction(model: str, mode: str = "ok") -> dict[str, Any]:
    """An answer of the real schema (`ctscan.schemas.Prediction`, API v2). mode ok: the
    ensemble's models disagree (indeterminate) or one model says COVID-19; refused: the
    input is not a chest CT (nothing classified)."""
    from ctscan.decision import OUTCOME_TEXT

    timings = Timings(decode=3.0, inference=40.0, gradcam=55.0, total=101.0)
    if mode == "refused":
        return Prediction(
            outcome="not_chest_ct", outcome_text=OUTCOME_TEXT["not_chest_ct"], probability_covid=None,
            threshold=None, reasons=["the image lies far from the chest CT slices the models were trained on"],
            label=None, model=model, model_version="ensemble-v1" if model == "ensemble" else "v-single",
            members=None, disagreement=None, heatmap_png_base64=None, request_id="req-456", timings_ms=timings,
            source_format="PNG", disclaimer=DISCLAIMER).model_dump(mode="json")
    members = None
    if model == "ensemble":
        members = {
            "inceptionv3": MemberPrediction(probability_covid=0.81, label="COVID", version="v-inc", threshold=0.6),
            "densenet121": MemberPrediction(probability_covid=0.74, label="COVID", version="v-dense", threshold=0.6),
            "mobilenetv2": MemberPrediction(probability_covid=0.32, label="non-COVID", version="v-mob",
                                            threshold=0.6),
        }
    outcome = "indeterminate" if members else "covid"
    answer = Prediction(
        outcome=outcome, outcome_text=OUTCOME_TEXT[outcome], probability_covid=0.623, threshold=0.5,
        indeterminate_band=0.1, reasons=["the ensemble's models disagree"] if members else [], label="COVID",
        confidence=0.623, calibrated=True, model=model, model_version="ensemble-v1" if members else "v-single",
        members=members, disagreement=bool(members), heatmap_png_base64=base64.b64encode(tiny_png()).decode(),
        heatmap_members=list(members) if members else [model], request_id="req-123", timings_ms=timings,
        source_format="PNG", disclaimer=DISCLAIMER,
    )
    return answer.model_dump(mode="json")


def _study_prediction(model: str) -> dict[str, Any]:
    """A study answer of the real schema: 6 slices, the ends without lungs."""
    from ctscan.decision import OUTCOME_TEXT
    from ctscan.schemas import Aggregation, StudyPrediction, StudySlice, StudyTimings, TopSlice

    probabilities = [None, 0.2, 0.85, 0.9, 0.55, None]
    slices = [StudySlice(index=i, upload_index=5 - i, position_mm=4.0 * i,
                         outcome="no_lungs_visible" if p is None else
                         ("covid" if p > 0.6 else "indeterminate" if p > 0.4 else "non_covid"),
                         probability_covid=p, reasons=["no lungs visible"] if p is None else [])
              for i, p in enumerate(probabilities)]
    return StudyPrediction(
        outcome="covid", outcome_text=OUTCOME_TEXT["covid"], probability_covid=0.767, threshold=0.5,
        indeterminate_band=0.1,
        reasons=["The study's probability is the average of its 3 most suspicious slices (of 4 analysed); "
                 "2 slices on their own would be called COVID-19"],
        aggregation=Aggregation(rule="top_k_mean", k=3, classified_slices=4), slice_count=6,
        skipped={"no_lungs_visible": 2}, slices=slices,
        top_slices=[TopSlice(index=3, probability_covid=0.9, heatmap_png_base64=base64.b64encode(tiny_png()).decode()),
                    TopSlice(index=2, probability_covid=0.85, heatmap_png_base64=None)],
        model=model, model_version="ensemble-v1", request_id="req-study",
        timings_ms=StudyTimings(slices=900.0, gradcam=300.0, total=1250.0), source_format="DICOM",
        disclaimer=DISCLAIMER).model_dump(mode="json")


@pytest.fixture()
def contract_server() -> Iterator[ContractServer]:
    state = ContractServer(url="")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, body: Any, raw: bytes | None = None,
                  headers: dict[str, str] | None = None) -> None:
            payload = raw if raw is not None else json.dumps(body).encode()
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            self._send(200, {"status": "ok"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = self.rfile.read(length)
            query = dict(p.split("=", 1) for p in self.path.partition("?")[2].split("&") if "=" in p)
            state.requests_seen.append({"path": self.path, "query": query, "body": body,
                                        "headers": dict(self.headers.items())})
            if state.mode == "slow":
                time.sleep(state.delay_s)
            errors = {"reject415": (415, "unsupported_image", "cannot decode image"),
                      "reject413": (413, "too_large", "upload too large"),
                      "notready": (503, "not_ready", "models are loading"),
                      "ensemble_off": (503, "ensemble_unavailable",
                                       "the ensemble's member densenet121 version v0 cannot be loaded"),
                      "error500": (500, "internal", "boom")}
            if state.mode == "unauthorised":  # what the real service answers a wrong key
                self._send(401, {"error": {"code": "unauthorised", "message": "this API key is not valid"}},
                           headers={"WWW-Authenticate": "Bearer"})
            elif state.mode == "busy":
                self._send(429, {"error": {"code": "rate_limited", "message": "too many requests for key 'web'"}},
                           headers={"Retry-After": "7"})
            elif state.mode in errors:
                status, code, message = errors[state.mode]
                self._send(status, {"error": {"code": code, "message": message}})
            elif state.mode == "garbage":
                self._send(200, None, raw=b"<html>proxy error</html>")
            elif self.path.startswith("/predict/study"):
                self._send(200, _study_prediction(query.get("model", "ensemble")))
            else:
                self._send(200, _prediction(query.get("model", "ensemble"), state.mode))

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


# --- settings and app -----------------------------------------------------------------------
@pytest.fixture()
def make_settings(tmp_path: Path) -> Callable[..., Any]:
    """The web service's settings; `model_store`, `datasets_url`, `admin_token` and `audit_dir`
    go to the shared sections it holds (the audit trail: tmp_path/audit)."""
    from ctscan.settings import AdminSettings, AuditSettings, StoreSettings, WebSettings

    def build(*, model_store: str | None = None, datasets_url: str | None = None,
              admin_token: str | None = TRAINER_TOKEN, audit_dir: Path | None = None,
              **overrides: Any) -> WebSettings:
        store = StoreSettings.from_values(_env_file=None, model_store=model_store or str(tmp_path / "store"),
                                          datasets_url=datasets_url or str(tmp_path / "datasets"))
        values: dict[str, Any] = {
            "secret_key": SECRET_KEY, "admin_password": ADMIN_PASSWORD, "auth": "accounts",
            "inference_api_key": None,
            "inference_url": f"http://127.0.0.1:{free_port()}", "inference_read_timeout_s": 5.0,
            "inference_retries": 1, "max_upload_mb": 1.0,
            "store": store, "admin": AdminSettings.from_values(_env_file=None, admin_token=admin_token),
            "audit": AuditSettings.from_values(_env_file=None, audit_dir=audit_dir or tmp_path / "audit"),
        }
        values.update(overrides)
        return WebSettings.from_values(_env_file=None, **values)

    return build


def trainer_settings_for(**env: str) -> Any:
    """The trainer's settings (with its shared sections) from these variables only (no .env;
    given values win over a process environment that other suites may have set)."""
    from ctscan.settings import AdminSettings, StoreSettings, TrainerSettings

    values: dict[str, Any] = {"_env_file": None, "CTSCAN_ADMIN_TOKEN": None, **env}
    return TrainerSettings.from_values(**values, store=StoreSettings(**values), admin=AdminSettings(**values))


# --- the real services ------------------------------------------------------------------------
Service = ServiceProcess


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("WEB_", "INFERENCE_", "CTSCAN_", "CELERY_"))}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def service_audit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The audit trail folder the real services share (each process writes its own file)."""
    return tmp_path_factory.mktemp("audit")


@pytest.fixture(scope="session")
def service_accounts(tiny_model_store: Path) -> None:
    """The clinician and the admin account in the store the real services read."""
    ensure_account(str(tiny_model_store), *CLINICIAN)
    ensure_account(str(tiny_model_store), *ADMIN_ACCOUNT, role="admin")


@pytest.fixture(scope="session")
def inference_service(tiny_model_store: Path, data_dir: Path, service_audit_dir: Path,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The real inference service (`ctscan serve inference`) on the tiny model store, checking
    API keys: the page must send the key it registers in that store (WEB_API_KEY)."""
    if not (REPO_ROOT / "services" / "inference" / "main.py").is_file():
        pytest.fail("services/inference is not there yet: the browser tests need the real service")
    workdir = tmp_path_factory.mktemp("inference")
    env = _base_env() | {
        "CTSCAN_MODEL_STORE": str(tiny_model_store), "CTSCAN_DATA_DIR": str(data_dir),
        "INFERENCE_RELOAD_POLL_SECONDS": "0", "INFERENCE_AUTH": "keys",
        "CTSCAN_AUDIT_DIR": str(service_audit_dir),
    }
    service = start_service_process([CTSCAN, "serve", "inference"], env=env, log_path=workdir / "inference.log",
                                    ready_path="/readyz", timeout_s=300)
    yield service
    stop_service_process(service, grace_s=15)


@pytest.fixture(scope="session")
def published_datasets(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """The real UCSD data published (`ctscan.data.versions.upload_dataset`) to a local datasets
    folder, as the trainer expects before it accepts a job. Returns (url, name, version)."""
    from ctscan.data.versions import upload_dataset

    root = tmp_path_factory.mktemp("datasets")
    upload_dataset(data_dir, str(root / "ucsd-covid-ct"), version="web-test")
    return str(root), "ucsd-covid-ct", "web-test"


@pytest.fixture(scope="session")
def trainer_queue() -> Iterator[str]:
    """A queue name of our own on the machine's Redis, removed afterwards, so no worker of
    another test run picks up these jobs."""
    import redis

    name = f"web-tests-{secrets.token_hex(4)}"
    yield name
    client = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    client.delete(name, f"_kombu.binding.{name}")


@pytest.fixture(scope="session")
def web_service(inference_service: Service, tiny_model_store: Path, published_datasets: tuple[str, str, str],
                trainer_queue: str, service_audit_dir: Path, service_accounts: None,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The real web service (`ctscan serve web`, waitress) in front of the real inference, with
    accounts (and the built-in admin) and its own API key, which it registers when it starts.
    The store's admin verifier is written first, as set-up does (`ctscan admin init`)."""
    from ctscan.access.admin_credential import AdminVerifier

    AdminVerifier.for_store(str(tiny_model_store)).init(TRAINER_TOKEN)
    workdir = tmp_path_factory.mktemp("web")
    env = _base_env() | {
        "WEB_SECRET_KEY": SECRET_KEY, "WEB_ADMIN_PASSWORD": ADMIN_PASSWORD, "WEB_AUTH": "accounts",
        "WEB_INFERENCE_API_KEY": WEB_API_KEY, "CTSCAN_AUDIT_DIR": str(service_audit_dir),
        "CTSCAN_ADMIN_TOKEN": TRAINER_TOKEN, "INFERENCE_URL": inference_service.url,
        "CTSCAN_MODEL_STORE": str(tiny_model_store), "CTSCAN_DATASETS_URL": published_datasets[0],
        "WEB_DEFAULT_DATASET": published_datasets[1], "WEB_DEFAULT_DATASET_VERSION": published_datasets[2],
        "CTSCAN_TRAINER_QUEUE": trainer_queue, "CTSCAN_TRAINER_WORK_DIR": str(workdir / "trainer"),
    }
    service = start_service_process([CTSCAN, "serve", "web"], env=env, log_path=workdir / "web.log",
                                    ready_path="/healthz", timeout_s=60)
    yield service
    stop_service_process(service, grace_s=15)


@pytest.fixture(scope="session")
def chromium_path() -> str:
    return chromium_executable()
