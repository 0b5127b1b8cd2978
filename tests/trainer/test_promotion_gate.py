"""The promotion gate (ctscan.publishing.decide_promotion, the one promotion path) on a real
local model store: floors whatever the metric, only the same validation set is compared, a
reason for every decision; `ctscan jobs list` shows the current production pointer."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ctscan.publishing import decide_promotion, promote_with_reason
from ctscan.settings import PromotionSettings
from ctscan.storage.records import ModelCard
from ctscan.storage.store import ModelStore, open_store

UCSD = "6fb2cb52f1a9" + "0" * 52
FLOORS = PromotionSettings.from_values(_env_file=None, min_auc=0.7, min_balanced_accuracy=0.65)


def _card(*, auc: float, matrix: list[list[int]], recall: float | None = None, val_images: int = 118,
          limit_per_class: int | None = None, fingerprint: str = UCSD) -> dict[str, Any]:
    (tn, fp), (fn, tp) = matrix
    return {"architecture": "mobilenetv2", "input_size": 64, "init": "none", "threshold": 0.5,
            "dataset": {"fingerprint": fingerprint, "val_images": val_images},
            "split": {"train": "train", "model_selection_and_threshold": "val"},
            "hyperparameters": {"limit_per_class": limit_per_class, "seed": 42},
            "metrics": {"val": {"auc": auc, "recall": tp / (tp + fn) if recall is None else recall,
                                "accuracy": (tp + tn) / (tn + fp + fn + tp), "confusion_matrix": matrix}}}


def _store(tmp_path: Path, production: dict[str, Any]) -> ModelStore:
    store = open_store(tmp_path / "store")
    store.save("mobilenetv2", weights=b"production", version="20260101T000000Z-aaaa", card=production)
    store.promote("mobilenetv2", "20260101T000000Z-aaaa", reason="seeded")
    return store


def _candidate(store: ModelStore, card: dict[str, Any]) -> ModelCard:
    store.save("mobilenetv2", weights=b"candidate", version="20260102T000000Z-bbbb", card=card)
    return store.card("mobilenetv2", "20260102T000000Z-bbbb")


def test_a_candidate_validated_on_other_images_is_not_compared(tmp_path: Path) -> None:
    # The case: production measured on the 118 val images, the candidate on 8 of them.
    store = _store(tmp_path, _card(auc=0.80, matrix=[[41, 17], [15, 45]]))
    candidate = _candidate(store, _card(auc=0.94, matrix=[[4, 0], [1, 3]], val_images=8, limit_per_class=4))
    decision = promote_with_reason(store, "mobilenetv2", "20260102T000000Z-bbbb", candidate, floors=FLOORS)
    assert decision.promote is False and store.production("mobilenetv2") == "20260101T000000Z-aaaa"
    assert decision.reason.startswith("not comparable: the candidate was validated on 8 val images of dataset "
                                      "6fb2cb52f1a9, production 20260101T000000Z-aaaa on 118 val images")
    assert decision.as_record()["production"] == 0.80 and decision.as_record()["candidate"] == 0.94


def test_an_all_covid_model_is_refused_by_the_floors_even_when_it_wins_on_recall(tmp_path: Path) -> None:
    store = _store(tmp_path, _card(auc=0.80, matrix=[[41, 17], [15, 45]]))
    all_covid = _candidate(store, _card(auc=0.5, matrix=[[0, 58], [0, 60]]))
    assert all_covid.val_metric("recall") == 1.0
    decision = promote_with_reason(store, "mobilenetv2", "20260102T000000Z-bbbb", all_covid, metric="recall",
                                   floors=FLOORS)
    assert decision.promote is False and store.production("mobilenetv2") == "20260101T000000Z-aaaa"
    assert decision.reason == "val AUC 0.500 is below the promotion floor 0.700"
    # With a good AUC but one class always chosen, the balanced-accuracy floor still holds.
    lopsided = _card(auc=0.85, matrix=[[2, 56], [0, 60]])
    decision = decide_promotion(store, "mobilenetv2", "x", ModelCard.model_validate(lopsided), metric="recall",
                                floors=FLOORS)
    assert decision.promote is False
    assert decision.reason == "val balanced accuracy 0.517 is below the promotion floor 0.650"
    assert decision.floors["balanced_accuracy"] == pytest.approx(0.5172, abs=1e-4)


def test_on_the_same_validation_set_the_better_model_wins_and_every_decision_says_why(tmp_path: Path) -> None:
    store = _store(tmp_path, _card(auc=0.80, matrix=[[41, 17], [15, 45]]))
    worse = _card(auc=0.78, matrix=[[40, 18], [15, 45]])
    decision = decide_promotion(store, "mobilenetv2", "x", ModelCard.model_validate(worse), floors=FLOORS)
    assert decision.promote is False
    assert decision.reason == ("val auc 0.7800 does not beat production 20260101T000000Z-aaaa (0.8000) "
                               "on the same validation set")
    better = _candidate(store, _card(auc=0.86, matrix=[[45, 13], [12, 48]]))
    decision = promote_with_reason(store, "mobilenetv2", "20260102T000000Z-bbbb", better, floors=FLOORS,
                                   source="trained by job 20260102T000000Z-bbbb")
    assert decision.promote is True and store.production("mobilenetv2") == "20260102T000000Z-bbbb"
    pointer = store.production_record("mobilenetv2")
    assert pointer.reason == ("trained by job 20260102T000000Z-bbbb: val auc 0.8600 beats production "
                              "20260101T000000Z-aaaa (0.8000) on the same validation set")


def test_without_production_the_floors_still_apply(tmp_path: Path) -> None:
    store = open_store(tmp_path / "store")
    weak = _card(auc=0.6, matrix=[[30, 28], [20, 40]])
    assert decide_promotion(store, "mobilenetv2", "x", ModelCard.model_validate(weak), floors=FLOORS).reason == \
        "val AUC 0.600 is below the promotion floor 0.700"
    good = _card(auc=0.8, matrix=[[41, 17], [15, 45]])
    decision = decide_promotion(store, "mobilenetv2", "x", ModelCard.model_validate(good), floors=FLOORS)
    assert decision.promote and decision.reason == "no production version to compare with; the floors are met"


def test_jobs_list_shows_the_current_pointer_after_a_rollback(
        trainer_env: dict[str, str], ctscan_cli: Callable[..., Any]) -> None:
    from ctscan.storage.job_records import JobRecords, now
    from ctscan.storage.records import JobRecord

    store = open_store(trainer_env["CTSCAN_MODEL_STORE"] + "-listing")
    records = JobRecords.for_store(store.url)
    for job_id, auc in (("20260101T000000Z-0000aaaa", 0.8), ("20260102T000000Z-0000bbbb", 0.86)):
        store.save("mobilenetv2", weights=job_id.encode(), version=job_id,
                   card=_card(auc=auc, matrix=[[41, 17], [15, 45]]))
        store.promote("mobilenetv2", job_id)
        records.create(JobRecord(id=job_id, state="succeeded", model="mobilenetv2", dataset="d",
                                 dataset_version="v", init="none", epochs=1, created_at=now(),
                                 result_version=job_id, promoted=True))
    env = {"CTSCAN_MODEL_STORE": store.url}
    listed = ctscan_cli("jobs", "list", **env).stdout.splitlines()
    assert listed[0].endswith("20260102T000000Z-0000bbbb production")
    assert listed[1].endswith("20260101T000000Z-0000aaaa candidate (was production)")
    store.rollback("mobilenetv2")
    after = json.loads(ctscan_cli("jobs", "list", "--json", **env).stdout)
    assert [job["serving"] for job in after] == ["candidate (was production)", "production"]


def test_promote_and_rollback_need_the_admin_credential(
        trainer_env: dict[str, str], ctscan_cli: Callable[..., Any], admin_token: str) -> None:
    from ctscan.access.admin_credential import AdminVerifier

    store = open_store(trainer_env["CTSCAN_MODEL_STORE"] + "-admin")
    AdminVerifier.for_store(store.url).init(admin_token)  # as a worker does when it starts
    first, second = "20260101T000000Z-0000cccc", "20260102T000000Z-0000dddd"
    for version in (first, second):
        store.save("mobilenetv2", weights=version.encode(), version=version,
                   card=_card(auc=0.8, matrix=[[41, 17], [15, 45]]))
    store.promote("mobilenetv2", first)
    for token, refusal in (("", "set CTSCAN_ADMIN_TOKEN"), ("another-admin-token-0123456789", "admin token rejected")):
        for command in (("models", "promote", "mobilenetv2", second), ("models", "rollback", "mobilenetv2")):
            refused = ctscan_cli(*command, "--store", store.url, CTSCAN_ADMIN_TOKEN=token)
            assert refused.returncode == 2 and refusal in refused.stderr and "Traceback" not in refused.stderr
    assert store.production("mobilenetv2") == first
    promoted = ctscan_cli("models", "promote", "mobilenetv2", second, "--store", store.url)
    assert promoted.returncode == 0, promoted.stderr
    assert store.production_record("mobilenetv2").reason == "promoted by an admin"
    rolled = ctscan_cli("models", "rollback", "mobilenetv2", "--store", store.url)
    assert rolled.returncode == 0 and store.production("mobilenetv2") == first


@pytest.mark.slow
def test_production_validated_on_one_source_is_measured_on_the_candidates_sources(
        tmp_path: Path, data_dir: Path, radiopaedia_dir: Path) -> None:
    """The first multi-source candidate meets a production model validated on UCSD val alone:
    the gate measures production (the shipped MobileNetV2) on the candidate's val split, each
    source apart, and compares the two by the same worst-source rule instead of refusing them as
    not comparable."""
    from ctscan.data.dataset import CTDataset
    from ctscan.publishing import production_on_val_of
    from ctscan.release import seed_store

    store = open_store(tmp_path / "store")
    seed_store(Path(__file__).resolve().parents[2] / "models", store)
    production = store.production("mobilenetv2")
    sources = [{"name": d.name, "path": str(d), "fingerprint": CTDataset(d).fingerprint()}
               for d in (data_dir, radiopaedia_dir)]
    report = {"auc": 0.75, "balanced_accuracy": 0.70, "recall": 0.7, "accuracy": 0.7,
              "confusion_matrix": [[35, 15], [15, 35]]}
    card = {**_card(auc=0.75, matrix=[[35, 15], [15, 35]], val_images=190, fingerprint="f" * 64),
            "architecture": "mobilenetv2"}
    card["dataset"] = {"fingerprint": "f" * 64, "val_images": 190, "path": str(data_dir), "sources": sources}
    card["metrics"]["val_sources"] = {s["name"]: report for s in sources}
    candidate = _candidate(store, card)

    measured = production_on_val_of(store, "mobilenetv2", candidate)
    assert measured is not None and set(measured.metrics["val_sources"]) == {s["name"] for s in sources}
    ucsd = CTDataset(data_dir).split("val")
    assert sum(map(sum, measured.metrics["val_sources"][data_dir.name]["confusion_matrix"])) == len(ucsd)
    worst = measured.val_metric("auc")
    assert worst is not None and worst < 0.75  # measured: 0.445 on Radiopaedia val, which its card never saw
    decision = decide_promotion(store, "mobilenetv2", "20260102T000000Z-bbbb", candidate, floors=FLOORS,
                                production_measured=measured)
    assert decision.promote is True
    assert decision.reason == (f"val auc 0.7500 beats production {production} measured on the candidate's val "
                               f"split ({worst:.4f})")
    # Without the measurement the two are not compared at all.
    assert decide_promotion(store, "mobilenetv2", "x", candidate, floors=FLOORS).reason.startswith("not comparable")
    # The policy's own path (`ctscan train` and training jobs) measures production itself.
    promoted = promote_with_reason(store, "mobilenetv2", "20260102T000000Z-bbbb", candidate, floors=FLOORS)
    assert promoted.reason == decision.reason and store.production("mobilenetv2") == "20260102T000000Z-bbbb"
