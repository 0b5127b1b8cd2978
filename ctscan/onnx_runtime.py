"""ONNX Runtime copies of the Keras models: conversion, verification and the fast predictor.

The ONNX copy is only a speed-up. It is used only after its outputs match TensorFlow's on
real CT images within a tolerance (1e-4 by default); anything else (a converter error, an
unsupported op, a mismatch) falls back to TensorFlow and says why.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ctscan.errors import ModelError
from ctscan.models import INPUT_NAME

if TYPE_CHECKING:
    import keras

logger = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-4
ONNX_OPSET = 17
BACKEND_ONNX = "onnxruntime"
BACKEND_TF = "tensorflow"

Predict = Callable[[np.ndarray], np.ndarray]


class OnnxConversionError(ModelError):
    """The converter refused the model, or its copy disagrees with TensorFlow."""


@dataclass(frozen=True)
class FastPredictor:
    """A batch predictor (N, S, S, 3) float32 pixels -> (N,) probabilities, and what runs it."""

    predict: Predict
    backend: str  # BACKEND_ONNX or BACKEND_TF
    max_abs_difference: float | None  # ONNX vs TensorFlow on the verification images
    fallback_reason: str | None  # why ONNX is not used, when it is not


def keras_predictor(model: keras.Model) -> Predict:
    """A compiled TensorFlow graph of the model for any batch size (no Keras predict loop)."""
    import tensorflow as tf

    size = int(model.input_shape[1])
    signature = [tf.TensorSpec((None, size, size, 3), tf.float32, name=INPUT_NAME)]

    @tf.function(input_signature=signature, reduce_retracing=True)
    def forward(pixels: Any) -> Any:
        return model(pixels, training=False)

    def predict(batch: np.ndarray) -> np.ndarray:
        return np.asarray(forward(batch.astype(np.float32, copy=False))).reshape(-1)

    return predict


def convert_to_onnx(model: keras.Model, *, opset: int = ONNX_OPSET) -> bytes:
    """Keras model -> serialized ONNX (dynamic batch size) with tf2onnx."""
    import tensorflow as tf

    size = int(model.input_shape[1])
    signature = (tf.TensorSpec((None, size, size, 3), tf.float32, name=INPUT_NAME),)
    try:
        import tf2onnx

        proto, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=opset)
    except Exception as exc:
        raise OnnxConversionError(f"tf2onnx could not convert {model.name}: "
                                  f"{type(exc).__name__}: {str(exc)[:200]}") from None
    return bytes(proto.SerializeToString())


def onnx_predictor(onnx_bytes: bytes, *, threads: int | None = None, spinning: bool = True) -> Predict:
    """An ONNX Runtime session on the CPU. `spinning=False` stops its idle threads from
    busy-waiting, which in a server would take the cores from decoding and HTTP."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    else:  # spin while a Run is active (fast hand-offs between layers), never while idle
        options.add_session_config_entry("session.force_spinning_stop", "1")
    try:
        session = ort.InferenceSession(onnx_bytes, sess_options=options,
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise OnnxConversionError(f"ONNX Runtime refused the model: {str(exc)[:200]}") from None
    input_name = session.get_inputs()[0].name

    def predict(batch: np.ndarray) -> np.ndarray:
        outputs = session.run(None, {input_name: batch.astype(np.float32, copy=False)})
        return np.asarray(outputs[0]).reshape(-1)

    return predict


def max_difference(reference: Predict, candidate: Predict, images: np.ndarray) -> float:
    """Largest absolute difference in probability, image by image and as one batch."""
    expected = reference(images)
    batched = candidate(images)
    single = np.concatenate([candidate(images[i:i + 1]) for i in range(len(images))])
    if batched.shape != expected.shape or not np.all(np.isfinite(batched)):
        return float("inf")
    return float(max(np.abs(batched - expected).max(), np.abs(single - expected).max()))


def cached_onnx(model: keras.Model, weights_sha256: str | None, cache_dir: Path | None) -> bytes:
    """Convert, reusing an earlier conversion of exactly these weights when cached."""
    if cache_dir is None or not weights_sha256:
        return convert_to_onnx(model)
    key = hashlib.sha256(f"{model.name}:{model.input_shape}:{weights_sha256}:{ONNX_OPSET}".encode())
    path = cache_dir / f"{model.name}-{key.hexdigest()[:24]}.onnx"
    if path.is_file():
        return path.read_bytes()
    onnx_bytes = convert_to_onnx(model)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_bytes(onnx_bytes)
        os.replace(temporary, path)
    except OSError as exc:  # a read-only cache only costs a conversion next time
        logger.warning("cannot cache ONNX model in %s: %s", cache_dir, exc)
    return onnx_bytes


def build_fast_predictor(
    model: keras.Model,
    verification_images: np.ndarray,
    *,
    use_onnx: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    weights_sha256: str | None = None,
    cache_dir: Path | None = None,
    threads: int | None = None,
    spinning: bool = True,
) -> FastPredictor:
    """ONNX Runtime when its copy matches TensorFlow on `verification_images` within
    `tolerance`, else the TensorFlow graph. Never raises for an ONNX problem."""
    tf_predict = keras_predictor(model)
    if not use_onnx:
        return FastPredictor(tf_predict, BACKEND_TF, None, "ONNX disabled by configuration")
    if len(verification_images) == 0:
        return FastPredictor(tf_predict, BACKEND_TF, None, "no verification images")
    try:
        onnx_bytes = cached_onnx(model, weights_sha256, cache_dir)
        candidate = onnx_predictor(onnx_bytes, threads=threads, spinning=spinning)
        difference = max_difference(tf_predict, candidate, verification_images)
    except OnnxConversionError as exc:
        logger.warning("%s: ONNX refused, serving with TensorFlow: %s", model.name, exc)
        return FastPredictor(tf_predict, BACKEND_TF, None, str(exc))
    except Exception as exc:
        reason = f"ONNX copy failed on verification images: {type(exc).__name__}: {str(exc)[:200]}"
        logger.warning("%s: %s", model.name, reason)
        return FastPredictor(tf_predict, BACKEND_TF, None, reason)
    if difference > tolerance:
        reason = (f"ONNX copy differs from TensorFlow by {difference:.3g} on verification "
                  f"images (tolerance {tolerance:g})")
        logger.warning("%s: %s; serving with TensorFlow", model.name, reason)
        return FastPredictor(tf_predict, BACKEND_TF, difference, reason)
    return FastPredictor(candidate, BACKEND_ONNX, difference, None)


def stack_for_model(images: Sequence[np.ndarray]) -> np.ndarray:
    """List of (S, S, 3) float32 arrays -> one (N, S, S, 3) batch."""
    return np.stack(list(images)).astype(np.float32, copy=False)
