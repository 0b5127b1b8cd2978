"""Model store: versions are verified on load, never overwritten, promotion is reversible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctscan.errors import ChecksumError, StoreError, VersionExistsError
from ctscan.release import seed_store
from ctscan.storage.records import EnsembleRecord
from ctscan.storage.store import open_store

# The store keeps bytes; which bytes is the models' business (tests/core/test_models.py).
WEIGHTS = b"weights of a test version"


def card() -> dict[str, object]:
    return {"architecture": "mobilenetv2", "input_size": 32, "init": "none", "threshold": 0.5,
            "metrics": {"val": {"auc": 0.6}}}




def test_versions_are_never_overwritten(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    version = store.save("mobilenetv2", weights=WEIGHTS, card=card())
    before = (tmp_path / "mobilenetv2" / version / "weights.npz").read_bytes()
    with pytest.raises(VersionExistsError):
        store.save("mobilenetv2", weights=b"other", card=card(), version=version)
    assert (tmp_path / "mobilenetv2" / version / "weights.npz").read_bytes() == before


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    version = store.save("mobilenetv2", weights=WEIGHTS, card=card())
    path = tmp_path / "mobilenetv2" / version / "weights.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="does not match its SHA-256"):
        store.verified_card("mobilenetv2", version)


def test_promote_and_rollback(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    first = store.save("mobilenetv2", weights=WEIGHTS, card=card(), version="v1")
    second = store.save("mobilenetv2", weights=WEIGHTS, card=card(), version="v2")
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


def test_seeding_copies_the_release_and_keeps_existing_production(tmp_path: Path) -> None:
    release = open_store(tmp_path / "release")
    version = release.save("mobilenetv2", weights=WEIGHTS, card=card(), version="r1")
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




