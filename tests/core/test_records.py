"""Typed records: the shipped cards load, new card sections and unknown keys survive the store,
and a record that is not what it claims is refused with its path and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctscan.errors import StoreError
from ctscan.models import ensemble_members
from ctscan.storage.records import ModelCard
from ctscan.storage.store import CARD_FILE, open_store

RELEASE = Path(__file__).resolve().parents[2] / "models"


def test_the_shipped_release_cards_load_as_typed_records() -> None:
    release = open_store(RELEASE)
    for name in ensemble_members():
        version = release.production(name) or ""
        card = release.card(name, version)
        assert card.architecture == name and card.version == version and card.init == "none"
        assert 0 < card.threshold < 1 and card.val_metric("auc") is not None and "test" in card.metrics
        # Nothing of the file is lost in the typed record.
        written = json.loads((RELEASE / name / version / CARD_FILE).read_text())
        assert card.model_dump(mode="json", exclude_unset=True) == written
    pointer = release.production_record("mobilenetv2")
    assert pointer.version and pointer.history == [] and pointer.reason
    ensemble = release.ensemble_record()
    assert ensemble is not None and set(ensemble.members) == set(ensemble_members())


def test_new_card_sections_and_unknown_keys_round_trip(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    card = {"architecture": "mobilenetv2", "input_size": 64, "threshold": 0.4, "init": "none",
            "preprocessing": {"name": "lung-v1", "version": 1},
            "calibration": {"method": "temperature", "temperature": 1.7, "ece": 0.04},
            "gate": {"mean": 0.31, "std": 0.02},
            "hyperparameters": {"augment": {"flip": True, "rotation_degrees": 10}},
            "a_key_from_the_future": {"nested": [1, 2]}}
    version = store.save("mobilenetv2", weights=b"w", card=card)
    loaded = store.card("mobilenetv2", version)
    assert loaded.preprocessing == {"name": "lung-v1", "version": 1}
    assert loaded.calibration is not None and loaded.calibration["temperature"] == 1.7
    assert loaded.gate == {"mean": 0.31, "std": 0.02}
    assert loaded.model_extra == {"a_key_from_the_future": {"nested": [1, 2]}}
    # Code written against the dict cards reads them the same way.
    assert loaded["threshold"] == 0.4 and loaded.get("gate") == {"mean": 0.31, "std": 0.02}
    assert loaded["a_key_from_the_future"] == {"nested": [1, 2]} and loaded.get("split", "none") == "none"
    assert "gate" in loaded and "calibration" in loaded and "split" not in loaded
    with pytest.raises(KeyError):
        loaded["no_such_key"]
    written = json.loads((tmp_path / "mobilenetv2" / version / CARD_FILE).read_text())
    assert {k: v for k, v in written.items() if k not in ("name", "version", "weights_sha256")} == card
    # No field is added that the author did not write.
    assert "metrics" not in written and "history" not in written
    # A copied version keeps its card byte for byte.
    other = open_store(tmp_path / "other")
    other.copy_version_from(store, "mobilenetv2", version)
    assert other.card("mobilenetv2", version) == loaded


def test_malformed_records_are_refused_with_their_place(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    with pytest.raises(ValueError, match="threshold"):
        store.save("mobilenetv2", weights=b"w", card={"architecture": "mobilenetv2", "input_size": 64})
    (tmp_path / "mobilenetv2").mkdir(exist_ok=True)
    (tmp_path / "mobilenetv2" / "production.json").write_text('{"version": 3, "history": "not a list"}')
    with pytest.raises(StoreError, match=r"production.json is not a valid ProductionPointer: (version|history)"):
        store.production("mobilenetv2")
    assert not ModelCard.model_fields["preprocessing"].is_required()
