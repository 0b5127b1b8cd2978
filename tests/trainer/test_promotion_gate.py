"""The numbers a finished job keeps about the promotion gate, so the console can say why a
run was not promoted (services.trainer.jobs.promotion_gate), on a real local model store."""

from __future__ import annotations

from pathlib import Path

from ctscan.records import ModelCard
from ctscan.store import open_store
from services.trainer.jobs import promotion_gate


def _card(auc: float) -> ModelCard:
    return ModelCard.model_validate({"architecture": "mobilenetv2", "input_size": 64, "init": "none",
                                     "threshold": 0.5, "metrics": {"val": {"accuracy": 0.6, "f1": 0.5, "auc": auc}}})


def test_the_gate_keeps_both_sides_of_the_comparison(tmp_path: Path) -> None:
    store = open_store(tmp_path / "store")
    store.save("mobilenetv2", weights=b"old", version="20260101T000000Z-aaaa", card=_card(0.71))
    store.promote("mobilenetv2", "20260101T000000Z-aaaa")
    store.save("mobilenetv2", weights=b"new", version="20260102T000000Z-bbbb", card=_card(0.48))
    gate = promotion_gate(store, "mobilenetv2", "20260102T000000Z-bbbb", _card(0.48), "auc")
    assert gate == {"metric": "auc", "split": "val", "candidate": 0.48,
                    "production_version": "20260101T000000Z-aaaa", "production": 0.71}


def test_without_a_production_model_there_is_nothing_to_beat(tmp_path: Path) -> None:
    store = open_store(tmp_path / "store")
    store.save("mobilenetv2", weights=b"new", version="20260102T000000Z-bbbb", card=_card(0.48))
    gate = promotion_gate(store, "mobilenetv2", "20260102T000000Z-bbbb", _card(0.48), "auc")
    assert gate["production_version"] is None and gate["production"] is None and gate["candidate"] == 0.48


def test_a_job_redelivered_after_its_promotion_compares_nothing(tmp_path: Path) -> None:
    store = open_store(tmp_path / "store")
    store.save("mobilenetv2", weights=b"new", version="20260102T000000Z-bbbb", card=_card(0.8))
    store.promote("mobilenetv2", "20260102T000000Z-bbbb")
    gate = promotion_gate(store, "mobilenetv2", "20260102T000000Z-bbbb", _card(0.8), "auc")
    assert gate["production_version"] is None and gate["production"] is None
