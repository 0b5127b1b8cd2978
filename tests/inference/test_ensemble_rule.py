"""The ensemble's decision rule never changes silently: it serves exactly the member versions
its record pins (those its threshold was fitted for on val). After a member is promoted, a
single-model request gets the new version and the ensemble keeps the pinned one until it is
calibrated again; only a pinned version that cannot be loaded switches it off (503 with the
reason), and the single models answer meanwhile."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctscan.storage.store import WEIGHTS_FILE, ModelStore, open_store
from inference.conftest import RunningService, copy_store, start_service, stop_service

pytestmark = pytest.mark.slow
MEMBERS = "mobilenetv2,densenet121"
TIMEOUT_S = 180


@pytest.fixture(scope="module")
def two_model_service(tiny_model_store: Path, data_dir: Path,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    from ctscan.evaluation.reports import calibrate_ensemble

    root = tmp_path_factory.mktemp("ensemble-rule")
    store_dir = copy_store(tiny_model_store, root / "store")
    calibrate_ensemble(store=open_store(store_dir), data_dir=str(data_dir), limit_per_class=4,
                       members=MEMBERS.split(","))
    service = start_service(store_dir=store_dir, log_path=root / "service.log", env={
        "INFERENCE_MODELS": MEMBERS, "INFERENCE_RELOAD_POLL_SECONDS": "0.5",
        "INFERENCE_VERIFICATION_DIR": str(data_dir)})
    yield service
    stop_service(service)


def _until(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _new_version(store: ModelStore, name: str) -> str:
    """A new version of `name` (production's weights, a new card), as a training job saves one."""
    card, weights = store.verified_card(name, store.production(name) or "")
    return store.save(name, weights=weights, card=card.model_dump(exclude={"name", "version", "weights_sha256"}))


def _served_versions(service: RunningService, name: str) -> set[str]:
    """The versions of `name` the service's metrics say it serves (production and pinned)."""
    lines = service.get("/metrics").text.splitlines()
    return {line.split('version="')[1].split('"')[0] for line in lines
            if line.startswith("inference_model_version_info{") and f'model="{name}"' in line}


def _image(real_ct_images: dict[str, Path]) -> bytes:
    return next(iter(sorted(real_ct_images.values()))).read_bytes()


def test_a_promoted_member_leaves_the_ensemble_on_its_pinned_version_until_it_is_recalibrated(
        two_model_service: RunningService, data_dir: Path, real_ct_images: dict[str, Path]) -> None:
    from ctscan.evaluation.reports import calibrate_ensemble

    service, image = two_model_service, _image(real_ct_images)
    store = open_store(service.store_dir)
    old, mobilenet = store.production("densenet121"), store.production("mobilenetv2")
    # Readiness waited for the ensemble's versions, and names them.
    assert service.get("/readyz").json()["ensemble"] == {"mobilenetv2": mobilenet, "densenet121": old}
    answer = service.predict(image)
    assert answer.status_code == 200 and answer.json()["members"]["densenet121"]["version"] == old

    # A new DenseNet-121 version is promoted, as the console or the trainer's automatic promotion does.
    new = _new_version(store, "densenet121")
    store.promote("densenet121", new, reason="test: console promotion")
    _until(lambda: {m["name"]: m["version"] for m in service.get("/models").json()["models"]}["densenet121"] == new,
           "the new production version")
    single = service.predict(image, params={"model": "densenet121"})
    assert single.status_code == 200 and single.json()["model_version"] == new
    combined = service.predict(image)
    assert combined.status_code == 200, combined.text  # no 503: the clinicians' default keeps answering
    body = combined.json()
    assert {n: m["version"] for n, m in body["members"].items()} == {"mobilenetv2": mobilenet, "densenet121": old}
    assert body["model_version"] == f"mobilenetv2={mobilenet},densenet121={old}"
    ensemble = service.get("/models").json()["ensemble"]
    assert ensemble["members"] == {"mobilenetv2": mobilenet, "densenet121": old} and ensemble["pinned"] is True
    assert ensemble["awaiting_recalibration"] == {"densenet121": new}
    assert ensemble["members_rule"] == "explicit" and "inceptionv3" in ensemble["excluded"]
    assert _served_versions(service, "densenet121") == {old, new}  # the pinned entry is kept

    record = calibrate_ensemble(store=store, data_dir=str(data_dir), limit_per_class=4, members=MEMBERS.split(","))
    assert record.members["densenet121"] == new
    _until(lambda: service.get("/models").json()["ensemble"]["members"]["densenet121"] == new,
           "the recalibrated ensemble")
    assert service.get("/models").json()["ensemble"]["awaiting_recalibration"] == {}
    combined = service.predict(image)
    assert combined.status_code == 200 and combined.json()["members"]["densenet121"]["version"] == new
    # Nothing uses the old version any more: it is retired.
    _until(lambda: _served_versions(service, "densenet121") == {new}, "the old pinned entry to be retired")


def test_a_pinned_version_that_cannot_be_loaded_switches_the_ensemble_off_with_the_reason(
        two_model_service: RunningService, real_ct_images: dict[str, Path]) -> None:
    service, image = two_model_service, _image(real_ct_images)
    store = open_store(service.store_dir)
    original = store.ensemble_record()
    assert original is not None
    # The record pins a DenseNet-121 version whose weights no longer match their checksum.
    broken = _new_version(store, "densenet121")
    (service.store_dir / "densenet121" / broken / WEIGHTS_FILE).write_bytes(b"not the weights")
    store.save_ensemble_record(original.model_copy(update={"members": {**original.members, "densenet121": broken}}))
    _until(lambda: service.get("/models").json()["ensemble"] is None, "the ensemble to be switched off")
    refused = service.predict(image)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "ensemble_unavailable"
    message = refused.json()["error"]["message"]
    assert f"densenet121 version {broken}" in message and "SHA-256" in message and "calibrate-ensemble" in message
    assert service.get("/models").json()["ensemble_error"] == message
    # Each model alone still answers, and the service stays ready.
    assert service.predict(image, params={"model": "densenet121"}).status_code == 200
    assert service.get("/readyz").status_code == 200

    # Gone from the store altogether: the reason says so.
    shutil.rmtree(service.store_dir / "densenet121" / broken)
    _until(lambda: "is not in" in (service.get("/models").json()["ensemble_error"] or ""), "the missing version")

    store.save_ensemble_record(original)  # the versions that exist: served again
    _until(lambda: service.get("/models").json()["ensemble"] is not None, "the ensemble to be back")
    assert service.predict(image).status_code == 200
