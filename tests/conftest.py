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


def _ctmd_dir() -> Path:
    return Path(os.environ.get("CTSCAN_TEST_CTMD_DIR", REPO_ROOT.parent / "shared" / "data" / "covid-ct-md-sample"))


@pytest.fixture(scope="session")
def ctmd_dir() -> Path:
    """The CT-MD sample: real JPEG-Lossless DICOM studies from another hospital (test only)."""
    path = _ctmd_dir()
    if not (path / "labels.csv").is_file():
        pytest.fail(f"CT-MD sample not found at {path}; set CTSCAN_TEST_CTMD_DIR")
    return path


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

