"""S3 model store, dataset versions and the jobs API's refusals, against moto's S3 server."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ctscan.errors import (
    ChecksumError,
    CTScanError,
    DataError,
    StoreError,
    VersionExistsError,
)

CARD = {"architecture": "mobilenetv2", "input_size": 32, "threshold": 0.5, "metrics": {"val": {"auc": 0.7}}}


def test_s3_store_never_overwrites_a_version_and_promotes(trainer_env: dict[str, str]) -> None:
    from ctscan.storage.store import open_store

    store = open_store(trainer_env["CTSCAN_MODEL_STORE"] + "-unit")
    version = store.save("mobilenetv2", weights=b"first weights", card=CARD)
    with pytest.raises(VersionExistsError):
        store.save("mobilenetv2", weights=b"other weights", card=CARD, version=version)
    assert store.load_files("mobilenetv2", version)["weights.npz"] == b"first weights"
    assert store.list_models() == ["mobilenetv2"] and store.list_versions("mobilenetv2") == [version]
    store.promote("mobilenetv2", version, reason="test")
    second = store.save("mobilenetv2", weights=b"second", card=CARD)
    store.promote("mobilenetv2", second)
    assert store.rollback("mobilenetv2") == version and store.production("mobilenetv2") == version


def test_unreachable_s3_is_one_clear_error(trainer_env: dict[str, str]) -> None:
    from ctscan.settings import S3Settings
    from ctscan.storage.s3store import S3ObjectStore
    from ctscan.storage.store import ModelStore

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = S3Settings(CTSCAN_S3_ENDPOINT_URL=f"http://127.0.0.1:{port}", CTSCAN_S3_MAX_ATTEMPTS=2)
    store = ModelStore(S3ObjectStore.from_url("s3://some-bucket/models", settings=settings))
    with pytest.raises(StoreError, match=f"S3 endpoint http://127.0.0.1:{port} is unreachable"):
        store.list_models()


def test_dataset_upload_is_verified_versioned_and_fetch_detects_tampering(
        trainer_env: dict[str, str], tiny_dataset_dir: Path, tmp_path: Path) -> None:
    from ctscan.data.versions import fetch_dataset, list_dataset_versions, upload_dataset
    from ctscan.storage.s3store import S3ObjectStore

    datasets_url = trainer_env["CTSCAN_DATASETS_URL"] + "-unit"
    manifest = upload_dataset(tiny_dataset_dir, f"{datasets_url}/tiny", version="a")
    assert manifest.images_verified == 24 and manifest.url.endswith("/tiny/a")
    with pytest.raises(VersionExistsError):
        upload_dataset(tiny_dataset_dir, f"{datasets_url}/tiny", version="a")
    assert list_dataset_versions(datasets_url, "tiny") == ["a"]

    local = fetch_dataset(datasets_url, "tiny", "a", cache_dir=tmp_path / "cache")
    assert (local / "split.csv").read_bytes() == (tiny_dataset_dir / "split.csv").read_bytes()

    # A corrupted object in S3 is refused, and nothing half-verified is left in the cache.
    objects = S3ObjectStore.from_url(f"{datasets_url}/tiny/a")
    image = next(k for k in objects.walk() if k.endswith((".png", ".jpg")))
    objects.put(image, b"not the image that was published")
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        fetch_dataset(datasets_url, "tiny", "a", cache_dir=tmp_path / "other-cache")
    assert not (tmp_path / "other-cache" / "tiny" / "a").exists()
    with pytest.raises(DataError, match="no published version b"):
        fetch_dataset(datasets_url, "tiny", "b", cache_dir=tmp_path / "cache")


def test_upload_refuses_a_dataset_that_fails_its_checksums(trainer_env: dict[str, str], tiny_dataset_dir: Path,
                                                           tmp_path: Path) -> None:
    import shutil

    from ctscan.data.versions import upload_dataset

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dataset_dir, broken)
    image = next(p for p in broken.rglob("*") if p.suffix.lower() in (".png", ".jpg"))
    image.write_bytes(image.read_bytes()[:-10])
    with pytest.raises(ChecksumError):
        upload_dataset(broken, trainer_env["CTSCAN_DATASETS_URL"] + "-unit/broken", version="v1")


def test_jobs_api_refuses_bad_credentials_and_arguments(jobs_client: Any, published_dataset: tuple[str, str],
                                                        admin_token: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from ctscan.access.admin_credential import AdminVerifier
    from ctscan.settings import TrainerSettings
    from services.trainer.api import AdminAuthError, JobNotFoundError, JobsClient

    arguments: dict[str, Any] = {"model": "mobilenetv2", "dataset": published_dataset[0],
                                     "dataset_version": published_dataset[1], "init": "none", "epochs": 1,
                                     "hyperparameters": {"input_size": 32}}
    # What a worker with this token publishes when it starts (`ctscan serve worker`).
    AdminVerifier(jobs_client.records.objects).init(admin_token)
    with pytest.raises(AdminAuthError, match="rejected"):
        jobs_client.submit(**arguments, admin_token="wrong-token")
    monkeypatch.delenv("CTSCAN_ADMIN_TOKEN")
    unconfigured = JobsClient(TrainerSettings())
    with pytest.raises(AdminAuthError, match="CTSCAN_ADMIN_TOKEN is not configured"):
        unconfigured.submit(**arguments, admin_token=unconfigured.settings.admin.token())
    with pytest.raises(DataError, match="no published version nope"):
        jobs_client.submit(**{**arguments, "dataset_version": "nope"}, admin_token=admin_token)
    with pytest.raises(CTScanError, match="unknown hyper-parameter"):
        jobs_client.submit(**{**arguments, "hyperparameters": {"learning_rat": 0.1}}, admin_token=admin_token)
    with pytest.raises(CTScanError, match="unknown model"):
        jobs_client.submit(**{**arguments, "model": "resnet"}, admin_token=admin_token)
    with pytest.raises(JobNotFoundError):
        jobs_client.get("20990101T000000Z-00000000")
    assert all(r.state != "queued" or r.model == "mobilenetv2" for r in jobs_client.list_jobs())


def test_queued_job_cancelled_before_any_worker_takes_it(tiny_job: Callable[..., dict[str, Any]],
                                                         ctscan_cli: Callable[..., Any]) -> None:
    record = tiny_job(1)
    assert record["state"] == "queued"
    # Through the CLI, as an admin would.
    cancel = ctscan_cli("jobs", "cancel", record["id"])
    assert cancel.returncode == 0, cancel.stderr
    assert json.loads(cancel.stdout)["state"] == "cancelled"
    shown = ctscan_cli("jobs", "list")
    assert record["id"] in shown.stdout and "cancelled" in shown.stdout
    missing = ctscan_cli("jobs", "show", "no-such-job")
    assert missing.returncode == 2 and missing.stderr.startswith("ctscan: error: no job 'no-such-job'")
    assert "Traceback" not in missing.stderr
    no_token = ctscan_cli("jobs", "cancel", record["id"], CTSCAN_ADMIN_TOKEN="")
    assert no_token.returncode == 2 and "CTSCAN_ADMIN_TOKEN" in no_token.stderr
