"""Grad-CAM: which regions of a CT slice pushed a model towards its COVID probability.

`gradcam_heatmap` is a pure function (pixels in, heatmap out); the layer is the
architecture's last convolutional activation from `ctscan.models.ARCHITECTURES` unless the
caller names another. `overlay_png` draws a heatmap over the original slice, at its aspect.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ctscan.errors import ModelError
from ctscan.models import get_spec

if TYPE_CHECKING:
    import keras

HeatmapFunction = Callable[[np.ndarray], np.ndarray]
OVERLAY_MAX_SIDE = 512  # enough to read a heatmap; keeps the base64 answer small
OVERLAY_ALPHA = 0.4


def default_layer(model: keras.Model) -> str:
    """The configured Grad-CAM layer of the model's architecture."""
    return get_spec(model.name).gradcam_layer


def make_gradcam(model: keras.Model, *, layer_name: str | None = None) -> HeatmapFunction:
    """Compile Grad-CAM for one model once; the result maps (S, S, 3) pixels 0..255 to an
    (h, w) heatmap in 0..1 at the resolution of `layer_name`'s feature map."""
    import keras
    import tensorflow as tf

    layer_name = layer_name or default_layer(model)
    try:
        layer = model.get_layer(layer_name)
    except ValueError:
        raise ModelError(f"model {model.name} has no layer {layer_name!r} for Grad-CAM") from None
    gradient_model = keras.Model(model.inputs, [layer.output, model.output])
    size = int(model.input_shape[1])

    @tf.function(input_signature=[tf.TensorSpec((1, size, size, 3), tf.float32)],
                 reduce_retracing=True)
    def compute(pixels: Any) -> Any:
        with tf.GradientTape() as tape:
            features, probability = gradient_model(pixels, training=False)
            score = probability[:, 0]
        gradients = tape.gradient(score, features)
        # Channel weights: mean gradient over the feature map (Selvaraju et al., 2017).
        weights = tf.reduce_mean(gradients, axis=(1, 2))
        cam = tf.nn.relu(tf.reduce_sum(features * weights[:, None, None, :], axis=-1))[0]
        peak = tf.reduce_max(cam)
        return tf.where(peak > 0, cam / peak, tf.zeros_like(cam))

    def heatmap(pixels: np.ndarray) -> np.ndarray:
        if pixels.shape != (size, size, 3):
            raise ValueError(f"Grad-CAM for {model.name} needs ({size}, {size}, 3) pixels, "
                             f"got {pixels.shape}")
        result = np.asarray(compute(pixels[None].astype(np.float32)))
        return np.nan_to_num(result, nan=0.0).clip(0.0, 1.0)

    return heatmap


def gradcam_heatmap(model: keras.Model, pixels: np.ndarray, *, layer_name: str | None = None) -> np.ndarray:
    """One-off Grad-CAM (compiles each call; services keep `make_gradcam`'s function)."""
    return make_gradcam(model, layer_name=layer_name)(pixels)


def _jet(values: np.ndarray) -> np.ndarray:
    """0..1 -> RGB uint8 with the classic 'jet' ramp (blue = low, red = high)."""
    red = np.clip(1.5 - np.abs(4 * values - 3), 0, 1)
    green = np.clip(1.5 - np.abs(4 * values - 2), 0, 1)
    blue = np.clip(1.5 - np.abs(4 * values - 1), 0, 1)
    return (np.stack([red, green, blue], axis=-1) * 255).astype(np.uint8)


def overlay_png(image_pixels: np.ndarray, heatmap: np.ndarray, *,
                max_side: int = OVERLAY_MAX_SIDE, alpha: float = OVERLAY_ALPHA) -> bytes:
    """PNG of `heatmap` blended over the original (H, W, 3) slice at the slice's aspect."""
    height, width = image_pixels.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    base = Image.fromarray(image_pixels).convert("RGB").resize(size, Image.Resampling.BILINEAR)
    heat = Image.fromarray((np.clip(heatmap, 0, 1) * 255).astype(np.uint8))
    heat_values = np.asarray(heat.resize(size, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    coloured = Image.fromarray(_jet(heat_values))
    blended = Image.blend(base, coloured, alpha)
    buffer = io.BytesIO()
    blended.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
