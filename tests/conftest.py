"""Fixtures shared by every test package: the real data folder and a small model store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS_DIR = REPO_ROOT / "test-artifacts"


def _data_dir() -> Path:
    # Tests point at the shared copy through configuration, never at a copy in the repo.
    return Path(os.environ.get("CTSCAN_TEST_DATA_DIR", REPO_ROOT.parent / "shared" / "data" / "ucsd-covid-ct"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = _data_dir()
    if not (path / "split.csv").is_file():
        pytest.fail(f"real data not found at {path}; set CTSCAN_TEST_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def real_ct_images(data_dir: Path) -> dict[str, Path]:
    """A few real test-split images of each class and file mode."""
    from ctscan.data import CTDataset

    dataset = CTDataset(data_dir)
    chosen: dict[str, Path] = {}
    for sample in dataset.split("test"):
        key = f"{sample.label}_{sample.path.suffix.lower().lstrip('.')}"
        chosen.setdefault(key, sample.path)
    return chosen


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    return ARTIFACTS_DIR


# Small input sizes keep the fixture models fast; InceptionV3 cannot go below 75 pixels.
TINY_INPUT_SIZES = {"mobilenetv2": 64, "densenet121": 64, "inceptionv3": 75}


@pytest.fixture(scope="session")
def tiny_model_store(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A local model store holding each architecture trained for one epoch on a tiny real
    subset (4 images per class) at a small input size, promoted to production, plus an
    ensemble threshold calibrated on the same small val subset. Plumbing tests use it; it is
    not a useful classifier."""
    from ctscan.evaluation import calibrate_ensemble
    from ctscan.store import LocalModelStore
    from ctscan.training import TrainConfig, train_and_store

    root = tmp_path_factory.mktemp("tiny-store")
    store = LocalModelStore(root / "store")
    for name, size in TINY_INPUT_SIZES.items():
        config = TrainConfig(model=name, data_dir=str(data_dir), init="none", input_size=size,
                             epochs=1, batch_size=8, limit_per_class=4, augment=False)
        train_and_store(config, run_dir=root / "runs" / name, store=store, promote="always", verbose=0)
    calibrate_ensemble(store=store, data_dir=str(data_dir), limit_per_class=4)
    return root / "store"


class InferenceProcess:
    """A real `ctscan serve inference` subprocess on a free port."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        import socket
        import subprocess
        import sys

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ctscan.cli", "serve", "inference", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def wait_ready(self, timeout_s: float = 420) -> None:
        import time

        import requests

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"inference exited with {self.process.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        pytest.fail(f"inference not ready after {timeout_s} s:\n{self.log()}")

    def stop(self) -> None:
        import signal
        import subprocess

        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self._log.close()


@pytest.fixture
def start_inference(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Start real inference services (env overrides per call); all are stopped afterwards."""
    started: list[InferenceProcess] = []

    def start(env: dict[str, str]) -> InferenceProcess:
        service = InferenceProcess(env, tmp_path / f"inference-{len(started)}.log")
        started.append(service)
        service.wait_ready()
        return service

    yield start
    for service in started:
        service.stop()
