"""Fixtures of the inference tests: the real service in a uvicorn subprocess on a free port."""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from harness import ServiceProcess, start_service_process, stop_service_process

from ctscan.access.keys_and_accounts import open_access

START_TIMEOUT_S = 300  # TF import + three models' loading and warm-up on a busy 2-core machine


@dataclass
class RunningService(ServiceProcess):
    store_dir: Path = Path()
    api_key: str | None = None  # sent with every request below when the service checks keys
    audit_dir: Path = Path()

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.api_key} if self.api_key else {}

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return requests.get(self.url + path, timeout=60, headers=headers, **kwargs)

    def predict(self, content: bytes, *, filename: str = "slice.png", params: dict[str, str] | None = None,
                data: dict[str, str] | None = None, headers: dict[str, str] | None = None,
                content_type: str = "application/octet-stream") -> requests.Response:
        return requests.post(self.url + "/predict", files={"file": (filename, content, content_type)},
                             params=params, data=data, timeout=120, headers={**self.headers, **(headers or {})})

    def predict_study(self, files: list[bytes], *, params: dict[str, str] | None = None,
                      timeout: float = 600) -> requests.Response:
        parts = [("file", (f"part{i}", content, "application/octet-stream")) for i, content in enumerate(files)]
        return requests.post(self.url + "/predict/study", files=parts, params=params, timeout=timeout,
                             headers=self.headers)


def start_service(*, store_dir: Path, log_path: Path, env: dict[str, str], wait_ready: bool = True,
                  api_key: str | None = None) -> RunningService:
    """The service on a free port. With `api_key` it checks keys (the key is registered in the
    store first, with a limit no test reaches by accident); without, INFERENCE_AUTH=off."""
    audit_dir = log_path.parent / "audit"
    if api_key:
        open_access(str(store_dir)).register_key("tests", api_key, rate_limit_per_minute=100_000)
    full_env = {**os.environ, "CTSCAN_MODEL_STORE": str(store_dir), "TF_CPP_MIN_LOG_LEVEL": "2",
                "PYTHONUNBUFFERED": "1", "INFERENCE_AUTH": "keys" if api_key else "off",
                "CTSCAN_AUDIT_DIR": str(audit_dir), **env}
    started = start_service_process([sys.executable, "-m", "ctscan.cli", "serve", "inference"], env=full_env,
                                    log_path=log_path, ready_path="/readyz" if wait_ready else "/healthz",
                                    timeout_s=START_TIMEOUT_S)
    return RunningService(started.url, started.process, started.log_path, store_dir, api_key, audit_dir)


def stop_service(service: RunningService) -> None:
    stop_service_process(service)


def copy_store(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.fixture(scope="session")
def inference_service(tiny_model_store: Path, data_dir: Path,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    """The service with all three tiny models and the ensemble, a 2 MB upload limit, no hot
    reload (the tests here must see fixed versions) and API keys checked (every request
    below carries the key, as a program's would)."""
    root = tmp_path_factory.mktemp("inference-service")
    store = copy_store(tiny_model_store, root / "store")
    service = start_service(store_dir=store, log_path=root / "service.log", api_key=secrets.token_urlsafe(32), env={
        "INFERENCE_MAX_UPLOAD_BYTES": str(2 * 1024 * 1024),
        "INFERENCE_RELOAD_POLL_SECONDS": "0",
        "INFERENCE_VERIFICATION_DIR": str(data_dir),
        "INFERENCE_MAX_BATCH_SIZE": "8",
        "INFERENCE_MAX_STUDY_BYTES": str(64 * 1024 * 1024),
        "INFERENCE_MAX_STUDY_SLICES": "300",
    })
    yield service
    stop_service(service)
