"""The `ctscan` command end to end on real data, and its one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def saved_versions(store_dir: Path, name: str, count: int) -> list[str]:
    """`count` versions of `name` written through the store (their weights are never loaded)."""
    from ctscan.storage.store import open_store

    store = open_store(store_dir)
    return [store.save(name, weights=f"weights {index}".encode(), version=f"2026010{index + 1}T000000Z-000{index}",
                       card={"architecture": name, "input_size": 32, "init": "none", "threshold": 0.5,
                             "metrics": {"val": {"auc": 0.6 + index / 10}}}) for index in range(count)]


def ctscan(*args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ctscan.cli", *args], capture_output=True, text=True, timeout=timeout,
        cwd=REPO_ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})},
    )


@pytest.mark.slow
def test_train_one_epoch_then_evaluate_on_test(data_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    trained = ctscan("train", "--model", "mobilenetv2", "--init", "none", "--epochs", "1",
                     "--input-size", "64", "--limit-per-class", "12", "--data", str(data_dir),
                     "--store", str(store), "--run-dir", str(tmp_path / "run"),
                     # One epoch on 24 images is no classifier: the promotion floors are off here.
                     env={"CTSCAN_PROMOTION_MIN_AUC": "0", "CTSCAN_PROMOTION_MIN_BALANCED_ACCURACY": "0"})
    assert trained.returncode == 0, trained.stderr[-2000:]
    summary = json.loads(trained.stdout[trained.stdout.index("{"):])
    assert summary["promoted"] is True and summary["init"] == "none"
    card = json.loads((store / "mobilenetv2" / summary["version"] / "card.json").read_text())
    assert card["dataset"]["train_images"] == 24 and card["epochs_run"] == 1
    assert card["environment"]["tensorflow"] and "disclaimer" not in card and card["intended_use"]
    assert (tmp_path / "run" / "history.png").stat().st_size > 1000

    evaluated = ctscan("evaluate", "--model", "mobilenetv2", "--split", "test", "--data", str(data_dir),
                       "--store", str(store), "--json", "--resamples", "200", "--out", str(tmp_path / "plots"))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    report = json.loads(evaluated.stdout)
    metrics = report["models"]["mobilenetv2"]
    assert report["split"] == "test" and report["dataset"]["images"] == 203
    for key in ("accuracy", "precision", "recall", "f1", "auc", "threshold", "confusion_matrix", "ci95"):
        assert key in metrics
    assert sum(map(sum, metrics["confusion_matrix"])) == 203
    assert metrics["ci95"]["accuracy"][0] <= metrics["accuracy"] <= metrics["ci95"]["accuracy"][1]
    assert (tmp_path / "plots" / "roc_mobilenetv2.png").is_file()
    assert (tmp_path / "plots" / "confusion_mobilenetv2.png").is_file()


@pytest.mark.slow
def test_an_interrupted_run_resumes_after_its_last_finished_epoch(data_dir: Path, tmp_path: Path) -> None:
    from ctscan.publishing import train_and_store
    from ctscan.storage.store import open_store
    from ctscan.training.runs import EpochReport, TrainConfig, Trainer, TrainingCancelled

    config = TrainConfig(model="mobilenetv2", data_dir=str(data_dir), init="none", input_size=32,
                         epochs=2, batch_size=8, limit_per_class=4)
    store = open_store(tmp_path / "store")

    def stop_after_first_epoch(report: EpochReport) -> None:
        raise TrainingCancelled(f"stopped after epoch {report.epoch}")

    with pytest.raises(TrainingCancelled):
        train_and_store(config, run_dir=tmp_path / "run", store=store, on_epoch=stop_after_first_epoch, verbose=0)
    assert store.list_models() == []  # nothing stored by an unfinished run
    with pytest.raises(Exception, match="already holds a checkpoint"):
        Trainer(config, tmp_path / "run", verbose=0).run(resume=False)
    seen: list[int] = []
    _, card, _ = train_and_store(config, run_dir=tmp_path / "run", store=store, resume=True, verbose=0,
                                 on_epoch=lambda report: seen.append(report.epoch))
    assert seen == [2]  # epoch 1 was not trained again
    assert [h["epoch"] for h in card.history or []] == [1, 2]
    assert len(store.list_versions("mobilenetv2")) == 1


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs."""


@pytest.mark.slow
def test_a_run_killed_while_writing_its_checkpoint_still_resumes(data_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import keras

    from ctscan.training.runs import BEST_WEIGHTS, LAST_CHECKPOINT, EpochReport, TrainConfig, Trainer, TrainingCancelled

    config = TrainConfig(model="mobilenetv2", data_dir=str(data_dir), init="none", input_size=32,
                         epochs=3, batch_size=8, limit_per_class=4)
    run = tmp_path / "run"

    def stop_after_first_epoch(report: EpochReport) -> None:
        raise TrainingCancelled("stopped")

    with pytest.raises(TrainingCancelled):
        Trainer(config, run, verbose=0, on_epoch=stop_after_first_epoch).run()
    assert (run / LAST_CHECKPOINT).is_file() and (run / BEST_WEIGHTS).is_file()
    assert not list(run.glob("partial-*"))
    checkpoint, best = (run / LAST_CHECKPOINT).read_bytes(), (run / BEST_WEIGHTS).read_bytes()

    real_save = keras.Model.save

    def killed_halfway(model: object, path: object, *args: object, **kwargs: object) -> None:
        real_save(model, path, *args, **kwargs)  # type: ignore[arg-type]
        data = Path(str(path)).read_bytes()
        Path(str(path)).write_bytes(data[: len(data) // 3])  # the kill leaves a third of the file
        raise _Killed

    monkeypatch.setattr(keras.Model, "save", killed_halfway)
    with pytest.raises(_Killed):
        Trainer(config, run, verbose=0).run(resume=True)
    monkeypatch.setattr(keras.Model, "save", real_save)
    # The finished epoch's checkpoint and best weights are untouched; the torn write is aside.
    assert (run / LAST_CHECKPOINT).read_bytes() == checkpoint
    assert (run / BEST_WEIGHTS).read_bytes() == best
    seen: list[int] = []
    _, state, _ = Trainer(config, run, verbose=0, on_epoch=lambda report: seen.append(report.epoch)).run(resume=True)
    assert seen == [2, 3]  # epoch 2 is trained again, from epoch 1's checkpoint
    assert [h["epoch"] for h in state.history] == [1, 2, 3]
    assert not list(run.glob("partial-*"))


def _one_line_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("ctscan")]
    assert len(lines) == 1 and fragment in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # four CLI processes
def test_wrong_input_ends_with_one_clear_line(data_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    base = ["train", "--init", "none", "--epochs", "1", "--input-size", "32", "--limit-per-class", "2",
            "--store", str(store), "--run-dir", str(tmp_path / "run")]
    _one_line_error(ctscan(*base, "--model", "resnet", "--data", str(data_dir)), "unknown model 'resnet'")
    _one_line_error(ctscan(*base, "--model", "mobilenetv2", "--data", str(tmp_path / "missing")),
                    "dataset folder not found")
    _one_line_error(ctscan("train", "--model", "mobilenetv2", "--init", "/nope.h5", "--data", str(data_dir),
                           "--store", str(store)), "neither 'imagenet'")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "split.csv").write_text("path,label,split\nx.png,covid,train\n")
    _one_line_error(ctscan(*base, "--model", "mobilenetv2", "--data", str(bad)), "split.csv:2")
    assert not store.exists() or not any(store.iterdir())


@pytest.mark.slow  # a CLI process that loads data
def test_a_failed_run_leaves_the_store_untouched(data_dir: Path, tmp_path: Path) -> None:
    import shutil

    from ctscan.data.dataset import CTDataset

    store = tmp_path / "store"
    saved_versions(store, "mobilenetv2", 1)
    before = sorted(p.relative_to(store).as_posix() for p in store.rglob("*"))
    snapshot = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}

    # a dataset copy with one unreadable image
    copy = tmp_path / "data"
    dataset = CTDataset(data_dir)
    samples = dataset.split("train")[:3] + dataset.split("val")[:3]
    rows = ["path,label,split"]
    for sample in samples:
        (copy / sample.relative_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample.path, copy / sample.relative_path)
        rows.append(f"{sample.relative_path},{sample.label},{sample.split}")
    (copy / "split.csv").write_text("\n".join(rows) + "\n")
    (copy / samples[0].relative_path).write_bytes(b"not a png")
    failed = ctscan("train", "--model", "mobilenetv2", "--init", "none", "--epochs", "1", "--input-size", "32",
                    "--data", str(copy), "--store", str(store), "--run-dir", str(tmp_path / "run2"),
                    "--promote", "always")
    _one_line_error(failed, "cannot load")
    assert sorted(p.relative_to(store).as_posix() for p in store.rglob("*")) == before
    assert all(p.read_bytes() == data for p, data in snapshot.items())


@pytest.mark.slow  # eight CLI processes
def test_models_list_promote_and_rollback(tmp_path: Path) -> None:
    store = tmp_path / "store"
    admin = {"CTSCAN_ADMIN_TOKEN": "cli-test-admin-token-0123456789", "CTSCAN_AUDIT_DIR": str(tmp_path / "audit")}
    versions_saved = saved_versions(store, "mobilenetv2", 2)
    assert ctscan("admin", "init", "--store", str(store), env=admin).returncode == 0  # set-up
    # Without the admin credential nothing changes production.
    _one_line_error(ctscan("models", "promote", "mobilenetv2", versions_saved[0], "--store", str(store),
                           env={"CTSCAN_ADMIN_TOKEN": ""}), "CTSCAN_ADMIN_TOKEN")
    for version in versions_saved:
        assert ctscan("models", "promote", "mobilenetv2", version, "--store", str(store), env=admin).returncode == 0
    listing = json.loads(ctscan("models", "list", "--store", str(store)).stdout)
    versions = [v["version"] for v in listing["mobilenetv2"]]
    assert len(versions) == 2 and listing["mobilenetv2"][1]["production"] is True
    assert listing["mobilenetv2"][1]["val"] == {"auc": 0.7} and listing["mobilenetv2"][1]["onnx"] is False
    _one_line_error(ctscan("models", "rollback", "mobilenetv2", "--store", str(store),
                           env={"CTSCAN_ADMIN_TOKEN": ""}), "CTSCAN_ADMIN_TOKEN")
    rolled = ctscan("models", "rollback", "mobilenetv2", "--store", str(store), env=admin)
    assert rolled.returncode == 0 and versions[0] in rolled.stdout
    promoted = ctscan("models", "promote", "mobilenetv2", versions[1], "--store", str(store), env=admin)
    assert promoted.returncode == 0
    # Each change of production is in the audit trail, by the operating-system user.
    from ctscan.access.audit_trail import read_events

    changes = [(e.action, e.model, e.model_version, e.actor_kind) for e in read_events(tmp_path / "audit")]
    # The set-up's `ctscan admin init` is an audited admin action too, before any promotion.
    assert changes == [("admin_init", None, None, "cli"),
                       ("promote", "mobilenetv2", versions[0], "cli"), ("promote", "mobilenetv2", versions[1], "cli"),
                       ("rollback", "mobilenetv2", versions[0], "cli"), ("promote", "mobilenetv2", versions[1], "cli")]
    _one_line_error(ctscan("models", "promote", "mobilenetv2", "nope", "--store", str(store), env=admin),
                    "no version nope")


@pytest.mark.slow
def test_evaluate_reports_lesion_true_numbers_with_the_two_baselines(
        tiny_model_store: Path, data_dir: Path, radiopaedia_dir: Path, ccccii_dir: Path) -> None:
    result = ctscan("evaluate", "--store", str(tiny_model_store), "--split", "test", "--lesions", "--json",
                    "--resamples", "20", "--data", str(radiopaedia_dir), "--data", str(ccccii_dir),
                    "--baseline-train", str(data_dir), "--baseline-train", str(radiopaedia_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert set(report["datasets"]) == {"radiopaedia-covid-seg", "ccccii-pneumonia-sample"}
    lesions = report["lesions"]
    assert "ucsd-covid-ct" in lesions["baselines"]["histogram-baseline"]
    radiopaedia = lesions["datasets"]["radiopaedia-covid-seg"]
    rows = radiopaedia["rows"]
    assert {"mobilenetv2", "densenet121", "inceptionv3", "ensemble", "density-baseline",
            "histogram-baseline"} <= set(rows)
    # The untrained density score: measured 0.89 pooled and 0.96 over the matched pairs.
    density = rows["density-baseline"]
    assert density["pooled_auc"] > 0.85 and density["matched_pairs"]["concordance"] > 0.9
    assert set(density["within_patient"]["patients"]) == {"patient3", "patient7"}
    assert radiopaedia["segmentation"]["dice"]["lungs"]["mean"] > 0.9
    served = rows["ensemble"]["served"]
    assert served["clean"]["slices"] == 115 and served["infected"]["slices"] == 72
    pneumonia = lesions["datasets"]["ccccii-pneumonia-sample"]["rows"]["ensemble"]
    assert pneumonia["pooled_auc"] is None and pneumonia["served"]["clean"]["slices"] == 144
    assert "infected" not in pneumonia["served"]
