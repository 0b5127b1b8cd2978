"""Robustness and attention checks: does a model keep its answer under changes that say
nothing about the lungs, and does it look at the lungs when it says COVID-19?

`robustness_report` measures a model under each of `ctscan.imaging.perturbations`'
`PERTURBATIONS` (benign, moderate changes a slice goes through between hospitals, scanners and
exports, applied to the decoded slice before the model's own preprocessing).

`attention_in_lungs` is the share of a Grad-CAM heatmap's mass that falls inside the
lungs (`ctscan.imaging.preprocessing`'s lung region), per COVID slice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from ctscan.imaging.decoding import DecodedImage
from ctscan.imaging.perturbations import PERTURBATIONS, perturb
from ctscan.imaging.preprocessing import PreparedSlice, get_preprocessor, lung_region_mask
from ctscan.metrics import point_metrics

Predict = Callable[[np.ndarray], np.ndarray]  # (N, S, S, 3) float32 -> (N,) probabilities


def _inputs(decoded: Sequence[DecodedImage], preprocessing: str, size: int) -> np.ndarray:
    preprocessor = get_preprocessor(preprocessing)
    return np.stack([preprocessor(d).model_input(size) for d in decoded]).astype(np.float32)


def robustness_report(
    predict: Predict,
    decoded: Sequence[DecodedImage],
    targets: np.ndarray,
    *,
    preprocessing: str,
    size: int,
    threshold: float,
    baseline: np.ndarray | None = None,
) -> dict[str, Any]:
    """Per perturbation: label flip rate (against the unchanged slices) and AUC."""
    baseline = predict(_inputs(decoded, preprocessing, size)) if baseline is None else baseline
    base_labels = baseline >= threshold
    report: dict[str, Any] = {"threshold": threshold, "perturbations": {}}
    flips = []
    for perturbation in PERTURBATIONS:
        pairs = [(index, changed) for index, d in enumerate(decoded)
                 if (changed := perturb(d, perturbation)) is not None]
        if not pairs:
            continue
        indices = np.array([index for index, _ in pairs])
        probabilities = predict(_inputs([changed for _, changed in pairs], preprocessing, size))
        flip_rate = float(np.mean((probabilities >= threshold) != base_labels[indices]))
        flips.append(flip_rate)
        metrics = point_metrics(targets[indices], probabilities, threshold)
        report["perturbations"][perturbation.name] = {
            "flip_rate": flip_rate, "auc": metrics["auc"], "accuracy": metrics["accuracy"],
            "mean_abs_change": float(np.mean(np.abs(probabilities - baseline[indices]))), "n": len(indices)}
    report["max_flip_rate"] = max(flips) if flips else None
    report["mean_flip_rate"] = float(np.mean(flips)) if flips else None
    return report


def attention_in_lungs(heatmap: np.ndarray, lung_mask: np.ndarray) -> float | None:
    """Share of the heatmap's mass inside the lung mask (heatmap resized to the mask)."""
    image = Image.fromarray(heatmap.astype(np.float32), mode="F")
    resized = np.asarray(image.resize((lung_mask.shape[1], lung_mask.shape[0]), Image.Resampling.BILINEAR))
    resized = np.clip(resized, 0.0, None)
    total = float(resized.sum())
    if total <= 0 or not lung_mask.any():
        return None
    return float(resized[lung_mask].sum() / total)


def lung_mask_for_input(decoded: DecodedImage, prepared: PreparedSlice, size: int) -> np.ndarray:
    """The lungs in the model's input frame (the whole image for `legacy` models)."""
    mask = prepared.lung_mask_at(size)
    if mask is not None:
        return mask
    full = lung_region_mask(decoded)
    image = Image.fromarray(full.astype(np.uint8) * 255)
    return np.asarray(image.resize((size, size), Image.Resampling.NEAREST)) > 127


def attention_report(
    heatmap: Callable[[np.ndarray], np.ndarray],
    decoded: Sequence[DecodedImage],
    *,
    preprocessing: str,
    size: int,
) -> dict[str, Any]:
    """Grad-CAM mass inside the lungs over `decoded` (pass the COVID slices)."""
    preprocessor = get_preprocessor(preprocessing)
    shares = []
    for image in decoded:
        prepared = preprocessor(image)
        share = attention_in_lungs(heatmap(prepared.model_input(size)),
                                   lung_mask_for_input(image, prepared, size))
        if share is not None:
            shares.append(share)
    if not shares:
        return {"n": 0, "mean": None, "median": None}
    values = np.array(shares)
    return {"n": len(values), "mean": float(values.mean()), "median": float(np.median(values)),
            "share_above_0.8": float(np.mean(values >= 0.8))}
