"""CT datasets laid out like UCSD COVID-CT: `split.csv` (path,label,split) and `SHA256SUMS`.

Images are decoded once (one colour mode, see `ctscan.imaging`), resized to the model's
input size and kept in memory; `tf.data` pipelines add shuffling, augmentation and prefetch.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ctscan import NEGATIVE_LABEL, POSITIVE_LABEL
from ctscan.errors import ChecksumError, DataError, ImageError
from ctscan.imaging import decode_image, resize_for_model

if TYPE_CHECKING:
    import tensorflow as tf

SPLIT_FILE = "split.csv"
CHECKSUM_FILE = "SHA256SUMS"
LABELS = (NEGATIVE_LABEL, POSITIVE_LABEL)  # index = class id; covid = 1 is the positive class
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    path: Path
    relative_path: str
    label: str
    split: str

    @property
    def target(self) -> int:
        return LABELS.index(self.label)


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_checksums(path: Path) -> dict[str, str]:
    """Parse a `sha256sum` listing into {relative path: hex digest}."""
    sums: dict[str, str] = {}
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise DataError(f"{path}:{line_number}: not a 'sha256  path' line")
        sums[name.lstrip("*")] = digest.lower()
    return sums


class CTDataset:
    """A dataset folder; construction validates `split.csv` and that every listed file exists."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"dataset folder not found: {self.root}")
        split_path = self.root / SPLIT_FILE
        if not split_path.is_file():
            raise DataError(f"no {SPLIT_FILE} in dataset folder {self.root}")
        self.samples = self._read_split(split_path)

    def _read_split(self, split_path: Path) -> list[Sample]:
        samples: list[Sample] = []
        with split_path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = {"path", "label", "split"} - set(reader.fieldnames or [])
            if missing:
                raise DataError(f"{split_path}: missing column(s) {', '.join(sorted(missing))}")
            for row_number, row in enumerate(reader, 2):
                where = f"{split_path}:{row_number}"
                relative, label, split = (row.get(k) or "" for k in ("path", "label", "split"))
                if not relative:
                    raise DataError(f"{where}: empty path")
                if label not in LABELS:
                    raise DataError(f"{where}: label {label!r} is not one of {', '.join(LABELS)}")
                if split not in SPLITS:
                    raise DataError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
                path = (self.root / relative).resolve()
                if self.root.resolve() not in path.parents:
                    raise DataError(f"{where}: path {relative!r} leaves the dataset folder")
                if not path.is_file():
                    raise DataError(f"{where}: image file not found: {relative}")
                samples.append(Sample(path, relative, label, split))
        if not samples:
            raise DataError(f"{split_path}: no rows")
        return samples

    def split(self, name: str) -> list[Sample]:
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        chosen = [s for s in self.samples if s.split == name]
        if not chosen:
            raise DataError(f"split {name!r} is empty in {self.root / SPLIT_FILE}")
        return chosen

    def counts(self) -> dict[str, dict[str, int]]:
        table: dict[str, dict[str, int]] = {}
        for (split, label), count in Counter((s.split, s.label) for s in self.samples).items():
            table.setdefault(split, {})[label] = count
        return table

    def verify_checksums(self) -> int:
        """Check every listed image against SHA256SUMS (when present); returns files checked."""
        sums_path = self.root / CHECKSUM_FILE
        if not sums_path.is_file():
            return 0
        sums = read_checksums(sums_path)
        for sample in self.samples:
            expected = sums.get(sample.relative_path)
            if expected is None:
                raise ChecksumError(f"{sample.relative_path} has no entry in {sums_path}")
            if sha256_file(sample.path) != expected:
                raise ChecksumError(f"checksum mismatch for {sample.relative_path}")
        return len(self.samples)

    def fingerprint(self) -> str:
        """SHA-256 over the split file and checksum list: names this exact dataset version."""
        digest = hashlib.sha256()
        for name in (SPLIT_FILE, CHECKSUM_FILE):
            path = self.root / name
            if path.is_file():
                digest.update(path.read_bytes())
        return digest.hexdigest()


def load_sample_pixels(sample: Sample, size: int) -> np.ndarray:
    try:
        decoded = decode_image(sample.path.read_bytes())
    except ImageError as exc:
        raise DataError(f"cannot load {sample.relative_path}: {exc}") from None
    except OSError as exc:
        raise DataError(f"cannot read {sample.relative_path}: {exc.strerror}") from None
    return resize_for_model(decoded.grey, size)


def load_arrays(
    samples: Sequence[Sample], size: int, *, workers: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Decode and resize samples -> (N, size, size, 3) uint8 images and (N,) float32 targets."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pixels = list(pool.map(lambda s: load_sample_pixels(s, size), samples))
    images = np.stack(pixels).round().astype(np.uint8) if pixels else np.zeros((0, size, size, 3), np.uint8)
    targets = np.array([s.target for s in samples], dtype=np.float32)
    return images, targets


def augment_batch(images: tf.Tensor, *, size: int, seed: tf.Tensor) -> tf.Tensor:
    """Training augmentation on a float32 batch (0..255): random resized crop, flip,
    small rotation, brightness and contrast. Stateless ops so a seed reproduces a run."""
    import tensorflow as tf

    def one(args: tuple[tf.Tensor, tf.Tensor]) -> tf.Tensor:
        image, image_seed = args
        seeds = tf.random.experimental.stateless_split(image_seed, num=6)
        box_begin, box_size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(image),
            bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
            seed=seeds[0],
            min_object_covered=0.6,
            aspect_ratio_range=(0.85, 1.15),
            area_range=(0.6, 1.0),
            use_image_if_no_bounding_boxes=True,
        )
        image = tf.slice(image, box_begin, box_size)
        image = tf.image.resize(image, (size, size))
        image = tf.image.stateless_random_flip_left_right(image, seed=seeds[1])
        # Small rotation (about +-10 degrees) through a projective transform.
        angle = tf.random.stateless_uniform([], seeds[2], -0.175, 0.175)
        cos, sin = tf.cos(angle), tf.sin(angle)
        centre = tf.cast(size, tf.float32) / 2.0
        transform = [
            cos, -sin, centre - cos * centre + sin * centre,
            sin, cos, centre - sin * centre - cos * centre,
            0.0, 0.0,
        ]
        image = tf.raw_ops.ImageProjectiveTransformV3(
            images=image[None],
            transforms=tf.reshape(tf.stack(transform), (1, 8)),
            output_shape=[size, size],
            fill_value=0.0,
            interpolation="BILINEAR",
            fill_mode="CONSTANT",
        )[0]
        image = tf.image.stateless_random_brightness(image, 20.0, seed=seeds[3])
        image = tf.image.stateless_random_contrast(image, 0.8, 1.2, seed=seeds[4])
        return tf.clip_by_value(image, 0.0, 255.0)

    batch_seeds = tf.random.experimental.stateless_split(seed, num=tf.shape(images)[0])
    return tf.map_fn(one, (images, batch_seeds), fn_output_signature=tf.float32)


def make_pipeline(
    images: np.ndarray,
    targets: np.ndarray,
    *,
    batch_size: int,
    training: bool,
    seed: int = 0,
    sample_weights: np.ndarray | None = None,
) -> tf.data.Dataset:
    """In-memory arrays -> batched tf.data pipeline (shuffled and augmented when training)."""
    import tensorflow as tf

    size = int(images.shape[1])
    tensors: tuple[np.ndarray, ...] = (images, targets)
    if sample_weights is not None:
        tensors = (images, targets, sample_weights)
    dataset = tf.data.Dataset.from_tensor_slices(tensors).cache()
    if training:
        dataset = dataset.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size)

    def to_float(*batch: tf.Tensor) -> tuple[tf.Tensor, ...]:
        return (tf.cast(batch[0], tf.float32), *batch[1:])

    dataset = dataset.map(to_float, num_parallel_calls=tf.data.AUTOTUNE)
    if training:
        counter = tf.data.Dataset.counter()
        dataset = tf.data.Dataset.zip((dataset, counter))

        def augment(batch: tuple[tf.Tensor, ...], step: tf.Tensor) -> tuple[tf.Tensor, ...]:
            step_seed = tf.stack([tf.constant(seed, tf.int64), step])
            return (augment_batch(batch[0], size=size, seed=step_seed), *batch[1:])

        dataset = dataset.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def class_weights(targets: Iterable[float]) -> dict[int, float]:
    """Balanced class weights (n / (2 * n_class)) so neither class dominates the loss."""
    counts = Counter(int(t) for t in targets)
    total = sum(counts.values())
    return {label: total / (len(counts) * count) for label, count in counts.items()}
