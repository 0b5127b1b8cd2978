"""Training on several sources: per-source and anatomy-balanced weights, the selection rule,
and a real run on two data sets whose card records the sources."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ctscan.data.dataset import source_weights
from ctscan.errors import CTScanError
from ctscan.training.callbacks import selection_auc
from ctscan.training.runs import TrainConfig


def test_each_source_and_each_class_within_it_weigh_the_same() -> None:
    targets = np.array([1] * 90 + [0] * 10 + [1] * 5 + [0] * 15, np.float32)
    sources = np.array(["big"] * 100 + ["small"] * 20)
    weights = source_weights(targets, sources)
    for source in ("big", "small"):
        for label in (0, 1):
            chosen = (sources == source) & (targets == label)
            assert weights[chosen].sum() == pytest.approx(len(targets) / 4)
    assert weights.mean() == pytest.approx(1.0)


def test_anatomy_weights_take_the_lung_area_signal_out_of_the_labels() -> None:
    rng = np.random.default_rng(0)
    lung = rng.uniform(0, 1, 400)
    targets = (rng.uniform(0, 1, 400) < 0.2 + 0.6 * lung).astype(np.float32)  # big lungs: mostly COVID
    anatomy = np.stack([lung, lung + rng.normal(0, 0.05, 400)], axis=1)
    sources = np.array(["s"] * 400)

    def weighted_gap(weights: np.ndarray) -> float:
        covid, clean = targets == 1, targets == 0
        return abs(np.average(lung[covid], weights=weights[covid]) - np.average(lung[clean], weights=weights[clean]))

    plain = source_weights(targets, sources)
    balanced = source_weights(targets, sources, anatomy)
    assert weighted_gap(plain) > 0.15
    assert weighted_gap(balanced) < weighted_gap(plain) / 3


def test_selection_takes_the_worst_source_with_both_classes() -> None:
    targets = np.array([1, 0, 1, 0, 1, 1], np.float32)
    scores = np.array([0.9, 0.1, 0.2, 0.8, 0.5, 0.6])
    sources = np.array(["a", "a", "b", "b", "covid-only", "covid-only"])
    worst, per_source = selection_auc(targets, scores, sources)
    assert per_source == {"a": 1.0, "b": 0.0} and worst == 0.0
    single, none = selection_auc(targets[:2], scores[:2], sources[:2])
    assert single == 1.0 and none == {"a": 1.0}


def test_the_same_source_twice_is_refused(data_dir: Path) -> None:
    config = TrainConfig(model="mobilenetv2", data_dir=str(data_dir), extra_data_dirs=[str(data_dir)], init="none")
    with pytest.raises(CTScanError, match="another source"):
        config.validate()


@pytest.mark.slow
def test_a_run_on_two_sources_records_them_and_selects_on_the_worst(
        data_dir: Path, radiopaedia_dir: Path, tmp_path: Path) -> None:
    from ctscan.publishing import train_and_store
    from ctscan.storage.store import open_store

    config = TrainConfig(model="mobilenetv2", data_dir=str(data_dir), extra_data_dirs=[str(radiopaedia_dir)],
                         init="none", input_size=32, epochs=1, batch_size=8, limit_per_class=3,
                         preprocessing="lung-v2", augmentation="lesion", anatomy_balance=True, input_gate=False)
    _, card, _ = train_and_store(config, run_dir=tmp_path / "run", store=open_store(tmp_path / "store"),
                                 promote="never", verbose=0)
    sources = card.dataset["sources"]  # type: ignore[index]
    assert [s["name"] for s in sources] == ["ucsd-covid-ct", "radiopaedia-covid-seg"]
    assert all(s["train_images"] == 6 and len(s["fingerprint"]) == 64 for s in sources)
    assert card.dataset["fingerprint"] not in {s["fingerprint"] for s in sources}  # type: ignore[index]
    assert set(card.metrics["val_sources"]) == {"ucsd-covid-ct", "radiopaedia-covid-seg"}
    history = card.history or []
    assert history[0]["val_auc"] == min(history[0]["val_sources"].values())
    assert card.preprocessing == {"name": "lung-v2"}


@pytest.mark.slow
def test_the_weight_average_is_judged_by_the_epochs_own_rule(
        data_dir: Path, radiopaedia_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # SWA once won on the pooled val AUC against the epochs' worst-source AUC.
    import ctscan.training.callbacks as callbacks
    from ctscan.training.runs import Trainer

    seen: list[tuple[float, dict[str, float]]] = []

    def spy(targets: np.ndarray, probabilities: np.ndarray,
            sources: np.ndarray | None) -> tuple[float, dict[str, float]]:
        result = selection_auc(targets, probabilities, sources)
        seen.append(result)
        return result

    monkeypatch.setattr(callbacks, "selection_auc", spy)
    config = TrainConfig(model="mobilenetv2", data_dir=str(data_dir), extra_data_dirs=[str(radiopaedia_dir)],
                         init="none", input_size=32, epochs=2, swa_epochs=2, batch_size=8, limit_per_class=3,
                         input_gate=False)
    _, state, _ = Trainer(config, tmp_path / "run", verbose=0).run()
    assert state.swa_count == 2 and len(seen) == 3  # two epochs, then the average
    worst, per_source = seen[-1]
    assert len(per_source) == 2 and state.swa_val_auc == worst == min(per_source.values())


@pytest.mark.slow
def test_the_ensemble_is_calibrated_on_the_val_splits_of_several_sources(
        tiny_model_store: Path, data_dir: Path, radiopaedia_dir: Path, tmp_path: Path) -> None:
    import shutil

    from ctscan.data.dataset import CTDataset
    from ctscan.evaluation.reports import calibrate_ensemble
    from ctscan.storage.store import open_store
    from ctscan.training.runs import combined_fingerprint

    copy = shutil.copytree(tiny_model_store, tmp_path / "store")  # the shared fixture keeps its record
    record = calibrate_ensemble(store=open_store(copy), data_dir=str(data_dir), extra_data_dirs=[str(radiopaedia_dir)],
                                limit_per_class=3, members=open_store(copy).list_models())
    assert set(record.metrics["val_sources"]) == {"ucsd-covid-ct", "radiopaedia-covid-seg"}
    assert record.metrics["val"]["confusion_matrix"] is not None
    assert sum(sum(map(sum, m["confusion_matrix"])) for m in record.metrics["val_sources"].values()) == 12
    assert record.dataset_fingerprint == combined_fingerprint(
        [{"fingerprint": CTDataset(d).fingerprint()} for d in (data_dir, radiopaedia_dir)])
    assert open_store(copy).ensemble_record() == record


def test_a_source_share_scales_that_source_and_keeps_its_classes_even() -> None:
    targets = np.array([1] * 30 + [0] * 10 + [1] * 5 + [0] * 15, np.float32)
    sources = np.array(["ucsd"] * 40 + ["radio"] * 20)
    weights = source_weights(targets, sources, shares={"ucsd": 2.0})
    total = {name: weights[sources == name].sum() for name in ("ucsd", "radio")}
    assert total["ucsd"] == pytest.approx(2 * total["radio"])
    for name in ("ucsd", "radio"):
        chosen = sources == name
        assert weights[chosen & (targets == 1)].sum() == pytest.approx(weights[chosen & (targets == 0)].sum())


def test_a_share_for_a_source_not_trained_on_is_refused(data_dir: Path) -> None:
    config = TrainConfig(model="mobilenetv2", data_dir=str(data_dir), init="none",
                         source_weights={"elsewhere": 2.0})
    with pytest.raises(CTScanError, match="not among the sources"):
        config.validate()
