"""The one promotion policy, as `ctscan train` and the trainer's jobs both apply it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ctscan.errors import CTScanError
from ctscan.publishing import decide_promotion, promote_with_reason
from ctscan.settings import PromotionSettings
from ctscan.storage.records import ModelCard
from ctscan.storage.store import ModelStore, open_store

# The shipped floors, given explicitly: the trainer tests switch the environment's off.
FLOORS = PromotionSettings.from_values(_env_file=None, min_auc=0.7, min_balanced_accuracy=0.65)

def promote_if_better(store: ModelStore, name: str, version: str, card: ModelCard, **options: Any) -> bool:
    """Whether the version is production after the policy ran."""
    return promote_with_reason(store, name, version, card, **options).promote


def should_promote(store: ModelStore, name: str, card: ModelCard, metric: str = "auc") -> bool:
    """Whether the gate alone would promote the card."""
    return decide_promotion(store, name, card.version or "", card, metric=metric).promote


def _save(store: ModelStore, version: str, auc: float | None, f1: float = 0.5) -> str:
    # Above the gate's floors (AUC 0.7, balanced accuracy 0.65), all on one validation set.
    val: dict[str, object] = {"f1": f1, "confusion_matrix": [[45, 13], [12, 48]]}
    if auc is not None:
        val["auc"] = auc
    return store.save("mobilenetv2", weights=version.encode(), version=version,
                      card={"architecture": "mobilenetv2", "input_size": 32, "threshold": 0.5,
                            "dataset": {"fingerprint": "f" * 64, "val_images": 118}, "metrics": {"val": val}})


def test_auto_promotes_the_first_version_and_then_only_better_ones(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    first = _save(store, "v1", 0.72)
    assert promote_if_better(store, "mobilenetv2", first, store.card("mobilenetv2", first)) is True
    pointer = store.production_record("mobilenetv2")
    assert pointer.version == first
    assert pointer.reason == "trained: no production version to compare with; the floors are met"

    worse = _save(store, "v2", 0.71)
    assert promote_if_better(store, "mobilenetv2", worse, store.card("mobilenetv2", worse)) is False
    assert store.production("mobilenetv2") == first
    better = _save(store, "v3", 0.75, f1=0.1)
    assert not should_promote(store, "mobilenetv2", store.card("mobilenetv2", better), metric="f1")
    assert promote_if_better(store, "mobilenetv2", better, store.card("mobilenetv2", better),
                             source="trained by job v3") is True
    assert store.production_record("mobilenetv2").history == [first]
    assert store.production_record("mobilenetv2").reason.startswith("trained by job v3")
    # A redelivered job finds its version in production already: still promoted, nothing rewritten.
    updated_at = store.production_record("mobilenetv2").updated_at
    assert promote_if_better(store, "mobilenetv2", better, store.card("mobilenetv2", better)) is True
    assert store.production_record("mobilenetv2").updated_at == updated_at


def test_always_never_and_unknown_policies(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    good, bad = _save(store, "v1", 0.9), _save(store, "v2", 0.71)
    assert promote_if_better(store, "mobilenetv2", good, store.card("mobilenetv2", good), policy="never") is False
    assert store.production("mobilenetv2") is None
    promote_if_better(store, "mobilenetv2", good, store.card("mobilenetv2", good))
    assert promote_if_better(store, "mobilenetv2", bad, store.card("mobilenetv2", bad), policy="always") is True
    assert store.production("mobilenetv2") == bad
    with pytest.raises(CTScanError, match="auto, always or never"):
        promote_if_better(store, "mobilenetv2", good, store.card("mobilenetv2", good), policy="sometimes")
    with pytest.raises(CTScanError, match="promotion metric"):
        promote_if_better(store, "mobilenetv2", good, store.card("mobilenetv2", good), metric="loss")


def test_a_production_card_without_the_metric_is_replaced(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    old = _save(store, "v1", None)
    store.promote("mobilenetv2", old)
    new = _save(store, "v2", 0.75)
    assert should_promote(store, "mobilenetv2", store.card("mobilenetv2", new)) is True


def test_with_several_val_sources_every_floor_holds_on_the_worst_one(tmp_path: Path) -> None:
    from ctscan.publishing import decide_promotion

    store = open_store(tmp_path)
    good = {"auc": 0.85, "confusion_matrix": [[45, 13], [12, 48]]}
    sources = {"ucsd-covid-ct": good, "radiopaedia-covid-seg": {"auc": 0.62, "confusion_matrix": [[12, 13], [12, 35]]},
               "sirm-covid-ct": {"auc": float("nan"), "confusion_matrix": [[0, 0], [3, 25]]}}  # COVID only
    version = store.save("mobilenetv2", weights=b"w", version="v1", card={
        "architecture": "mobilenetv2", "input_size": 32, "threshold": 0.5,
        "dataset": {"fingerprint": "f" * 64, "val_images": 218},
        "metrics": {"val": {"auc": 0.80, "confusion_matrix": [[60, 23], [24, 83]]}, "val_sources": sources}})
    card = store.card("mobilenetv2", version)
    assert card.val_metric("auc") == 0.62 and card.worst_val_source("auc") == "radiopaedia-covid-seg"
    decision = decide_promotion(store, "mobilenetv2", version, card, floors=FLOORS)
    assert not decision.promote
    assert "0.620 (worst val source: radiopaedia-covid-seg) is below the promotion floor" in decision.reason
    sources["radiopaedia-covid-seg"]["auc"] = 0.75
    store.save("mobilenetv2", weights=b"w2", version="v2", card={**card.model_dump(), "version": "v2",
                                                                  "metrics": {"val": card.metrics["val"],
                                                                              "val_sources": sources}})
    card = store.card("mobilenetv2", "v2")
    # Radiopaedia's balanced accuracy (0.612) is now the worst: still refused, on that floor.
    decision = decide_promotion(store, "mobilenetv2", "v2", card, floors=FLOORS)
    assert not decision.promote and "balanced accuracy" in decision.reason
    # The refusal names the source that fails that floor, not the one with the lowest AUC.
    sources["radiopaedia-covid-seg"]["auc"] = 0.90
    sources["ucsd-covid-ct"]["auc"] = 0.72
    store.save("mobilenetv2", weights=b"w3", version="v3", card={**card.model_dump(), "version": "v3",
                                                                  "metrics": {"val": card.metrics["val"],
                                                                              "val_sources": sources}})
    decision = decide_promotion(store, "mobilenetv2", "v3", store.card("mobilenetv2", "v3"), floors=FLOORS)
    assert decision.reason == ("val balanced accuracy 0.612 (worst val source: radiopaedia-covid-seg) is below the "
                               "promotion floor 0.650")
