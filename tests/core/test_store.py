"""Model store: versions are verified on load, never overwritten, promotion is reversible."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ctscan.errors import ChecksumError, StoreError, VersionExistsError
from ctscan.models import build_model, load_keras_model, pack_weights
from ctscan.records import EnsembleRecord
from ctscan.release import seed_store
from ctscan.store import open_store


@pytest.fixture(scope="module")
def small_model():  # type: ignore[no-untyped-def]
    return build_model("mobilenetv2", init="none", input_size=32, compile_model=False)


def card() -> dict[str, object]:
    return {"architecture": "mobilenetv2", "input_size": 32, "init": "none", "threshold": 0.5,
            "metrics": {"val": {"auc": 0.6}}}


def test_saved_weights_restore_in_float16_precision(tmp_path: Path, small_model) -> None:  # type: ignore[no-untyped-def]
    store = open_store(tmp_path)
    weights = pack_weights(small_model)
    version = store.save("mobilenetv2", weights=weights, card=card())
    restored, stored_card = load_keras_model(store, "mobilenetv2", version)
    pixels = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(restored(pixels)), np.asarray(small_model(pixels)), atol=2e-3)
    assert stored_card.version == version and len(stored_card.weights_sha256 or "") == 64
    # float16 storage: about half the float32 size
    assert len(weights) < 0.6 * 4 * small_model.count_params()


def test_versions_are_never_overwritten(tmp_path: Path, small_model) -> None:  # type: ignore[no-untyped-def]
    store = open_store(tmp_path)
    version = store.save("mobilenetv2", weights=pack_weights(small_model), card=card())
    before = (tmp_path / "mobilenetv2" / version / "weights.npz").read_bytes()
    with pytest.raises(VersionExistsError):
        store.save("mobilenetv2", weights=b"other", card=card(), version=version)
    assert (tmp_path / "mobilenetv2" / version / "weights.npz").read_bytes() == before


def test_tampered_weights_are_refused(tmp_path: Path, small_model) -> None:  # type: ignore[no-untyped-def]
    store = open_store(tmp_path)
    version = store.save("mobilenetv2", weights=pack_weights(small_model), card=card())
    path = tmp_path / "mobilenetv2" / version / "weights.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="does not match its SHA-256"):
        load_keras_model(store, "mobilenetv2", version)


def test_promote_and_rollback(tmp_path: Path, small_model) -> None:  # type: ignore[no-untyped-def]
    store = open_store(tmp_path)
    first = store.save("mobilenetv2", weights=pack_weights(small_model), card=card(), version="v1")
    second = store.save("mobilenetv2", weights=pack_weights(small_model), card=card(), version="v2")
    assert store.production("mobilenetv2") is None
    store.promote("mobilenetv2", first)
    store.promote("mobilenetv2", second)
    assert store.production("mobilenetv2") == second
    assert store.rollback("mobilenetv2") == first and store.production("mobilenetv2") == first
    with pytest.raises(StoreError, match="no earlier production version"):
        store.rollback("mobilenetv2")
    with pytest.raises(StoreError, match="no version v9"):
        store.promote("mobilenetv2", "v9")
    assert store.list_versions("mobilenetv2") == ["v1", "v2"]


def test_seeding_copies_the_release_and_keeps_existing_production(tmp_path: Path, small_model) -> None:  # type: ignore[no-untyped-def]
    release = open_store(tmp_path / "release")
    version = release.save("mobilenetv2", weights=pack_weights(small_model), card=card(), version="r1")
    release.promote("mobilenetv2", version)
    release.save_ensemble_record(EnsembleRecord(members={"mobilenetv2": "r1"}, threshold=0.4))
    target = open_store(tmp_path / "store")
    result = seed_store(tmp_path / "release", target)
    assert result["copied"] == ["mobilenetv2/r1"] and target.production("mobilenetv2") == "r1"
    assert target.ensemble_record() == EnsembleRecord(members={"mobilenetv2": "r1"}, threshold=0.4)
    # a second seed changes nothing
    again = seed_store(tmp_path / "release", target)
    assert again["copied"] == [] and again["kept"] == ["mobilenetv2/r1"]
    assert json.loads((tmp_path / "store" / "mobilenetv2" / "production.json").read_text())["version"] == "r1"


def test_weights_load_into_a_model_built_after_others_in_the_same_process(tmp_path: Path) -> None:
    # InceptionV3's unnamed layers get process-wide counters; loading must not depend on them.
    store = open_store(tmp_path)
    first = build_model("inceptionv3", init="none", input_size=75, compile_model=False)
    version = store.save("inceptionv3", weights=pack_weights(first),
                         card={**card(), "architecture": "inceptionv3", "input_size": 75})
    build_model("inceptionv3", init="none", input_size=75, compile_model=False)  # shifts the counters
    restored, _ = load_keras_model(store, "inceptionv3", version)
    pixels = np.random.default_rng(1).uniform(0, 255, (2, 75, 75, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(restored(pixels)), np.asarray(first(pixels)), atol=5e-3)


def test_weights_of_another_architecture_are_refused(tmp_path: Path, small_model) -> None:  # type: ignore[no-untyped-def]
    store = open_store(tmp_path)
    version = store.save("densenet121", weights=pack_weights(small_model),
                         card={**card(), "architecture": "densenet121"})
    with pytest.raises(StoreError, match="do not fit"):
        load_keras_model(store, "densenet121", version)
