"""Dataset folders: every real image loads, checksums are enforced, bad folders are named."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from ctscan.data.dataset import CTDataset, class_weights, load_arrays, make_pipeline
from ctscan.errors import ChecksumError, DataError
from ctscan.imaging.preprocessing import LEGACY


def test_all_746_real_images_load_in_one_mode(data_dir: Path) -> None:
    dataset = CTDataset(data_dir)
    assert len(dataset.samples) == 746
    counts = dataset.counts()
    assert counts["train"] == {"covid": 191, "non_covid": 234}
    assert counts["test"] == {"covid": 98, "non_covid": 105}
    # The plain preprocessing: every file decodes and resizes; the lung crop is tested elsewhere
    # (tests/core/test_preprocessing.py) and would triple this test's time.
    images, targets = load_arrays(dataset.samples, 32, preprocessing=LEGACY, workers=2)
    assert images.shape == (746, 32, 32, 3) and images.dtype == np.uint8
    assert int(targets.sum()) == 349
    # one colour mode: every image is greyscale in three identical channels
    assert np.array_equal(images[..., 0], images[..., 2])


def test_checksums_of_the_real_data_verify(data_dir: Path) -> None:
    assert CTDataset(data_dir).verify_checksums() == 746


def _small_copy(data_dir: Path, target: Path, rows: int = 6) -> Path:
    lines = (data_dir / "split.csv").read_text().splitlines()
    header, chosen = lines[0], lines[1 : rows + 1]
    sums = dict(line.split("  ", 1)[::-1] for line in (data_dir / "SHA256SUMS").read_text().splitlines())
    target.mkdir()
    kept_sums = []
    for line in chosen:
        relative = line.rsplit(",", 2)[0]
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_dir / relative, target / relative)
        kept_sums.append(f"{sums[relative]}  {relative}")
    (target / "split.csv").write_text("\n".join([header, *chosen]) + "\n")
    (target / "SHA256SUMS").write_text("\n".join(kept_sums) + "\n")
    return target


def test_a_changed_image_fails_its_checksum_by_name(data_dir: Path, tmp_path: Path) -> None:
    copy = _small_copy(data_dir, tmp_path / "data")
    dataset = CTDataset(copy)
    assert dataset.verify_checksums() == 6
    victim = dataset.samples[2]
    victim.path.write_bytes(victim.path.read_bytes() + b"x")
    with pytest.raises(ChecksumError, match=victim.relative_path.replace("%", ".")):
        dataset.verify_checksums()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("path,label\nCT_COVID/a.png,covid\n", "missing column"),
        ("path,label,split\nCT_COVID/a.png,maybe,train\n", "label 'maybe'"),
        ("path,label,split\nCT_COVID/a.png,covid,holdout\n", "split 'holdout'"),
        ("path,label,split\nCT_COVID/missing.png,covid,train\n", "not found: CT_COVID/missing.png"),
        ("path,label,split\n../../etc/passwd,covid,train\n", "leaves the dataset folder"),
        ("path,label,split\n", "no rows"),
    ],
)
def test_bad_split_rows_are_named(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "split.csv").write_text(content)
    with pytest.raises(DataError, match=message) as raised:
        CTDataset(tmp_path)
    assert "split.csv:" in str(raised.value) or "no rows" in str(raised.value) or "column" in str(raised.value)


def test_missing_folder_and_missing_split_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        CTDataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no split.csv"):
        CTDataset(tmp_path)


def test_unreadable_image_is_named(data_dir: Path, tmp_path: Path) -> None:
    copy = _small_copy(data_dir, tmp_path / "data")
    dataset = CTDataset(copy)
    dataset.samples[0].path.write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot load"):
        load_arrays(dataset.samples, 32)


@pytest.mark.slow  # a tf.data pipeline: imports TensorFlow
def test_training_pipeline_augments_reproducibly(data_dir: Path) -> None:
    dataset = CTDataset(data_dir)
    images, targets = load_arrays(dataset.split("val")[:8], 48)

    def first_batch(seed: int) -> np.ndarray:
        batch = next(iter(make_pipeline(images, targets, batch_size=8, training=True, seed=seed)))
        return batch[0].numpy()

    a, b, c = first_batch(1), first_batch(1), first_batch(2)
    assert a.shape == (8, 48, 48, 3) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 255.0
    np.testing.assert_allclose(a, b)
    assert not np.allclose(a, c)
    plain = next(iter(make_pipeline(images, targets, batch_size=8, training=False)))[0].numpy()
    expected = images.astype(np.float32).reshape(8, -1).sum(1)
    assert sorted(plain.reshape(8, -1).sum(1).tolist()) == sorted(expected.tolist())


def test_class_weights_balance_the_classes() -> None:
    weights = class_weights([0, 0, 0, 1])
    assert weights[1] == pytest.approx(2.0) and weights[0] == pytest.approx(2 / 3)
