"""The ensemble's decision rule never changes silently: after a promotion of a member, the
ensemble is refused with the reason until it is calibrated again for the new versions."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctscan.storage.store import CARD_FILE, WEIGHTS_FILE, open_store
from inference.conftest import RunningService, copy_store, start_service, stop_service

pytestmark = pytest.mark.slow
MEMBERS = "mobilenetv2,densenet121"
TIMEOUT_S = 180


@pytest.fixture()
def two_model_service(tiny_model_store: Path, data_dir: Path, tmp_path: Path) -> Iterator[RunningService]:
    from ctscan.evaluation import calibrate_ensemble

    store_dir = copy_store(tiny_model_store, tmp_path / "store")
    calibrate_ensemble(store=open_store(store_dir), data_dir=str(data_dir), limit_per_class=4,
                       models=MEMBERS.split(","))
    service = start_service(store_dir=store_dir, log_path=tmp_path / "service.log", env={
        "INFERENCE_MODELS": MEMBERS, "INFERENCE_RELOAD_POLL_SECONDS": "0.5",
        "INFERENCE_VERIFICATION_DIR": str(data_dir)})
    yield service
    stop_service(service)


def _until(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_a_promoted_member_suspends_the_ensemble_until_it_is_recalibrated(
        two_model_service: RunningService, data_dir: Path, real_ct_images: dict[str, Path]) -> None:
    from ctscan.evaluation import calibrate_ensemble

    service = two_model_service
    image = next(iter(sorted(real_ct_images.values()))).read_bytes()
    assert service.predict(image).status_code == 200
    before = service.get("/models").json()["ensemble"]
    store = open_store(service.store_dir)
    old = store.production("densenet121")
    assert before["members"]["densenet121"] == old

    # A new DenseNet-121 version (same weights, a new card) is promoted, as the console does.
    files = store.load_files("densenet121", old)
    import json

    card = {k: v for k, v in json.loads(files[CARD_FILE]).items() if k not in ("name", "version", "weights_sha256")}
    new = store.save("densenet121", weights=files[WEIGHTS_FILE], card=card)
    store.promote("densenet121", new, reason="test: console promotion")
    _until(lambda: service.get("/models").json()["ensemble"] is None, "the ensemble to be suspended")
    refused = service.predict(image)
    assert refused.status_code == 503
    message = refused.json()["error"]["message"]
    assert "calibrated for" in message and new in message and "calibrate-ensemble" in message
    assert service.get("/models").json()["ensemble_error"] == message
    # Each model alone still answers: only the combined rule waits for a decision.
    assert service.predict(image, params={"model": "densenet121"}).status_code == 200

    record = calibrate_ensemble(store=store, data_dir=str(data_dir), limit_per_class=4, models=MEMBERS.split(","))
    assert record.members["densenet121"] == new
    _until(lambda: service.get("/models").json()["ensemble"] is not None, "the recalibrated ensemble")
    after = service.get("/models").json()["ensemble"]
    assert after["members"] == {"mobilenetv2": store.production("mobilenetv2"), "densenet121": new}
    assert service.predict(image).status_code == 200
