"""Shortcut audit: can cues that say nothing about the lungs predict a data set's labels?

UCSD COVID-CT mixes files from papers and from other sources: the classes differ in file
format, colour mode, size and window settings, and a network learns those as readily as
lung findings. The audit measures each cue set with a cross-validated logistic regression
(AUC over out-of-fold predictions, 95 % bootstrap interval):

- `file`: what the file is (format, colour mode, alpha channel, width, height, aspect,
  bytes per pixel) - present before any preprocessing;
- `image`: what the decoded image shows outside any anatomy (global intensity
  percentiles, mean and spread, black and white share, the border strip's mean and spread,
  sharpness), before preprocessing;
- `model_input`: the `image` cues of what the model is fed after preprocessing, and its
  noise level - what is left for a network to exploit. Its global intensity statistics
  include the lungs, so part of what they carry can be disease (ground glass raises the
  lungs' intensity): an upper bound on the shortcut, not a pure one.

A cue set with a cross-validated AUC above `WARN_AUC` is a warning.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ctscan.data.dataset import CTDataset, Sample
from ctscan.errors import DataError, ImageError
from ctscan.imaging.decoding import decode_image
from ctscan.imaging.preprocessing import DEFAULT_PREPROCESSING, prepare

WARN_AUC = 0.60
CUE_SETS = ("file", "image", "model_input")
MODEL_INPUT_SIZE = 224


@dataclass(frozen=True)
class SampleCues:
    file: dict[str, float]
    image: dict[str, float]
    model_input: dict[str, float]


def _sharpness(grey: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean absolute Laplacian (a proxy for the source's resolution and its JPEG history)."""
    array = grey.astype(np.float32)
    laplacian = np.abs(4 * array[1:-1, 1:-1] - array[:-2, 1:-1] - array[2:, 1:-1]
                       - array[1:-1, :-2] - array[1:-1, 2:])
    if mask is not None:
        inner = mask[1:-1, 1:-1]
        return float(laplacian[inner].mean()) if inner.any() else 0.0
    return float(laplacian.mean())


def _border(grey: np.ndarray) -> np.ndarray:
    height, width = grey.shape
    strip = max(1, min(height, width) // 20)
    return np.concatenate([grey[:strip].ravel(), grey[-strip:].ravel(), grey[:, :strip].ravel(),
                           grey[:, -strip:].ravel()])


def file_cues(data: bytes) -> dict[str, float]:
    from PIL import Image

    cues = {"png": 0.0, "jpeg": 0.0, "dicom": 0.0, "mode_l": 0.0, "mode_rgb": 0.0, "alpha": 0.0}
    if data[128:132] == b"DICM":
        decoded = decode_image(data)
        height, width = decoded.grey.shape
        cues["dicom"] = 1.0
    else:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            cues["png" if image.format == "PNG" else "jpeg"] = 1.0
            cues["mode_l"] = float(image.mode in ("L", "I", "I;16", "F", "1"))
            cues["mode_rgb"] = float(image.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr"))
            cues["alpha"] = float(image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info)
    cues.update(width=float(width), height=float(height), aspect=width / max(height, 1),
                bytes_per_pixel=len(data) / max(width * height, 1))
    return cues


def image_cues(grey: np.ndarray) -> dict[str, float]:
    values = grey.astype(np.float32)
    p1, p50, p99 = np.percentile(values, (1, 50, 99))
    border = _border(values)
    return {"mean": float(values.mean()), "std": float(values.std()), "p1": float(p1), "p50": float(p50),
            "p99": float(p99), "black_share": float((values <= 5).mean()),
            "white_share": float((values >= 250).mean()), "border_mean": float(border.mean()),
            "border_std": float(border.std()), "sharpness": _sharpness(grey)}


def model_input_cues(grey: np.ndarray) -> dict[str, float]:
    """The `image` cues of what the model is fed, plus its noise level: after preprocessing
    size, aspect, format and colour mode are gone by construction (one square greyscale
    crop), so these are what is left."""
    values = grey.astype(np.float32)
    smooth = (values[1:-1, 1:-1] + values[:-2, 1:-1] + values[2:, 1:-1] + values[1:-1, :-2]
              + values[1:-1, 2:]) / 5
    inside = values[1:-1, 1:-1] > 0
    residual = np.abs(values[1:-1, 1:-1] - smooth)[inside]
    return {**image_cues(grey), "noise": float(np.median(residual)) if residual.size else 0.0}


def sample_cues(sample: Sample, preprocessing: str) -> SampleCues:
    try:
        data = sample.path.read_bytes()
        decoded = decode_image(data)
    except (ImageError, OSError) as exc:
        raise DataError(f"cannot load {sample.relative_path}: {exc}") from None
    from PIL import Image

    prepared = prepare(decoded, preprocessing)
    model_grey = np.asarray(Image.fromarray(prepared.grey).resize((MODEL_INPUT_SIZE, MODEL_INPUT_SIZE),
                                                                  Image.Resampling.BILINEAR))
    return SampleCues(file=file_cues(data), image=image_cues(decoded.grey),
                      model_input=model_input_cues(model_grey))


def cross_validated_auc(features: np.ndarray, targets: np.ndarray, *, folds: int = 5, seed: int = 0,
                        resamples: int = 1000) -> dict[str, Any]:
    """Out-of-fold AUC of a standardised logistic regression, with a bootstrap interval."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_predict(classifier, features, targets, cv=splitter, method="predict_proba")[:, 1]
    auc = float(roc_auc_score(targets, scores))
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(resamples):
        index = rng.integers(0, len(targets), len(targets))
        if len(np.unique(targets[index])) == 2:
            samples.append(roc_auc_score(targets[index], scores[index]))
    return {"auc": auc, "ci95": [float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))]}


def single_cue_aucs(features: np.ndarray, names: Sequence[str], targets: np.ndarray) -> dict[str, float]:
    """Each cue on its own, as AUC folded to >= 0.5 (a cue predicts either way)."""
    from sklearn.metrics import roc_auc_score

    result = {}
    for index, name in enumerate(names):
        column = features[:, index]
        if np.ptp(column) == 0:
            result[name] = 0.5
            continue
        auc = float(roc_auc_score(targets, column))
        result[name] = round(max(auc, 1.0 - auc), 4)
    return dict(sorted(result.items(), key=lambda item: -item[1]))


def audit_dataset(data_dir: str, *, preprocessing: str = DEFAULT_PREPROCESSING, splits: Sequence[str] | None = None,
                  resamples: int = 1000, workers: int = 4) -> dict[str, Any]:
    """Cue-only cross-validated AUC of each cue set, and every cue's own AUC."""
    dataset = CTDataset(data_dir)
    samples = [s for s in dataset.samples if splits is None or s.split in splits]
    targets = np.array([s.target for s in samples])
    if len(np.unique(targets)) < 2:
        raise DataError(f"{dataset.root}: the audit needs both classes; found only {samples[0].label}")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        cues = list(pool.map(lambda s: sample_cues(s, preprocessing), samples))
    report: dict[str, Any] = {"data": str(dataset.root), "images": len(samples), "preprocessing": preprocessing,
                              "splits": list(splits) if splits else sorted({s.split for s in samples}),
                              "warn_auc": WARN_AUC, "cue_sets": {}, "warnings": []}
    for cue_set in CUE_SETS:
        rows = [getattr(c, cue_set) for c in cues]
        names = list(rows[0])
        features = np.array([[row[name] for name in names] for row in rows], dtype=np.float64)
        folds = int(min(5, np.bincount(targets).min()))
        if folds < 2:
            raise DataError("the audit needs at least two images of each class")
        result = cross_validated_auc(features, targets, folds=folds, resamples=resamples)
        result["single_cues"] = single_cue_aucs(features, names, targets)
        report["cue_sets"][cue_set] = result
        if result["auc"] > WARN_AUC:
            top = ", ".join(list(result["single_cues"])[:3])
            report["warnings"].append(
                f"{cue_set} cues alone predict the label (cross-validated AUC {result['auc']:.2f} > "
                f"{WARN_AUC:.2f}; strongest: {top}): a model can learn them instead of the lungs")
    return report
