"""Readiness and errors while models are missing (real service on an empty store)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests
from pydantic import ValidationError

from ctscan.settings import InferenceSettings
from inference.conftest import start_service, stop_service


@pytest.mark.slow
def test_empty_store_is_not_ready_and_predict_is_503(tmp_path: Path) -> None:
    service = start_service(store_dir=tmp_path / "empty-store", log_path=tmp_path / "service.log",
                            env={"INFERENCE_RELOAD_POLL_SECONDS": "0", "INFERENCE_VERIFICATION_DIR": str(tmp_path)},
                            wait_ready=False)
    try:
        assert service.get("/healthz").json() == {"status": "ok"}
        deadline = time.monotonic() + 60
        while "no production version" not in service.get("/readyz").text and time.monotonic() < deadline:
            time.sleep(0.2)
        ready = service.get("/readyz")
        assert ready.status_code == 503
        error = ready.json()["error"]
        assert error["code"] == "not_ready"
        for name in ("inceptionv3", "densenet121", "mobilenetv2"):
            assert name in error["message"]
        assert "no production version" in error["message"]
        for model in ("mobilenetv2", "ensemble"):
            response = service.predict(b"\x89PNG\r\n\x1a\n" + b"\0" * 64, params={"model": model})
            assert response.status_code == 503 and response.json()["error"]["code"] == "not_ready"
        unknown = service.predict(b"123", params={"model": "vgg"})
        assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "unknown_model"
        models = service.get("/models").json()
        assert models["models"] == [] and models["ensemble"] is None
        assert sorted(models["missing"]) == ["densenet121", "inceptionv3", "mobilenetv2"]
        assert requests.get(service.url + "/docs", timeout=10).status_code == 200
    finally:
        stop_service(service)
    assert service.process.returncode is not None


def test_settings_refuse_unknown_models() -> None:
    with pytest.raises(ValidationError, match="unknown models"):
        InferenceSettings(models=["resnet50"])
