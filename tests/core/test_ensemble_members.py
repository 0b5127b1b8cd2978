"""`ctscan models calibrate-ensemble` chooses the ensemble's members by the promotion gate's
floors on every val source (or as `--members` names them) and records the models it leaves
out with why; when none clears the floors it refuses, naming each model's worst source and
value. `ctscan predict` serves the versions the record pins, whatever production is now."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ctscan.storage.store import ModelStore, open_store

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[2]
FLOORS = {"CTSCAN_PROMOTION_MIN_AUC": "0.70", "CTSCAN_PROMOTION_MIN_BALANCED_ACCURACY": "0.65"}


def ctscan(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ctscan.cli", *args], capture_output=True, text=True, timeout=900,
                          cwd=REPO_ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **FLOORS, **(env or {})})


def _val(auc: float, matrix: list[list[int]]) -> dict[str, Any]:
    return {"auc": auc, "confusion_matrix": matrix, "accuracy": 0.8}


GOOD = _val(0.90, [[9, 1], [1, 9]])  # balanced accuracy 0.9
WEAK = _val(0.61, [[6, 4], [5, 5]])


def _promote_with_val_metrics(store: ModelStore, name: str, metrics: dict[str, Any]) -> str:
    """A new production version of `name` with production's weights and these val metrics on
    its card: what the floors read (the fixture's networks are no classifiers)."""
    card, weights = store.verified_card(name, store.production(name) or "")
    fields = card.model_dump(exclude={"name", "version", "weights_sha256"})
    version = store.save(name, weights=weights, card={**fields, "metrics": metrics})
    store.promote(name, version, reason="test: val metrics for the floors")
    return version


@pytest.fixture()
def store_path(tiny_model_store: Path, tmp_path: Path) -> Path:
    path = Path(shutil.copytree(tiny_model_store, tmp_path / "store"))
    store = open_store(path)
    _promote_with_val_metrics(store, "mobilenetv2", {"val": GOOD})
    _promote_with_val_metrics(store, "inceptionv3", {"val": GOOD})
    # Clears the floors on UCSD, not on SIRM: below the floor on one val source is out.
    _promote_with_val_metrics(store, "densenet121", {"val": GOOD, "val_sources": {
        "ucsd-covid-ct": GOOD, "sirm-covid-ct": WEAK}})
    return path


def test_the_default_members_clear_the_floors_on_every_val_source(store_path: Path, data_dir: Path) -> None:
    done = ctscan("models", "calibrate-ensemble", "--store", str(store_path), "--data", str(data_dir))
    assert done.returncode == 0, done.stderr
    store = open_store(store_path)
    record = store.ensemble_record()
    assert record is not None and json.loads(done.stdout)["members"] == record.members
    assert record.members == {"mobilenetv2": store.production("mobilenetv2"),
                              "inceptionv3": store.production("inceptionv3")}
    assert record.members_rule == "floors" and record.overrides is None
    assert record.excluded == {
        "densenet121": "val AUC 0.610 (worst val source: sirm-covid-ct) is below the promotion floor 0.700"}


def test_explicit_members_override_the_floors_and_the_ensemble_keeps_its_versions(
        store_path: Path, data_dir: Path, real_ct_images: dict[str, Path]) -> None:
    done = ctscan("models", "calibrate-ensemble", "--members", "densenet121", "--store", str(store_path),
                  "--data", str(data_dir))
    assert done.returncode == 0, done.stderr
    store = open_store(store_path)
    pinned = store.production("densenet121")
    record = store.ensemble_record()
    assert record is not None and record.members == {"densenet121": pinned}  # one member: that model, recalibrated
    assert record.members_rule == "explicit"
    assert record.overrides == {
        "densenet121": "val AUC 0.610 (worst val source: sirm-covid-ct) is below the promotion floor 0.700"}
    assert record.excluded == {name: "not among the explicit members (--members)"
                               for name in ("inceptionv3", "mobilenetv2")}

    # Production moves on; `ctscan predict` still combines the version the ensemble was fitted for.
    newer = _promote_with_val_metrics(store, "densenet121", {"val": GOOD})
    image = str(next(iter(sorted(real_ct_images.values()))))
    answered = ctscan("predict", image, "--json", "--store", str(store_path))
    assert answered.returncode == 0, answered.stderr
    answer = json.loads(answered.stdout)
    assert answer["model"] == "ensemble" and answer["model_version"] == f"densenet121={pinned}"
    assert {n: m["version"] for n, m in answer["members"].items()} == {"densenet121": pinned}
    alone = json.loads(ctscan("predict", image, "--json", "--model", "densenet121", "--store",
                              str(store_path)).stdout)
    assert alone["model_version"] == newer


def test_without_a_model_clearing_the_floors_the_ensemble_is_refused_naming_each(
        store_path: Path, data_dir: Path) -> None:
    before = open_store(store_path).ensemble_record()
    refused = ctscan("models", "calibrate-ensemble", "--store", str(store_path), "--data", str(data_dir),
                     env={"CTSCAN_PROMOTION_MIN_AUC": "0.95"})
    assert refused.returncode == 2
    message = refused.stderr.strip()
    assert "no production model clears the promotion floors on every val source" in message
    assert "densenet121" in message and "val AUC 0.610 (worst val source: sirm-covid-ct)" in message
    assert "mobilenetv2" in message and "inceptionv3" in message and "val AUC 0.900" in message
    assert "--members" in message
    assert open_store(store_path).ensemble_record() == before  # nothing written


def test_a_model_never_judged_on_a_val_source_is_measured_there_before_it_joins(
        store_path: Path, data_dir: Path, radiopaedia_dir: Path) -> None:
    # The cards of mobilenetv2 and inceptionv3 clear the floors on UCSD val, the only source they
    # were validated on; the ensemble is calibrated on Radiopaedia val too, where these tiny
    # networks (no classifiers) are measured and fall below the floors.
    before = open_store(store_path).ensemble_record()
    refused = ctscan("models", "calibrate-ensemble", "--store", str(store_path), "--data", str(data_dir),
                     "--data", str(radiopaedia_dir))
    assert refused.returncode == 2, refused.stderr
    message = refused.stderr.strip()
    for name in ("mobilenetv2", "inceptionv3"):
        assert f"{name} " in message
    assert message.count("on the ensemble's val sources, val") == 2, message
    assert message.count(f"(worst val source: {radiopaedia_dir.name})") == 2, message
    assert "(worst val source: sirm-covid-ct)" in message  # densenet121: its own card's failure
    assert open_store(store_path).ensemble_record() == before
