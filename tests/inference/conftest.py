"""Fixtures of the inference tests: the real service in a uvicorn subprocess on a free port."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 420  # TF import + three models + ONNX conversion on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningService:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    store_dir: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, **kwargs: object) -> requests.Response:
        return requests.get(self.url + path, timeout=60, **kwargs)  # type: ignore[arg-type]

    def predict(self, content: bytes, *, filename: str = "slice.png", params: dict[str, str] | None = None,
                data: dict[str, str] | None = None,
                content_type: str = "application/octet-stream") -> requests.Response:
        return requests.post(self.url + "/predict", files={"file": (filename, content, content_type)},
                             params=params, data=data, timeout=120)


def start_service(*, store_dir: Path, log_path: Path, env: dict[str, str], wait_ready: bool = True) -> RunningService:
    port = free_port()
    full_env = {**os.environ, "CTSCAN_MODEL_STORE": str(store_dir), "TF_CPP_MIN_LOG_LEVEL": "2",
                "PYTHONUNBUFFERED": "1", **env}
    log = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "ctscan.cli", "serve", "inference", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO_ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    service = RunningService(f"http://127.0.0.1:{port}", process, log_path, store_dir)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stop_service(service)
            pytest.fail(f"inference service exited with {process.returncode}:\n{service.log()[-3000:]}")
        try:
            status = requests.get(service.url + ("/readyz" if wait_ready else "/healthz"), timeout=5).status_code
            if status == 200:
                return service
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    stop_service(service)
    pytest.fail(f"inference service not ready after {START_TIMEOUT_S}s:\n{service.log()[-3000:]}")


def stop_service(service: RunningService) -> None:
    if service.process.poll() is None:
        os.killpg(service.process.pid, signal.SIGTERM)
        try:
            service.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(service.process.pid, signal.SIGKILL)
            service.process.wait(timeout=10)


@pytest.fixture(scope="session")
def onnx_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared by every service the tests start, so each model is converted once per session."""
    return tmp_path_factory.mktemp("onnx-cache")


def copy_store(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.fixture(scope="session")
def inference_service(tiny_model_store: Path, data_dir: Path, onnx_cache_dir: Path,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    """The service with all three tiny models and the ensemble, a 2 MB upload limit and no
    hot reload (the tests here must see fixed versions)."""
    root = tmp_path_factory.mktemp("inference-service")
    store = copy_store(tiny_model_store, root / "store")
    service = start_service(store_dir=store, log_path=root / "service.log", env={
        "INFERENCE_MAX_UPLOAD_BYTES": str(2 * 1024 * 1024),
        "INFERENCE_RELOAD_POLL_SECONDS": "0",
        "INFERENCE_ONNX_CACHE_DIR": str(onnx_cache_dir),
        "INFERENCE_VERIFICATION_DIR": str(data_dir),
        "INFERENCE_MAX_BATCH_SIZE": "8",
    })
    yield service
    stop_service(service)
