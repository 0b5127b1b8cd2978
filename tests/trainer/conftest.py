"""Real services for the trainer tests: moto's S3 server over HTTP, a private redis-server,
Celery worker processes (`ctscan serve worker`) and a tiny real dataset published to S3.

Nothing here touches the machine's own Redis on 6379: every test run starts its own on a
free port. Only MinIO is replaced (by moto's server), because it cannot be installed here.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
CTSCAN = str(Path(sys.executable).with_name("ctscan"))
BUCKET = "ctscan-test"
ADMIN_TOKEN = "test-admin-" + uuid.uuid4().hex
DATASET = "covid-ct-tiny"
DATASET_VERSION = "v1"
# Small enough for two shared CPU cores: MobileNetV2 from scratch at 32 px on a few images.
TINY_HYPERPARAMETERS = {"input_size": 32, "batch_size": 4, "augment": False, "patience": 50}


def wait_for(predicate: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


# --- S3 ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


class TcpProxy:
    """A TCP forwarder in front of the S3 server whose `cut()` makes the endpoint
    unreachable for whoever uses it (a network outage), while the tests still reach S3."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.sockets: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self.sockets += [client, upstream]
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.close()
                except OSError:
                    pass

    def restore(self) -> None:
        """The endpoint answers again, on the same port (the outage is over)."""
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        self.closed = True
        self.listener.close()
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            except OSError:
                pass


# --- Redis ------------------------------------------------------------------------------------
class RedisServer:
    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # No persistence: a restart loses everything, like a flush.
        self.process = subprocess.Popen(
            ["/usr/bin/redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis.from_url(self.url)
        wait_for(lambda: _ping(client), timeout=15, what="redis-server to answer")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None


def _ping(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:  # not up yet
        return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


# --- environment shared by the test process, the CLI and the workers ----------------------------
@pytest.fixture(scope="session")
def trainer_env(s3_endpoint: str, redis_server: RedisServer,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    run = uuid.uuid4().hex[:8]
    env = {
        "REDIS_URL": redis_server.url,
        "CTSCAN_S3_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "CTSCAN_S3_MAX_ATTEMPTS": "2",
        "CTSCAN_S3_CONNECT_TIMEOUT": "2",
        "CTSCAN_MODEL_STORE": f"s3://{BUCKET}/{run}/models",
        "CTSCAN_DATASETS_URL": f"s3://{BUCKET}/{run}/datasets",
        "CTSCAN_ADMIN_TOKEN": ADMIN_TOKEN,
        "CTSCAN_TRAINER_QUEUE": f"training-{run}",
        "CTSCAN_TRAINER_WORK_DIR": str(tmp_path_factory.mktemp("trainer-work")),
        # The tiny models trained here are no classifiers: the gate's floors are off, except
        # where a test sets them.
        "CTSCAN_PROMOTION_MIN_AUC": "0",
        "CTSCAN_PROMOTION_MIN_BALANCED_ACCURACY": "0",
        # Liveness shortened so that a lost worker is noticed within seconds (production:
        # heartbeat 5 s, lease 30 s, reaper every 10 s, backoff 10 s doubling).
        "CTSCAN_TRAINER_HEARTBEAT_INTERVAL": "1",
        "CTSCAN_TRAINER_LEASE_TTL": "8",
        "CTSCAN_TRAINER_REAPER_INTERVAL": "2",
        "CTSCAN_TRAINER_RETRY_BACKOFF": "1",
        "CTSCAN_TRAINER_CHECKPOINT_RETENTION": "0",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "CUDA_VISIBLE_DEVICES": "",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    _reset_caches()
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    from ctscan.access.admin_credential import AdminVerifier

    AdminVerifier.for_store(env["CTSCAN_MODEL_STORE"]).init(ADMIN_TOKEN)  # set-up, as `ctscan admin init`
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _reset_caches()


def _reset_caches() -> None:
    from ctscan import settings
    from ctscan.storage import s3store

    settings.clear_caches()
    s3store._client.cache_clear()
    if "services.trainer.celery_app" in sys.modules:  # the app reads settings at import
        importlib.reload(sys.modules["services.trainer.celery_app"])


# --- data -------------------------------------------------------------------------------------
def copy_tiny_dataset(source_dir: Path, root: Path) -> Path:
    """A few real images per class and split of a data set, in its layout with its own SHA256SUMS."""
    from ctscan.data.dataset import LABELS, CTDataset

    per_split = {"train": 6, "val": 4, "test": 2}
    rows = []
    source = CTDataset(source_dir)
    for split, count in per_split.items():
        for label in LABELS:
            chosen = [s for s in source.samples if s.split == split and s.label == label][:count]
            for sample in chosen:
                (root / sample.relative_path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(sample.path, root / sample.relative_path)
                rows.append((sample.relative_path, label, split))
    with (root / "split.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    (root / "SHA256SUMS").write_text("".join(
        f"{hashlib.sha256((root / rel).read_bytes()).hexdigest()}  {rel}\n" for rel, _, _ in rows))
    return root


@pytest.fixture(scope="session")
def tiny_dataset_dir(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few real UCSD images per class and split, in the UCSD layout with its own SHA256SUMS."""
    return copy_tiny_dataset(data_dir, tmp_path_factory.mktemp("tiny-dataset"))


@pytest.fixture(scope="session")
def published_dataset(trainer_env: dict[str, str], tiny_dataset_dir: Path) -> tuple[str, str]:
    """The tiny dataset published to S3 with the real CLI (`ctscan data upload`)."""
    url = f"{trainer_env['CTSCAN_DATASETS_URL']}/{DATASET}"
    result = subprocess.run([CTSCAN, "data", "upload", str(tiny_dataset_dir), url, "--version", DATASET_VERSION],
                            check=False, capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    assert result.returncode == 0, result.stderr
    return DATASET, DATASET_VERSION


@pytest.fixture(scope="session")
def published_second_dataset(trainer_env: dict[str, str], radiopaedia_dir: Path,
                             tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A tiny copy of the Radiopaedia scans, published like the first: a second source."""
    folder = copy_tiny_dataset(radiopaedia_dir, tmp_path_factory.mktemp("tiny-radiopaedia"))
    url = f"{trainer_env['CTSCAN_DATASETS_URL']}/radiopaedia"
    result = subprocess.run([CTSCAN, "data", "upload", str(folder), url, "--version", DATASET_VERSION],
                            check=False, capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    assert result.returncode == 0, result.stderr
    return "radiopaedia", DATASET_VERSION


# --- workers ----------------------------------------------------------------------------------
class Worker:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self.log = log_path.open("wb")
        self.process = subprocess.Popen([CTSCAN, "serve", "worker", "--concurrency", "1"], env=env,
                                        stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                        cwd=REPO_ROOT)
        wait_for(lambda: b"ready." in log_path.read_bytes() or self.process.poll() is not None,
                 timeout=90, what="the Celery worker to be ready")
        assert self.process.poll() is None, self.output()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the worker and its pool children at once (a machine crash, for SIGKILL)."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.log.close()


@pytest.fixture
def start_worker(trainer_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    workers: list[Worker] = []

    def start(**overrides: str) -> Worker:
        env = {**os.environ, **trainer_env, **overrides}
        worker = Worker(env, tmp_path / f"worker-{len(workers)}.log")
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.kill()


@pytest.fixture
def jobs_client(trainer_env: dict[str, str]) -> Any:
    from services.trainer.api import JobsClient

    return JobsClient.from_settings()


def submit_tiny_job(client: Any, dataset: tuple[str, str], *, epochs: int, **hyperparameters: Any) -> dict[str, Any]:
    """The record as JSON, as `ctscan jobs` prints it."""
    record = client.submit(model="mobilenetv2", dataset=dataset[0], dataset_version=dataset[1], init="none",
                           epochs=epochs, hyperparameters={**TINY_HYPERPARAMETERS, **hyperparameters},
                           admin_token=ADMIN_TOKEN)
    return dict(record.model_dump(mode="json"))


def wait_for_state(client: Any, job_id: str, states: set[str], *, timeout: float = 240) -> dict[str, Any]:
    record = wait_for(lambda: (r := client.get(job_id)).state in states and r,
                      timeout=timeout, what=f"job {job_id} to reach {states}", interval=0.5)
    return dict(record.model_dump(mode="json"))


# Helpers handed to tests as fixtures (test modules do not import each other).
@pytest.fixture
def admin_token() -> str:
    return ADMIN_TOKEN


@pytest.fixture
def tiny_job(jobs_client: Any, published_dataset: tuple[str, str]) -> Callable[..., dict[str, Any]]:
    return lambda epochs, **hp: submit_tiny_job(jobs_client, published_dataset, epochs=epochs, **hp)


@pytest.fixture
def wait_job(jobs_client: Any) -> Callable[..., dict[str, Any]]:
    return lambda job_id, states, timeout=240: wait_for_state(jobs_client, job_id, set(states), timeout=timeout)


@pytest.fixture
def ctscan_cli(trainer_env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess[str]]:
    def run(*arguments: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CTSCAN, *arguments], check=False, capture_output=True, text=True,
                              env={**os.environ, **trainer_env, **env}, timeout=180)

    return run


@pytest.fixture
def wait_until() -> Callable[..., Any]:
    return wait_for


@pytest.fixture
def s3_proxy(s3_endpoint: str) -> Iterator[Callable[[], TcpProxy]]:
    proxies: list[TcpProxy] = []

    def make() -> TcpProxy:
        proxies.append(TcpProxy(int(s3_endpoint.rsplit(":", 1)[1])))
        return proxies[-1]

    yield make
    for proxy in proxies:
        proxy.cut()


@pytest.fixture
def record_fault(artifacts_dir: Path) -> Callable[..., None]:
    """Write a measured recovery to test-artifacts/faults.json (docs/faults.md quotes it)."""
    import json

    def write(fault: str, **measured: Any) -> None:
        path = artifacts_dir / "faults.json"
        table = json.loads(path.read_text()) if path.is_file() else {}
        table[fault] = measured
        path.write_text(json.dumps(table, indent=2, sort_keys=True))

    return write
