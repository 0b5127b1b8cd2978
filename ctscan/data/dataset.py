"""CT datasets laid out like UCSD COVID-CT: `split.csv` (path,label,split) and `SHA256SUMS`.

Images are decoded once (one colour mode, see `ctscan.imaging.decoding`), preprocessed (lung crop
and intensity standardisation, see `ctscan.imaging.preprocessing`), resized to the model's input
size and kept in memory; `tf.data` pipelines add shuffling, augmentation and prefetch.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ctscan import NEGATIVE_LABEL, POSITIVE_LABEL
from ctscan.errors import ChecksumError, DataError, ImageError
from ctscan.imaging.decoding import DecodedImage, decode_image
from ctscan.imaging.perturbations import change_slice
from ctscan.imaging.preprocessing import DEFAULT_PREPROCESSING, PreparedSlice, get_preprocessor, prepare

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
    source: str = ""  # the data set it came from (its folder's name): kept through training

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
        name = name.lstrip("*")  # sha256sum's binary-mode marker
        sums[name[2:] if name.startswith("./") else name] = digest.lower()  # `sha256sum ./dir/*` style
    return sums


class CTDataset:
    """A dataset folder; construction validates `split.csv` and that every listed file exists."""

    def __init__(self, root: str | Path, *, name: str | None = None) -> None:
        self.root = Path(root).expanduser()
        self.name = name or self.root.resolve().name  # the source's name (its folder's, unless told)
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
                samples.append(Sample(path, relative, label, split, self.name))
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


def decode_sample(sample: Sample) -> DecodedImage:
    """Decode one sample's file; an unreadable or undecodable file is a DataError naming it."""
    try:
        return decode_image(sample.path.read_bytes())
    except ImageError as exc:
        raise DataError(f"cannot load {sample.relative_path}: {exc}") from None
    except OSError as exc:
        raise DataError(f"cannot read {sample.relative_path}: {exc.strerror}") from None


def load_prepared(sample: Sample, preprocessing: str = DEFAULT_PREPROCESSING) -> PreparedSlice:
    """Decode one sample and apply the named preprocessing (the serving path does the same)."""
    return prepare(decode_sample(sample), preprocessing)


def load_sample_pixels(sample: Sample, size: int, preprocessing: str = DEFAULT_PREPROCESSING) -> np.ndarray:
    """(size, size, 3) float32 0..255: exactly what a model trained with `preprocessing` sees."""
    return load_prepared(sample, preprocessing).model_input(size)


@dataclass(frozen=True)
class LoadedSplit:
    """A split held in memory for training: images, targets, each slice's source and anatomy."""

    images: np.ndarray  # (N, size, size, 3) uint8, or (N, variants, size, size, 3)
    targets: np.ndarray  # (N,) float32, covid = 1
    sources: np.ndarray  # (N,) str
    anatomy: np.ndarray  # (N, len(ANATOMY_FEATURES)) float32

    def of_source(self, source: str) -> tuple[np.ndarray, np.ndarray]:
        chosen = self.sources == source
        return self.images[chosen], self.targets[chosen]


# What a slice shows of the chest, whatever its lesions: where in the chest it lies (lung area
# against the body) and how much of the crop the lungs fill. Neither may predict the label.
ANATOMY_FEATURES = ("lung_fraction", "crop_lung_share")


def _anatomy(prepared: PreparedSlice) -> tuple[float, float]:
    if prepared.findings is None or prepared.lung_mask is None:
        return 0.0, 0.0
    return prepared.findings.lung_fraction, float(prepared.lung_mask.mean())


def load_split(
    samples: Sequence[Sample], size: int, *, preprocessing: str = DEFAULT_PREPROCESSING, workers: int = 4,
    variants: int = 1, seed: int = 0,
) -> LoadedSplit:
    """`load_arrays`, keeping each slice's source and anatomy (for weighting and per-source
    validation)."""
    preprocessor = get_preprocessor(preprocessing)

    def one(index: int) -> tuple[np.ndarray, tuple[float, float]]:
        decoded = decode_sample(samples[index])
        rng = np.random.default_rng([seed, index])
        copies = [decoded, *(source_variant(decoded, rng) for _ in range(variants - 1))]
        prepared = [preprocessor(copy) for copy in copies]
        return np.stack([p.model_input(size) for p in prepared]), _anatomy(prepared[0])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        loaded = list(pool.map(one, range(len(samples))))
    shape = (0, variants, size, size, 3)
    images = np.stack([p for p, _ in loaded]).round().astype(np.uint8) if loaded else np.zeros(shape, np.uint8)
    if variants == 1:
        images = images[:, 0]
    targets = np.array([s.target for s in samples], dtype=np.float32)
    anatomy = np.array([a for _, a in loaded], dtype=np.float32).reshape(len(samples), len(ANATOMY_FEATURES))
    return LoadedSplit(images, targets, np.array([s.source for s in samples], dtype=str), anatomy)


def load_arrays(
    samples: Sequence[Sample], size: int, *, preprocessing: str = DEFAULT_PREPROCESSING, workers: int = 4,
    variants: int = 1, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode, preprocess and resize samples -> (N, size, size, 3) uint8 images and (N,)
    float32 targets; with `variants` > 1, (N, variants, size, size, 3): the slice as it
    is, then changed at random *before* preprocessing (`source_variant`). Slices in which
    no lungs were found keep the whole (standardised) image: a training set is curated
    chest CT, so that is a segmentation miss, not a refusal."""
    loaded = load_split(samples, size, preprocessing=preprocessing, workers=workers, variants=variants, seed=seed)
    return loaded.images, loaded.targets


def source_variant(decoded: DecodedImage, rng: np.random.Generator) -> DecodedImage:
    """The slice as another hospital or paper might have sent it: shifted, rotated,
    rescaled, in another window, gamma and JPEG quality. Applied before preprocessing, so
    the model also learns that the lung crop moves a little from copy to copy."""
    return change_slice(
        decoded, shift=(float(rng.uniform(-0.08, 0.08)), float(rng.uniform(-0.08, 0.08))),
        degrees=float(rng.uniform(-10, 10)), scale=float(np.exp(rng.uniform(np.log(0.6), np.log(1.5)))),
        contrast=float(np.exp(rng.uniform(np.log(0.8), np.log(1.25)))), brightness=float(rng.uniform(-20, 20)),
        gamma=float(np.exp(rng.uniform(np.log(0.8), np.log(1.25)))),
        jpeg_quality=int(rng.integers(40, 95)) if rng.random() < 0.5 else None)


AUGMENTATIONS = ("none", "basic", "domain", "lesion")


def _uniform(seed: tf.Tensor, low: float, high: float) -> tf.Tensor:
    import tensorflow as tf

    return tf.random.stateless_uniform([], seed, low, high)


def _log_uniform(seed: tf.Tensor, low: float, high: float) -> tf.Tensor:
    import tensorflow as tf

    return tf.exp(_uniform(seed, float(np.log(low)), float(np.log(high))))


def _chance(seed: tf.Tensor, probability: float) -> tf.Tensor:
    return _uniform(seed, 0.0, 1.0) < probability


def _gaussian_blur(image: tf.Tensor, sigma: tf.Tensor) -> tf.Tensor:
    import tensorflow as tf

    offsets = tf.range(-3.0, 4.0)
    kernel = tf.exp(-(offsets**2) / (2.0 * sigma**2))
    kernel = kernel / tf.reduce_sum(kernel)
    channels = tf.shape(image)[-1]
    rows = tf.tile(tf.reshape(kernel, (7, 1, 1, 1)), [1, 1, channels, 1])
    columns = tf.tile(tf.reshape(kernel, (1, 7, 1, 1)), [1, 1, channels, 1])
    padded = tf.pad(image[None], [[0, 0], [3, 3], [3, 3], [0, 0]], mode="SYMMETRIC")
    blurred = tf.nn.depthwise_conv2d(padded, rows, [1, 1, 1, 1], "VALID")
    return tf.nn.depthwise_conv2d(blurred, columns, [1, 1, 1, 1], "VALID")[0]


def _domain_randomise(image: tf.Tensor, seeds: tf.Tensor, size: int) -> tf.Tensor:
    """What differs between hospitals and between the papers UCSD's slices came from, and
    says nothing about COVID-19: window level and width, gamma, resolution, sharpness,
    noise and JPEG compression. Each is drawn at random so no value of it can be learnt."""
    import tensorflow as tf

    centre = 127.5 + _uniform(seeds[0], -20.0, 20.0)
    image = (image - 127.5) * _log_uniform(seeds[1], 0.75, 1.33) + centre
    image = tf.clip_by_value(image, 0.0, 255.0)
    image = 255.0 * tf.pow(image / 255.0, _log_uniform(seeds[2], 0.7, 1.4))

    def low_resolution(image: tf.Tensor) -> tf.Tensor:
        side = tf.cast(tf.round(size * _uniform(seeds[4], 0.35, 1.0)), tf.int32)
        small = tf.image.resize(image, (side, side), antialias=True)
        return tf.image.resize(small, (size, size))

    image = tf.cond(_chance(seeds[3], 0.5), lambda: low_resolution(image), lambda: image)
    image = tf.cond(_chance(seeds[5], 0.3),
                    lambda: _gaussian_blur(image, _uniform(seeds[6], 0.4, 1.2)), lambda: image)
    noise = tf.random.stateless_normal(tf.shape(image), seeds[8]) * _uniform(seeds[9], 0.0, 6.0)
    image = tf.cond(_chance(seeds[7], 0.5), lambda: image + noise, lambda: image)
    image = tf.clip_by_value(image, 0.0, 255.0)

    def jpeg(image: tf.Tensor) -> tf.Tensor:
        compressed = tf.image.stateless_random_jpeg_quality(image / 255.0, 30, 90, seeds[11])
        return tf.reshape(compressed, tf.shape(image)) * 255.0

    return tf.cond(_chance(seeds[10], 0.4), lambda: jpeg(image), lambda: image)


def augment_batch(images: tf.Tensor, *, size: int, seed: tf.Tensor, recipe: str = "basic") -> tf.Tensor:
    """Training augmentation on a float32 batch (0..255). basic: random resized crop, flip,
    small rotation, brightness and contrast. domain: the same geometry plus random window,
    gamma, resolution, blur, noise and JPEG artefacts (`_domain_randomise`). lesion: domain
    with crops down to a third of the image, so how much of the frame the lungs fill (which
    follows the slice's height in the chest, not its lesions) varies on every view. Stateless
    ops, so a seed reproduces a run."""
    import tensorflow as tf

    if recipe not in AUGMENTATIONS[1:]:
        raise ValueError(f"augmentation recipe must be one of {AUGMENTATIONS[1:]}, got {recipe!r}")

    min_covered = 0.33 if recipe == "lesion" else 0.6

    def one(args: tuple[tf.Tensor, tf.Tensor]) -> tf.Tensor:
        image, image_seed = args
        seeds = tf.random.experimental.stateless_split(image_seed, num=18)
        box_begin, box_size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(image),
            bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
            seed=seeds[0],
            min_object_covered=min_covered,
            aspect_ratio_range=(0.85, 1.15),
            area_range=(min_covered, 1.0),
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
        if recipe in ("domain", "lesion"):
            return _domain_randomise(image, seeds[6:], size)
        image = tf.image.stateless_random_brightness(image, 20.0, seed=seeds[3])
        image = tf.image.stateless_random_contrast(image, 0.8, 1.2, seed=seeds[4])
        return tf.clip_by_value(image, 0.0, 255.0)

    batch_seeds = tf.random.experimental.stateless_split(seed, num=tf.shape(images)[0])
    return tf.map_fn(one, (images, batch_seeds), fn_output_signature=tf.float32)


def mixup_batch(images: tf.Tensor, targets: tf.Tensor, weights: tf.Tensor, *, alpha: float,
                seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """mixup (Zhang et al. 2018): each image blended with another of the batch, labels and
    sample weights alike; lambda ~ Beta(alpha, alpha), folded to >= 0.5 so the first image leads."""
    import tensorflow as tf

    count = tf.shape(images)[0]
    seeds = tf.random.experimental.stateless_split(seed, num=3)
    first = tf.random.stateless_gamma([count], seeds[0], alpha)
    second = tf.random.stateless_gamma([count], seeds[1], alpha)
    lam = first / (first + second + 1e-7)
    lam = tf.maximum(lam, 1.0 - lam)
    partner = tf.argsort(tf.random.stateless_uniform([count], seeds[2]))
    mixed_images = lam[:, None, None, None] * images + (1 - lam[:, None, None, None]) * tf.gather(images, partner)
    targets = tf.cast(targets, tf.float32)
    mixed_targets = lam * targets + (1 - lam) * tf.gather(targets, partner)
    mixed_weights = lam * weights + (1 - lam) * tf.gather(weights, partner)
    return mixed_images, mixed_targets, mixed_weights


def make_pipeline(
    images: np.ndarray,
    targets: np.ndarray,
    *,
    batch_size: int,
    training: bool,
    seed: int = 0,
    sample_weights: np.ndarray | None = None,
    recipe: str = "basic",
    mixup_alpha: float = 0.0,
    epoch: Any = None,
) -> tf.data.Dataset:
    """In-memory arrays -> batched tf.data pipeline (shuffled and augmented when training).

    `epoch` (a tf.Variable a callback advances) makes each epoch's augmentation differ in
    one long `fit`, yet reproducible and the same after a resume."""
    import tensorflow as tf

    if recipe not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {', '.join(AUGMENTATIONS)}, got {recipe!r}")
    size = int(images.shape[-2])
    tensors: tuple[np.ndarray, ...] = (images, targets)
    if sample_weights is not None:
        tensors = (images, targets, sample_weights.astype(np.float32))
    elif mixup_alpha > 0 and training:
        tensors = (images, targets, np.ones(len(targets), np.float32))
    dataset = tf.data.Dataset.from_tensor_slices(tensors).cache()
    if training:
        dataset = dataset.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    if images.ndim == 5:  # source variants (see load_arrays): one at random per slice and epoch
        count = int(images.shape[1])

        def pick(element: tuple[tf.Tensor, ...], index: tf.Tensor) -> tuple[tf.Tensor, ...]:
            epoch_index = tf.constant(0, tf.int64) if epoch is None else tf.cast(epoch, tf.int64)
            choice = tf.random.stateless_uniform([], tf.stack([tf.constant(seed, tf.int64) + 7919 * epoch_index,
                                                               index]), 0, count, dtype=tf.int32)
            return (element[0][choice], *element[1:])

        dataset = tf.data.Dataset.zip((dataset, tf.data.Dataset.counter())).map(pick)
    dataset = dataset.batch(batch_size)

    def to_float(*batch: tf.Tensor) -> tuple[tf.Tensor, ...]:
        return (tf.cast(batch[0], tf.float32), *batch[1:])

    dataset = dataset.map(to_float, num_parallel_calls=tf.data.AUTOTUNE)
    if training and (recipe != "none" or mixup_alpha > 0):
        counter = tf.data.Dataset.counter()
        dataset = tf.data.Dataset.zip((dataset, counter))

        def augment(batch: tuple[tf.Tensor, ...], step: tf.Tensor) -> tuple[tf.Tensor, ...]:
            epoch_index = tf.constant(0, tf.int64) if epoch is None else tf.cast(epoch, tf.int64)
            step_seed = tf.stack([tf.constant(seed, tf.int64) + epoch_index * 1_000_003, step])
            pixels = batch[0]
            if recipe != "none":
                pixels = augment_batch(pixels, size=size, seed=step_seed, recipe=recipe)
            if mixup_alpha > 0:
                mix_seed = tf.stack([step_seed[0] + 7, step_seed[1]])
                return mixup_batch(pixels, batch[1], batch[2], alpha=mixup_alpha, seed=mix_seed)
            return (pixels, *batch[1:])

        dataset = dataset.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def source_weights(targets: np.ndarray, sources: np.ndarray, anatomy: np.ndarray | None = None,
                   *, clip: float = 0.1, shares: Mapping[str, float] | None = None) -> np.ndarray:
    """Per-slice loss weights for training on several sources: within each source the two
    classes weigh the same, and every source (with both classes) weighs the same in total,
    so neither a source's size nor its class mix can be learnt as "this source = COVID".

    With `anatomy` (see ANATOMY_FEATURES), each slice is also weighted by the inverse of the
    probability of its label given its anatomy, fitted per source (logistic regression,
    probabilities clipped to [clip, 1 - clip]): COVID and clean slices then look alike in
    where they lie in the chest, and reading the slice's height stops paying.

    `shares` (source name -> factor, default 1) scales a source's total weight: a source whose
    labels the others contradict can be given more say than one vote among equals."""
    from sklearn.linear_model import LogisticRegression

    targets = np.asarray(targets, dtype=np.float32)
    weights = np.ones(len(targets), dtype=np.float64)
    names = sorted(set(sources.tolist()))
    for name in names:
        chosen = sources == name
        y = targets[chosen].astype(int)
        if anatomy is not None and len(set(y.tolist())) == 2:
            features = anatomy[chosen].astype(np.float64)
            spread = features.std(axis=0)
            features = (features - features.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
            propensity = LogisticRegression(C=1.0).fit(features, y).predict_proba(features)
            label_probability = np.clip(propensity[np.arange(len(y)), y], clip, 1.0 - clip)
            weights[chosen] = 1.0 / label_probability
        for label in (0, 1):
            group = chosen & (targets == label)
            if group.any():
                # Each class of the source gets half of the source's share.
                weights[group] *= (0.5 * (shares or {}).get(name, 1.0) / weights[group].sum())
    return (weights * len(targets) / weights.sum()).astype(np.float32)


def class_weights(targets: Iterable[float]) -> dict[int, float]:
    """Balanced class weights (n / (2 * n_class)) so neither class dominates the loss."""
    counts = Counter(int(t) for t in targets)
    total = sum(counts.values())
    return {label: total / (len(counts) * count) for label, count in counts.items()}
