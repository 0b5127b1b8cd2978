"""Hot reload through the real service: a new production version is picked up, a corrupt or
broken one is refused while the working version keeps answering."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from ctscan.storage.store import CARD_FILE, WEIGHTS_FILE, ModelStore, open_store
from inference.conftest import RunningService, copy_store, start_service, stop_service

MODEL = "mobilenetv2"
RELOAD_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def reloading_service(tiny_model_store: Path, data_dir: Path,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    """Only MobileNetV2 (fast to reload), polling the store every half second."""
    root = tmp_path_factory.mktemp("hot-reload")
    store = copy_store(tiny_model_store, root / "store")
    service = start_service(store_dir=store, log_path=root / "service.log", env={
        "INFERENCE_MODELS": MODEL,
        "INFERENCE_RELOAD_POLL_SECONDS": "0.5",
        "INFERENCE_VERIFICATION_DIR": str(data_dir),
    })
    yield service
    stop_service(service)


def _served_entry(service: RunningService) -> dict:
    return next(e for e in service.get("/models").json()["models"] if e["name"] == MODEL)


def _wait_for(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + RELOAD_TIMEOUT_S
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _scaled_weights(weights: bytes, factor: float) -> bytes:
    """The same model with its output bias shifted, so its predictions visibly change."""
    with np.load(io.BytesIO(weights)) as arrays:
        values = {key: arrays[key] for key in arrays.files}
    bias_key = next(k for k in values if k.endswith("probability_covid/bias"))
    values[bias_key] = (values[bias_key].astype(np.float32) + factor).astype(values[bias_key].dtype)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **values)  # type: ignore[arg-type]
    return buffer.getvalue()


def _publish(store: ModelStore, weights: bytes, *, card_from: str, raw: bool = False) -> str:
    """Save `weights` as a new version with the card of version `card_from` (with `raw`,
    without its calibration: the answers are the network's own probabilities)."""
    import json

    card = json.loads(store.load_files(MODEL, card_from)[CARD_FILE])
    for field in ("name", "version", "weights_sha256", *(("calibration",) if raw else ())):
        card.pop(field, None)
    version = store.save(MODEL, weights=weights, card=card)
    return version


def test_new_version_is_loaded_and_swapped_without_failing_requests(
        reloading_service: RunningService, real_ct_images: dict[str, Path]) -> None:
    store = open_store(reloading_service.store_dir)
    trained = store.production(MODEL)
    image = next(iter(sorted(real_ct_images.values()))).read_bytes()
    assert reloading_service.predict(image).status_code == 400  # one model: no ensemble offered
    # Uncalibrated copies of the same network, so that a shifted output bias shows 1:1 in the
    # answers (a calibration fitted on four images per class can flatten it).
    weights = store.load_files(MODEL, trained)[WEIGHTS_FILE]
    old_version = _publish(store, weights, card_from=trained, raw=True)
    store.promote(MODEL, old_version, reason="test hot reload: baseline")
    deadline = time.monotonic() + RELOAD_TIMEOUT_S
    while reloading_service.predict(image, params={"model": MODEL}).json()["model_version"] != old_version:
        assert time.monotonic() < deadline, "the baseline version was not loaded in time"
        time.sleep(0.5)
    before = reloading_service.predict(image, params={"model": MODEL}).json()
    assert before["model_version"] == old_version and before["calibrated"] is False

    new_version = _publish(store, _scaled_weights(weights, 3.0), card_from=trained, raw=True)
    store.promote(MODEL, new_version, reason="test hot reload")

    # Keep requests flowing during the swap: none may fail, each answers from one version.
    with ThreadPoolExecutor(4) as pool:
        responses = []
        deadline = time.monotonic() + RELOAD_TIMEOUT_S
        while time.monotonic() < deadline:
            batch = list(pool.map(lambda _: reloading_service.predict(image, params={"model": MODEL}), range(4)))
            responses.extend(batch)
            if batch[-1].json().get("model_version") == new_version:
                break
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    assert {r.json()["model_version"] for r in responses} <= {old_version, new_version}
    after = reloading_service.predict(image, params={"model": MODEL}).json()
    assert after["model_version"] == new_version
    assert after["probability_covid"] > before["probability_covid"]  # the bias moved up
    assert _served_entry(reloading_service)["version"] == new_version
    metrics = reloading_service.get("/metrics").text
    assert f'model="{MODEL}",version="{new_version}"' in metrics
    assert f'version="{old_version}"' not in metrics


def test_corrupt_version_is_refused_and_the_working_one_keeps_serving(
        reloading_service: RunningService, real_ct_images: dict[str, Path]) -> None:
    store = open_store(reloading_service.store_dir)
    working = _served_entry(reloading_service)["version"]
    image = next(iter(sorted(real_ct_images.values()))).read_bytes()

    # 1. Bytes changed after the checksums were written (bit rot, tampering).
    weights = store.load_files(MODEL, working)[WEIGHTS_FILE]
    corrupt = _publish(store, _scaled_weights(weights, -1.0), card_from=working)
    weights_path = reloading_service.store_dir / MODEL / corrupt / WEIGHTS_FILE
    weights_path.write_bytes(weights_path.read_bytes()[:-100] + b"\0" * 100)
    store.promote(MODEL, corrupt, reason="test corrupt version")
    _wait_for(lambda: corrupt in (_served_entry(reloading_service)["reload_error"] or ""),
              "the corrupt version to be refused")
    entry = _served_entry(reloading_service)
    assert entry["version"] == working and "SHA-256" in entry["reload_error"]
    response = reloading_service.predict(image, params={"model": MODEL})
    assert response.status_code == 200 and response.json()["model_version"] == working

    # 2. Checksums fine but weights for another architecture.
    wrong = store.load_files("densenet121", store.production("densenet121"))[WEIGHTS_FILE]
    mismatched = _publish(store, wrong, card_from=working)
    store.promote(MODEL, mismatched, reason="test mismatched weights")
    _wait_for(lambda: mismatched in (_served_entry(reloading_service)["reload_error"] or ""),
              "the mismatched version to be refused")
    assert _served_entry(reloading_service)["version"] == working
    assert reloading_service.predict(image, params={"model": MODEL}).json()["model_version"] == working
    assert reloading_service.get("/readyz").status_code == 200
    assert f'inference_model_reloads_total{{model="{MODEL}",outcome="refused"}} 2.0' in \
        reloading_service.get("/metrics").text
