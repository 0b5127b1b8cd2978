"""The shipped release in models/: verified on load, and its cards' numbers reproduce."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ctscan.errors import ChecksumError
from ctscan.evaluation.reports import evaluate_store
from ctscan.models import ensemble_members, load_keras_model
from ctscan.release import seed_store
from ctscan.storage.store import ONNX_FOLDER, WEIGHTS_FILE, open_store

RELEASE = Path(__file__).resolve().parents[2] / "models"


def test_release_holds_all_three_models_within_size_limits() -> None:
    release = open_store(RELEASE)
    assert set(release.list_models()) == set(ensemble_members())
    total = 0
    for path in RELEASE.rglob("*"):
        if path.is_file() and ONNX_FOLDER not in path.relative_to(RELEASE).parts:  # ONNX copies: not committed
            assert path.stat().st_size < 50 * 1024 * 1024, path
            total += path.stat().st_size
    assert total < 80 * 1024 * 1024
    for name in ensemble_members():
        card = release.card(name, release.production(name) or "")
        assert card.init == "none" and "test" in card.metrics and "val" in card.metrics


@pytest.mark.slow
def test_release_metrics_reproduce_from_a_seeded_store(tmp_path: Path, data_dir: Path) -> None:
    store = open_store(tmp_path / "store")
    seeded = seed_store(RELEASE, store)
    assert len(seeded["promoted"]) == 3
    report = evaluate_store(store=store, data_dir=str(data_dir), split="test", resamples=50)
    for name in ensemble_members():
        card = store.card(name, store.production(name) or "")
        for metric in ("accuracy", "precision", "recall", "f1", "auc"):
            assert report["models"][name][metric] == pytest.approx(card.metrics["test"][metric], abs=1e-9)
    assert report["models"]["ensemble"]["threshold_source"] == "val-calibrated"


def test_a_release_with_corrupted_weights_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "release"
    shutil.copytree(RELEASE / "mobilenetv2", copy / "mobilenetv2")
    store = open_store(copy)
    version = store.production("mobilenetv2") or ""
    weights = copy / "mobilenetv2" / version / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[1000] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="refusing to load"):
        load_keras_model(store, "mobilenetv2")
