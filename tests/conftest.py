"""Fixtures shared by every test package: the real data folder, a small model store, and the
test tiers.

Tiers: a test is `slow` when it trains or builds a network (TensorFlow's import alone takes
10-20 s on a busy CI machine), converts one to ONNX, publishes the whole data set or starts a
process (a service, a worker, the `ctscan` command, a browser); every other test runs in
`make test-fast` (`pytest -m "not slow"`). Tests get the mark from the fixtures they use
(SLOW_FIXTURES) or from an explicit `@pytest.mark.slow`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from harness import temp_file_watch  # noqa: F401 (a fixture for every suite)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Services started by tests append their audit events here unless a test chooses a folder.
os.environ.setdefault("CTSCAN_AUDIT_DIR", tempfile.mkdtemp(prefix="ctscan-test-audit-"))

REPO_ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS_DIR = REPO_ROOT / "test-artifacts"
RELEASE_DIR = REPO_ROOT / "models"

# Fixtures that train, convert, start processes or publish the whole data set (a copy of 746
# images with their checksums): any test using one is in the slow tier.
SLOW_FIXTURES = frozenset({
    "tiny_model_store", "inference_service", "reloading_service", "web_service", "start_worker",
    "published_dataset", "published_datasets", "published_second_dataset", "redis_server", "trainer_env",
    "jobs_client", "tiny_job", "ctscan_cli",
    "page", "browser",
})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def _data_dir() -> Path:
    # Tests point at the shared copy through configuration, never at a copy in the repo.
    return Path(os.environ.get("CTSCAN_TEST_DATA_DIR", REPO_ROOT.parent / "shared" / "data" / "ucsd-covid-ct"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = _data_dir()
    if not (path / "split.csv").is_file():
        pytest.fail(f"real data not found at {path}; set CTSCAN_TEST_DATA_DIR")
    return path


def _ctmd_dir() -> Path:
    return Path(os.environ.get("CTSCAN_TEST_CTMD_DIR", REPO_ROOT.parent / "shared" / "data" / "covid-ct-md-sample"))


@pytest.fixture(scope="session")
def ctmd_dir() -> Path:
    """The CT-MD sample: real JPEG-Lossless DICOM studies from another hospital (test only)."""
    path = _ctmd_dir()
    if not (path / "labels.csv").is_file():
        pytest.fail(f"CT-MD sample not found at {path}; set CTSCAN_TEST_CTMD_DIR")
    return path


def _shared_data_root() -> Path:
    return Path(os.environ.get("CTSCAN_TEST_DATA_ROOT", REPO_ROOT.parent / "shared" / "data"))


def _named_data_set(name: str) -> Path:
    path = _shared_data_root() / name
    if not (path / "split.csv").is_file():
        pytest.fail(f"data set {name} not found at {path}; set CTSCAN_TEST_DATA_ROOT")
    return path


@pytest.fixture(scope="session")
def radiopaedia_dir() -> Path:
    """Radiopaedia COVID-19 scans: infected and clean slices of the same patients, lung masks."""
    return _named_data_set("radiopaedia-covid-seg")


@pytest.fixture(scope="session")
def sirm_dir() -> Path:
    """SIRM COVID-19 slices (Italy): COVID only."""
    return _named_data_set("sirm-covid-ct")


@pytest.fixture(scope="session")
def ccccii_dir() -> Path:
    """CC-CCII: one patient with another (non-COVID) pneumonia; test only."""
    return _named_data_set("ccccii-pneumonia-sample")


@pytest.fixture(scope="session")
def ctmd_slices(ctmd_dir: Path) -> dict[str, list[dict[str, str]]]:
    """labels.csv rows by study, ordered from the abdomen up to the neck."""
    import csv

    with (ctmd_dir / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    studies: dict[str, list[dict[str, str]]] = {}
    for row in sorted(rows, key=lambda r: int(r["slice_index"])):
        studies.setdefault(row["study"], []).append(row)
    return studies


@pytest.fixture(scope="session")
def real_ct_images(data_dir: Path) -> dict[str, Path]:
    """A few real test-split images of each class and file mode."""
    from ctscan.data.dataset import CTDataset

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
TRAINED = "mobilenetv2"


@pytest.fixture(scope="session")
def tiny_model_store(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A local model store for plumbing tests, made through the real save path (weights,
    card, checksums, verified ONNX copy), each version in production, plus an ensemble
    threshold calibrated on a small val subset.

    One network is trained (MobileNetV2, one epoch on 4 real images per class, `ctscan
    train`'s own code); the other architectures are saved untrained, with cards whose val
    metrics and threshold are measured on real val images. None is a useful classifier."""
    import numpy as np

    from ctscan.data.dataset import CTDataset, load_arrays
    from ctscan.evaluation.reports import calibrate_ensemble
    from ctscan.metrics import choose_threshold, full_report
    from ctscan.models import build_model, pack_weights
    from ctscan.publishing import pick_verification_images, publish_version, train_and_store
    from ctscan.storage.store import open_store
    from ctscan.training.runs import TrainConfig, _subset, predict_probabilities

    root = tmp_path_factory.mktemp("tiny-store")
    store = open_store(root / "store")
    config = TrainConfig(model=TRAINED, data_dir=str(data_dir), init="none", input_size=TINY_INPUT_SIZES[TRAINED],
                         epochs=1, batch_size=8, limit_per_class=4, augment=False,
                         input_gate=False)  # a gate fitted on 4 images per class would refuse anything
    train_and_store(config, run_dir=root / "runs" / TRAINED, store=store, promote="always", verbose=0)

    dataset = CTDataset(data_dir)
    val_samples = _subset(dataset.split("val"), 4, 42)
    for name, size in TINY_INPUT_SIZES.items():
        if name == TRAINED:
            continue
        model = build_model(name, init="none", input_size=size, compile_model=False)
        val_x, val_y = load_arrays(val_samples, size)
        probabilities = predict_probabilities(model, val_x)
        threshold = choose_threshold(val_y, probabilities)
        card = {"architecture": name, "input_size": size, "init": "none", "threshold": threshold,
                "preprocessing": {"name": config.preprocessing},
                "metrics": {"val": full_report(val_y, probabilities, threshold, resamples=50)},
                "dataset": {"fingerprint": dataset.fingerprint(), "val_images": len(val_samples)},
                "intended_use": "test fixture: untrained weights"}
        version, _ = publish_version(store, name=name, model=model, weights=pack_weights(model), card=card,
                                     verification_images=pick_verification_images(val_x, np.asarray(val_y)),
                                     verified_on="val split (test fixture)")
        store.promote(name, version, reason="test fixture")
    # Named explicitly: no fixture model clears the promotion floors, which choose the members
    # by default (an ensemble of none would be refused).
    calibrate_ensemble(store=store, data_dir=str(data_dir), limit_per_class=4, members=list(TINY_INPUT_SIZES))
    return root / "store"
