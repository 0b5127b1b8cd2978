"""Training jobs end to end: real Redis, real `ctscan serve worker` processes, S3 over HTTP."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(600)


def _store(env: dict[str, str]) -> Any:
    from ctscan.storage.store import open_store

    return open_store(env["CTSCAN_MODEL_STORE"])


def _epochs(record: dict[str, Any]) -> list[int]:
    return [p["epoch"] for p in record["progress"]]


def test_job_runs_from_submission_to_a_promoted_model(
        start_worker: Callable[..., Any], ctscan_cli: Callable[..., Any], published_dataset: tuple[str, str],
        trainer_env: dict[str, str], real_ct_images: dict[str, Path], tmp_path: Path) -> None:
    from ctscan.data.dataset import load_sample_pixels
    from ctscan.models import load_keras_model

    worker = start_worker()
    submitted = ctscan_cli("jobs", "submit", "--model", "mobilenetv2", "--dataset", published_dataset[0],
                           "--dataset-version", published_dataset[1], "--init", "none", "--epochs", "2",
                           "--hp", "input_size=32", "--hp", "batch_size=4", "--hp", "augment=false", "--wait")
    assert submitted.returncode == 0, submitted.stderr + worker.output()
    record = json.loads(submitted.stdout)
    # --wait followed the progress epoch by epoch.
    assert "epoch 1/2" in submitted.stderr and "epoch 2/2" in submitted.stderr
    assert record["state"] == "succeeded" and record["error"] is None
    assert _epochs(record) == [1, 2]
    assert all(0.0 <= p["val_auc"] <= 1.0 and p["loss"] > 0 for p in record["progress"])
    assert record["started_at"] <= record["finished_at"] and record["device"] == "CPU"

    store = _store(trainer_env)
    assert record["result_version"] == record["id"] in store.list_versions("mobilenetv2")
    card = store.card("mobilenetv2", record["result_version"])
    assert (card.job or {})["dataset_version"] == published_dataset[1] and card.input_size == 32
    # First model of this store: nothing to beat, so it becomes production.
    assert record["promoted"] is True and store.production("mobilenetv2") == record["result_version"]
    gate = record["promotion"]
    assert {k: gate[k] for k in ("metric", "split", "candidate", "production_version", "production", "promoted")} \
        == {"metric": "auc", "split": "val", "candidate": card["metrics"]["val"]["auc"],
            "production_version": None, "production": None, "promoted": True}
    assert gate["reason"] == "no production version to compare with; the floors are met"

    # The record is durable and listed; its model loads from S3 and classifies a real CT image.
    listed = ctscan_cli("jobs", "list", "--json")
    assert record["id"] in [r["id"] for r in json.loads(listed.stdout)]
    model, loaded_card = load_keras_model(store, "mobilenetv2")
    assert loaded_card.version == record["id"]
    from ctscan.data.dataset import LABELS, Sample

    image = real_ct_images[next(iter(real_ct_images))]
    pixels = load_sample_pixels(Sample(image, image.name, LABELS[0], "test"), 32)
    probability = float(np.asarray(model(pixels[None].astype(np.float32), training=False)).reshape(-1)[0])
    assert 0.0 <= probability <= 1.0
    # What the library decides for this image with the stored card (preprocessing, gate,
    # calibration): the service must answer the same.
    from ctscan.imaging.decoding import decode_image
    from ctscan.serving.predictor import Predictor

    expected = Predictor.from_store(store, ["mobilenetv2"]).classify(
        [decode_image(image.read_bytes())], model="mobilenetv2")[0].decision

    # The inference service reads the same S3 store and serves the promoted version
    # (CTSCAN_MODEL_STORE in env, an s3:// URL, overrides the local store_dir).
    from inference.conftest import start_service, stop_service

    inference = start_service(store_dir=tmp_path, log_path=tmp_path / "inference.log", env={
        **trainer_env, "INFERENCE_MODELS": "mobilenetv2", "INFERENCE_USE_ONNX": "false",
        "INFERENCE_RELOAD_POLL_SECONDS": "0"})
    try:
        served = inference.get("/models").json()
        answer = inference.predict(image.read_bytes(), filename=image.name, params={"model": "mobilenetv2"})
    finally:
        stop_service(inference)
    assert [(m["name"], m["version"]) for m in served["models"]] == [("mobilenetv2", record["id"])]
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model_version"] == record["id"] and body["disclaimer"]
    assert body["outcome"] == expected.outcome
    if expected.probability_covid is None:
        assert body["probability_covid"] is None
    else:
        assert body["probability_covid"] == pytest.approx(expected.probability_covid, abs=1e-3)


def test_cancelled_job_stops_within_an_epoch_and_keeps_its_record(
        wait_until: Callable[..., Any],
        start_worker: Callable[..., Any], tiny_job: Callable[..., dict[str, Any]],
        wait_job: Callable[..., dict[str, Any]], jobs_client: Any, admin_token: str,
        trainer_env: dict[str, str]) -> None:
    start_worker()
    job = tiny_job(40)
    running = wait_until(lambda: (r := jobs_client.get(job["id"])).progress and r, timeout=240,
                       what="the first epoch", interval=0.3)
    epochs_at_cancel = len(running.progress)
    jobs_client.cancel(job["id"], admin_token=admin_token)
    record = wait_job(job["id"], {"cancelled", "failed", "succeeded"}, timeout=120)
    assert record["state"] == "cancelled" and record["error"] == "cancelled by an admin"
    assert len(record["progress"]) <= epochs_at_cancel + 1 < 40
    assert record["finished_at"] and record["result_version"] is None
    assert job["id"] not in _store(trainer_env).list_versions("mobilenetv2")
    # Cancelling again is harmless and the record stays as it was.
    assert jobs_client.cancel(job["id"], admin_token=admin_token).state == "cancelled"
    # The worker's reaper deletes the checkpoints of the cancelled job (retention 0 here).
    from ctscan.storage.objects import open_objects

    runs = open_objects(trainer_env["CTSCAN_MODEL_STORE"]).child(f".runs/{job['id']}")
    wait_until(lambda: not list(runs.walk()), timeout=60, what="the checkpoints to be collected")


def test_job_resumes_from_its_checkpoint_after_the_worker_is_killed(
        wait_until: Callable[..., Any], record_fault: Callable[..., None],
        start_worker: Callable[..., Any], tiny_job: Callable[..., dict[str, Any]],
        wait_job: Callable[..., dict[str, Any]], jobs_client: Any) -> None:
    # The broker's visibility timeout stays at its default (hours): the second worker's
    # reaper notices the expired lease and requeues the job, the broker does not.
    first = start_worker()
    job = tiny_job(5, input_size=48)
    wait_until(lambda: jobs_client.get(job["id"]).progress, timeout=240, what="the first checkpoint",
             interval=0.2)
    first.kill()  # SIGKILL to the whole process group: no chance to clean up
    killed_at = time.monotonic()
    at_kill = jobs_client.get(job["id"])
    assert at_kill.state == "running", "the job finished before the worker could be killed"
    checkpointed = len(at_kill.progress)

    second = start_worker()
    resumed = wait_until(lambda: (r := jobs_client.get(job["id"])).attempts == 2 and r.state == "running" and r,
                         timeout=300, what="the second attempt", interval=0.3)
    resumed_after = time.monotonic() - killed_at
    record = wait_job(job["id"], {"succeeded", "failed", "cancelled"}, timeout=300)
    assert record["state"] == "succeeded", (record["error"], second.output())
    assert record["attempts"] == 2 and resumed.worker != at_kill.worker
    assert [a["outcome"] for a in record["attempt_log"]] == [
        f"worker {at_kill.worker} stopped heartbeating (lease expired)", "succeeded"]
    assert record["resumed_from_epoch"] >= checkpointed >= 1
    # Each epoch ran once in the record: training continued rather than starting over.
    assert _epochs(record) == [1, 2, 3, 4, 5]
    assert record["result_version"] == job["id"]
    record_fault("kill -9 of the worker's process group", outcome="resumed from checkpoint, succeeded",
                 seconds_from_kill_to_running_again=round(resumed_after, 1),
                 seconds_from_kill_to_succeeded=round(time.monotonic() - killed_at, 1))


def test_redis_restart_loses_no_job_record(
        wait_until: Callable[..., Any],
        start_worker: Callable[..., Any], tiny_job: Callable[..., dict[str, Any]],
        wait_job: Callable[..., dict[str, Any]], jobs_client: Any, redis_server: Any) -> None:
    start_worker()
    before = tiny_job(3)
    wait_until(lambda: jobs_client.get(before["id"]).progress, timeout=240, what="the first epoch",
             interval=0.3)
    redis_server.stop()  # no persistence: everything in Redis is gone
    time.sleep(1)
    redis_server.start()

    record = wait_job(before["id"], {"succeeded", "failed", "cancelled"}, timeout=240)
    assert record["state"] == "succeeded" and _epochs(record) == [1, 2, 3]
    # History is intact and the service keeps working after the restart.
    after = tiny_job(1)
    assert wait_job(after["id"], {"succeeded", "failed", "cancelled"}, timeout=240)["state"] == "succeeded"
    listed = {r.id: r.state for r in jobs_client.list_jobs()}
    assert listed[before["id"]] == "succeeded" and listed[after["id"]] == "succeeded"


def test_unreachable_s3_fails_the_job_clearly_and_promotes_nothing(
        wait_until: Callable[..., Any], s3_proxy: Callable[[], Any],
        start_worker: Callable[..., Any], tiny_job: Callable[..., dict[str, Any]],
        wait_job: Callable[..., dict[str, Any]], jobs_client: Any,
        trainer_env: dict[str, str]) -> None:
    # The worker reaches S3 through a proxy we can cut; the test itself still sees S3.
    proxy = s3_proxy()
    # An outage longer than the job's outage budget (5 s here) fails it.
    start_worker(CTSCAN_S3_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}", CTSCAN_TRAINER_S3_OUTAGE_BUDGET="5")
    store = _store(trainer_env)
    production_before = store.production("mobilenetv2")
    job = tiny_job(30)
    wait_until(lambda: jobs_client.get(job["id"]).progress, timeout=240, what="the first epoch",
             interval=0.3)
    proxy.cut()

    record = wait_job(job["id"], {"failed", "succeeded", "cancelled"}, timeout=180)
    assert record["state"] == "failed"
    assert f"S3 endpoint http://127.0.0.1:{proxy.port} is unreachable" in record["error"]
    assert "Traceback" not in record["error"]
    assert job["id"] not in store.list_versions("mobilenetv2")
    assert store.production("mobilenetv2") == production_before
    # The repaired record is durable: it reads the same without the result backend.
    assert jobs_client.records.get(job["id"]).state == "failed"


def test_a_worker_runs_only_jobs_signed_with_its_own_admin_token(
        start_worker: Callable[..., Any], jobs_client: Any, published_dataset: tuple[str, str],
        wait_job: Callable[..., dict[str, Any]], trainer_env: dict[str, str], admin_token: str) -> None:
    from ctscan.access.admin_credential import AdminVerifier
    from ctscan.storage.job_records import new_job_id, now, sign
    from ctscan.storage.records import JobRecord
    from services.trainer.celery_app import TASK_RUN_JOB, app

    start_worker()
    # The worker published a verifier of its token: a client holding another one is refused at once...
    verifier = AdminVerifier(jobs_client.records.objects)
    assert verifier.state(admin_token) == "match"
    assert verifier.state("another-admin-token") == "mismatch"
    # ...and a job that reaches the queue without the right signature (written straight to the
    # store and the broker, as someone with access to both but not the token could) is not run.
    forged = JobRecord(id=new_job_id(), state="queued", model="mobilenetv2", dataset=published_dataset[0],
                       dataset_version=published_dataset[1], init="none", epochs=1,
                       hyperparameters={"input_size": 32}, created_at=now())
    forged.signature = sign(forged, "another-admin-token")
    jobs_client.records.create(forged)
    app.send_task(TASK_RUN_JOB, args=[forged.id], task_id=forged.id, queue=trainer_env["CTSCAN_TRAINER_QUEUE"])
    record = wait_job(forged.id, {"failed", "succeeded", "cancelled"}, timeout=120)
    assert record["state"] == "failed" and record["error"].startswith("admin token rejected")
    assert record["progress"] == [] and forged.id not in _store(trainer_env).list_versions("mobilenetv2")


def test_a_job_trains_on_several_published_datasets_at_once(
        start_worker: Callable[..., Any], ctscan_cli: Callable[..., Any], published_dataset: tuple[str, str],
        published_second_dataset: tuple[str, str], trainer_env: dict[str, str]) -> None:
    bad = ctscan_cli("jobs", "submit", "--model", "mobilenetv2", "--dataset", published_dataset[0],
                     "--dataset-version", published_dataset[1], "--also", "no-version-here")
    assert bad.returncode == 2 and "NAME@VERSION" in bad.stderr
    twice = ctscan_cli("jobs", "submit", "--model", "mobilenetv2", "--dataset", published_dataset[0],
                       "--dataset-version", published_dataset[1], "--also", "@".join(published_dataset))
    assert twice.returncode != 0 and "named twice" in twice.stderr
    worker = start_worker()
    submitted = ctscan_cli("jobs", "submit", "--model", "mobilenetv2", "--dataset", published_dataset[0],
                           "--dataset-version", published_dataset[1], "--also", "@".join(published_second_dataset),
                           "--init", "none", "--epochs", "1", "--hp", "input_size=32", "--hp", "batch_size=4",
                           "--hp", "augment=false", "--hp", "anatomy_balance=true", "--hp", "input_gate=false",
                           "--wait")
    assert submitted.returncode == 0, submitted.stderr + worker.output()
    record = json.loads(submitted.stdout)
    assert record["state"] == "succeeded", record["error"]
    assert record["extra_datasets"] == [{"dataset": published_second_dataset[0],
                                         "dataset_version": published_second_dataset[1]}]
    card = _store(trainer_env).card("mobilenetv2", record["result_version"])
    sources = (card.dataset or {})["sources"]
    assert len(sources) == 2 and all(s["train_images"] == 12 and s["val_images"] == 8 for s in sources)
    assert len(card.metrics["val_sources"]) == 2
    assert card.job["extra_datasets"] == record["extra_datasets"]  # type: ignore[index]
