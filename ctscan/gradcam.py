"""Grad-CAM: which regions of a CT slice pushed a model towards its COVID probability.

`gradcam_heatmap` is a pure function (pixels in, heatmap out). The layer is the
architecture's configured one (`ctscan.models.ARCHITECTURES`) when its map is fine enough to
localise (`MIN_HEATMAP_SIDE`) at the model's input size, else the deepest activation that is
(the shipped 128 px models end in 2x2 or 4x4 maps: bands across the whole crop).

`explain_slice` is the one heatmap rule of the service, `ctscan predict` and the page: every
member's map is placed where that member's view (the lung crop, or the whole slice) lies on
the original slice, the members' maps are averaged there, masked to the body and drawn over
the original slice; the answer names the members it combines.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ctscan.errors import ModelError
from ctscan.models import get_spec

if TYPE_CHECKING:
    import keras

HeatmapFunction = Callable[[np.ndarray], np.ndarray]
OVERLAY_MAX_SIDE = 512  # enough to read a heatmap; keeps the base64 answer small
OVERLAY_ALPHA = 0.6  # at the map's peak; the colour fades with the heat, so the slice stays readable
OVERLAY_FLOOR = 0.2  # heat below this share of the peak is not coloured at all
MIN_HEATMAP_SIDE = 8  # a coarser map cannot say which part of a lung it means
_MERGE_LAYERS = frozenset({"Concatenate", "Add"})  # a block's output, not a branch inside it
_ACTIVATION_LAYERS = frozenset({"Activation", "ReLU"})


def default_layer(model: keras.Model) -> str:
    """The configured Grad-CAM layer of the model's architecture."""
    return get_spec(model.name).gradcam_layer


def _side(layer: Any) -> int | None:
    shape = getattr(layer, "output", None)
    shape = getattr(shape, "shape", None)
    if shape is None or len(shape) != 4 or shape[1] is None:
        return None
    return int(min(shape[1], shape[2]))


def localising_layer(model: keras.Model, *, min_side: int = MIN_HEATMAP_SIDE) -> str:
    """The configured layer if its map is at least `min_side` square at this input size, else
    the deepest block output (a merge layer) whose map is, else the deepest such activation."""
    configured = default_layer(model)
    sides = {layer.name: _side(layer) for layer in model.layers}
    if (sides.get(configured) or 0) >= min_side:
        return configured
    for kinds in (_MERGE_LAYERS, _ACTIVATION_LAYERS):
        fine = [layer.name for layer in model.layers
                if (sides[layer.name] or 0) >= min_side and type(layer).__name__ in kinds]
        if fine:
            return fine[-1]
    return configured


def make_gradcam(model: keras.Model, *, layer_name: str | None = None) -> HeatmapFunction:
    """Compile Grad-CAM for one model once; the result maps (S, S, 3) pixels 0..255 to an
    (h, w) heatmap in 0..1 at the resolution of `layer_name`'s feature map."""
    import keras
    import tensorflow as tf

    layer_name = layer_name or localising_layer(model)
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


def _resized(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float map resized to (width, height), bilinear."""
    image = Image.fromarray(np.asarray(values, dtype=np.float32), mode="F")
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


def overlay_png(image_pixels: np.ndarray, heatmap: np.ndarray, *,
                max_side: int = OVERLAY_MAX_SIDE, alpha: float = OVERLAY_ALPHA) -> bytes:
    """PNG of `heatmap` blended over the original (H, W, 3) slice at the slice's aspect; the
    colour's opacity follows the heat (none below `OVERLAY_FLOOR`), so cold regions show the
    slice itself."""
    height, width = image_pixels.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    base = np.asarray(Image.fromarray(image_pixels).convert("RGB").resize(size, Image.Resampling.BILINEAR),
                      dtype=np.float32)
    heat_values = np.clip(_resized(np.clip(heatmap, 0, 1), size), 0.0, 1.0)
    opacity = (alpha * np.clip((heat_values - OVERLAY_FLOOR) / (1 - OVERLAY_FLOOR), 0.0, 1.0))[:, :, None]
    blended = base * (1.0 - opacity) + _jet(heat_values).astype(np.float32) * opacity
    buffer = io.BytesIO()
    Image.fromarray(blended.round().clip(0, 255).astype(np.uint8)).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


Box = tuple[int, int, int, int]  # top, left, bottom, right on the original slice (may leave it)


@dataclass(frozen=True)
class MemberMap:
    """One model's Grad-CAM map over what it saw: the square `view` of the original slice
    (the lung crop), or the whole slice resized (`view` None: `legacy` preprocessing)."""

    name: str
    heatmap: np.ndarray  # (h, w), 0..1
    view: Box | None


@dataclass(frozen=True)
class Explanation:
    png: bytes
    members: tuple[str, ...]  # whose maps the picture combines
    heatmap: np.ndarray  # the combined map at the picture's size, 0..1, zero outside the body


def map_on_slice(member: MemberMap, slice_shape: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """The member's map placed where its view lies on the slice, at `size` (width, height);
    zero where the model saw nothing."""
    width, height = size
    if member.view is None:
        return _resized(member.heatmap, size)
    scale = width / slice_shape[1]
    top, left, bottom, right = (round(v * scale) for v in member.view)
    canvas = np.zeros((height, width), dtype=np.float32)
    if bottom <= top or right <= left:
        return canvas
    placed = _resized(member.heatmap, (right - left, bottom - top))
    rows = slice(max(top, 0), min(bottom, height))
    columns = slice(max(left, 0), min(right, width))
    canvas[rows, columns] = placed[rows.start - top:rows.stop - top, columns.start - left:columns.stop - left]
    return canvas


def explain_slice(original_grey: np.ndarray, members: Sequence[MemberMap], *, body: np.ndarray | None,
                  max_side: int = OVERLAY_MAX_SIDE) -> Explanation:
    """The one heatmap rule: the mean of every member's map on the original slice, masked to
    `body` (a boolean mask of the slice at any resolution; None: no mask), drawn over it."""
    if not members:
        raise ValueError("a heatmap needs at least one model's map")
    height, width = original_grey.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    combined = np.mean([map_on_slice(m, (height, width), size) for m in members], axis=0)
    if body is not None:
        inside = Image.fromarray(body.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
        combined = combined * (np.asarray(inside) > 127)
    peak = float(combined.max())
    combined = combined / peak if peak > 0 else combined
    picture = np.asarray(Image.fromarray(original_grey).resize(size, Image.Resampling.BILINEAR))
    png = overlay_png(np.repeat(picture[:, :, None], 3, axis=2), combined, max_side=max_side)
    return Explanation(png=png, members=tuple(m.name for m in members), heatmap=combined)
