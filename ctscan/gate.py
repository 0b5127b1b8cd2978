"""Input gate: is this an axial chest-CT slice the models can judge?

Two checks, both before any label is given:
1. Lung signals from the preprocessing (`ctscan.imaging.preprocessing`): no lungs found -> the
   answer is `no_lungs_visible` (an abdominal or neck slice, a slice outside the chest).
   A DICOM whose modality is not CT -> `not_chest_ct`.
2. Distance to the training data in the model's own feature space (the backbone's global
   average pool): a probabilistic-PCA Mahalanobis distance (Tipping & Bishop 1999) fitted
   on the training images' features, with its threshold at a high quantile of the
   validation images' distances. Farther than that -> `not_chest_ct` (a photo, an X-ray,
   a drawing, a CT too unlike anything the model was trained on to be judged).

The fitted gate is a few kilobytes, stored in the model card (base64 npz, float32)."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ctscan.models import HEAD_PREFIX

if TYPE_CHECKING:
    import keras

GATE_COMPONENTS = 16
GATE_QUANTILE = 0.99  # of the val distances: about 1 in 100 in-distribution slices refused
FEATURE_LAYER = f"{HEAD_PREFIX}pool"

OUTCOME_NOT_CHEST_CT = "not_chest_ct"
OUTCOME_NO_LUNGS = "no_lungs_visible"


@dataclass(frozen=True)
class FeatureGate:
    """PPCA density of the training features: distance² = Σ (projection²/variance) over the
    principal components + residual²/noise variance over the rest."""

    mean: np.ndarray  # (D,)
    components: np.ndarray  # (k, D), orthonormal rows
    variances: np.ndarray  # (k,)
    noise_variance: float
    threshold: float  # distance beyond which an input is refused
    quantile: float

    def distance(self, features: np.ndarray) -> np.ndarray:
        centred = np.asarray(features, dtype=np.float64) - self.mean
        projection = centred @ self.components.T
        residual = centred - projection @ self.components
        squared = (projection**2 / self.variances).sum(axis=1) + (residual**2).sum(axis=1) / self.noise_variance
        # Per dimension, so thresholds read alike whatever the backbone's width: ~1 in distribution.
        return np.sqrt(squared / centred.shape[1])

    def accepts(self, features: np.ndarray) -> np.ndarray:
        return self.distance(features) <= self.threshold

    def to_dict(self) -> dict[str, Any]:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, mean=self.mean.astype(np.float32), components=self.components.astype(np.float32),
                            variances=self.variances.astype(np.float32))
        return {"method": "ppca-mahalanobis", "layer": FEATURE_LAYER, "components": len(self.variances),
                "noise_variance": float(self.noise_variance), "threshold": float(self.threshold),
                "quantile": self.quantile, "arrays": base64.b64encode(buffer.getvalue()).decode("ascii")}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> FeatureGate:
        with np.load(io.BytesIO(base64.b64decode(record["arrays"]))) as arrays:
            return cls(mean=arrays["mean"].astype(np.float64), components=arrays["components"].astype(np.float64),
                       variances=arrays["variances"].astype(np.float64),
                       noise_variance=float(record["noise_variance"]), threshold=float(record["threshold"]),
                       quantile=float(record.get("quantile", GATE_QUANTILE)))


def fit_gate(train_features: np.ndarray, val_features: np.ndarray, *, components: int = GATE_COMPONENTS,
             quantile: float = GATE_QUANTILE) -> FeatureGate:
    """Fit the density on training features; put the threshold at `quantile` of val's distances."""
    train = np.asarray(train_features, dtype=np.float64)
    count, dimensions = train.shape
    components = max(1, min(components, count - 1, dimensions - 1))
    mean = train.mean(axis=0)
    centred = train - mean
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    spectrum = singular**2 / max(count - 1, 1)
    rest = spectrum[components:]
    noise = float(rest.sum() / max(dimensions - components, 1)) if rest.size else 1e-6
    noise = max(noise, 1e-8 * max(float(spectrum[0]), 1e-12))
    variances = np.maximum(spectrum[:components], noise)
    partial = FeatureGate(mean=mean, components=vt[:components], variances=variances, noise_variance=noise,
                          threshold=float("inf"), quantile=quantile)
    threshold = float(np.quantile(partial.distance(val_features), quantile))
    return FeatureGate(mean=mean, components=vt[:components], variances=variances, noise_variance=noise,
                       threshold=threshold, quantile=quantile)


def feature_extractor(model: keras.Model) -> Callable[[np.ndarray], np.ndarray]:
    """(N, S, S, 3) pixels -> (N, D) pooled backbone features, as one compiled graph."""
    import keras
    import tensorflow as tf

    extractor = keras.Model(model.inputs, model.get_layer(FEATURE_LAYER).output)
    size = int(model.input_shape[1])

    @tf.function(input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32)], reduce_retracing=True)
    def forward(pixels: Any) -> Any:
        return extractor(pixels, training=False)

    def features(batch: np.ndarray) -> np.ndarray:
        outputs = [np.asarray(forward(batch[i:i + 64].astype(np.float32))) for i in range(0, len(batch), 64)]
        return np.concatenate(outputs) if outputs else np.zeros((0, extractor.output_shape[-1]), np.float32)

    return features
