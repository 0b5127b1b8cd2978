"""ONNX Runtime copies of the Keras models: made and checked once, loaded by servers.

`export_onnx` converts a model with tf2onnx and compares the copy with TensorFlow on real
CT images; only a copy within the tolerance (1e-4 by default, in probability) is kept, and
the store keeps it beside the version's weights (`ModelStore.attach_onnx`). Servers call
`load_fast_predictor`: it loads the stored copy, smoke-tests it and otherwise falls back to
TensorFlow, saying why. The copy is only a speed-up; a version without one still serves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ctscan.errors import DataError, ImageError, ModelError
from ctscan.models import INPUT_NAME
from ctscan.storage.records import OnnxManifest

if TYPE_CHECKING:
    import keras

logger = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-4
ONNX_OPSET = 17
BACKEND_ONNX = "onnxruntime"
BACKEND_TF = "tensorflow"
NO_COPY_REASON = "this version has no ONNX copy (make one with `ctscan models export-onnx`)"

Predict = Callable[[np.ndarray], np.ndarray]
# (N, S, S, 3) pixels -> (N,) probabilities and the (N, D) pooled features the input gate
# measures (None from a copy made before copies carried them).
PredictBoth = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]


class OnnxConversionError(ModelError):
    """The converter refused the model, or its copy disagrees with TensorFlow."""


@dataclass(frozen=True)
class FastPredictor:
    """A batch predictor (N, S, S, 3) float32 pixels -> (N,) probabilities, and what runs it."""

    predict: Predict
    backend: str  # BACKEND_ONNX or BACKEND_TF
    max_abs_difference: float | None  # ONNX vs TensorFlow when the copy was made
    fallback_reason: str | None  # why ONNX is not used, when it is not
    both: PredictBoth | None = None  # probabilities and gate features from one forward pass


def _with_features(model: keras.Model) -> keras.Model:
    """The model with a second output, the backbone's pooled features (the input gate's
    measure), when it has that layer."""
    import keras

    from ctscan.gate import FEATURE_LAYER

    try:
        features = model.get_layer(FEATURE_LAYER).output
    except ValueError:
        return model
    return keras.Model(model.inputs, [model.output, features], name=model.name)


def keras_predictor(model: keras.Model) -> Predict:
    """A compiled TensorFlow graph of the model for any batch size (no Keras predict loop)."""
    both = keras_both(model)
    return lambda batch: both(batch)[0]


def keras_both(model: keras.Model) -> PredictBoth:
    """Probabilities and gate features from one compiled TensorFlow graph."""
    import tensorflow as tf

    size = int(model.input_shape[1])
    signature = [tf.TensorSpec((None, size, size, 3), tf.float32, name=INPUT_NAME)]
    wrapped = _with_features(model)

    @tf.function(input_signature=signature, reduce_retracing=True)
    def forward(pixels: Any) -> Any:
        return wrapped(pixels, training=False)

    def both(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        outputs = forward(batch.astype(np.float32, copy=False))
        if isinstance(outputs, list | tuple):
            return np.asarray(outputs[0]).reshape(-1), np.asarray(outputs[1])
        return np.asarray(outputs).reshape(-1), None

    return both


def converter_version() -> str:
    import tf2onnx

    return f"tf2onnx {tf2onnx.__version__}"


def convert_to_onnx(model: keras.Model, *, opset: int = ONNX_OPSET) -> bytes:
    """Keras model -> serialized ONNX (dynamic batch size) with tf2onnx; outputs: the
    probability, then the pooled features the input gate measures."""
    import tensorflow as tf

    size = int(model.input_shape[1])
    signature = (tf.TensorSpec((None, size, size, 3), tf.float32, name=INPUT_NAME),)
    try:
        import tf2onnx

        proto, _ = tf2onnx.convert.from_keras(_with_features(model), input_signature=signature, opset=opset)
    except Exception as exc:
        raise OnnxConversionError(f"tf2onnx could not convert {model.name}: "
                                  f"{type(exc).__name__}: {str(exc)[:200]}") from None
    return bytes(proto.SerializeToString())


def onnx_predictor(onnx_bytes: bytes, *, threads: int | None = None, spinning: bool = True) -> Predict:
    """An ONNX Runtime session on the CPU. `spinning=False` stops its idle threads from
    busy-waiting, which in a server would take the cores from decoding and HTTP."""
    both = onnx_both(onnx_bytes, threads=threads, spinning=spinning)
    return lambda batch: both(batch)[0]


def onnx_both(onnx_bytes: bytes, *, threads: int | None = None, spinning: bool = True) -> PredictBoth:
    """Probabilities and gate features from one ONNX Runtime run (features None for a copy
    with one output)."""
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

    def both(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        outputs = session.run(None, {input_name: batch.astype(np.float32, copy=False)})
        return np.asarray(outputs[0]).reshape(-1), np.asarray(outputs[1]) if len(outputs) > 1 else None

    return both


def max_difference(reference: Predict | np.ndarray, candidate: Predict, images: np.ndarray) -> float:
    """Largest absolute difference in probability, image by image and as one batch."""
    expected = reference if isinstance(reference, np.ndarray) else reference(images)
    batched = candidate(images)
    single = np.concatenate([candidate(images[i:i + 1]) for i in range(len(images))])
    if batched.shape != expected.shape or not (np.all(np.isfinite(batched)) and np.all(np.isfinite(single))):
        return float("inf")
    return float(max(np.abs(batched - expected).max(), np.abs(single - expected).max()))


# --- made once, when a version is saved ----------------------------------------------------------
@dataclass(frozen=True)
class OnnxExport:
    onnx_bytes: bytes
    input_size: int
    max_abs_difference: float
    tolerance: float
    verification_images: int
    verified_on: str

    def manifest(self, *, weights_sha256: str) -> OnnxManifest:
        import hashlib

        return OnnxManifest(
            sha256=hashlib.sha256(self.onnx_bytes).hexdigest(), size=len(self.onnx_bytes),
            weights_sha256=weights_sha256, input_size=self.input_size, opset=ONNX_OPSET,
            converter=converter_version(), max_abs_difference=self.max_abs_difference,
            tolerance=self.tolerance, verification_images=self.verification_images,
            verified_on=self.verified_on, created_at=datetime.now(UTC).isoformat())


def export_onnx(model: keras.Model, images: np.ndarray, *, verified_on: str,
                tolerance: float = DEFAULT_TOLERANCE) -> OnnxExport:
    """Convert `model` and check the copy against TensorFlow on `images` (real CT slices at
    the model's input size); OnnxConversionError unless it matches within `tolerance`."""
    if len(images) == 0:
        raise OnnxConversionError("no real images to check the ONNX copy against TensorFlow")
    onnx_bytes = convert_to_onnx(model)
    candidate = onnx_predictor(onnx_bytes, spinning=False)
    difference = max_difference(keras_predictor(model), candidate, images)
    if not difference <= tolerance:
        raise OnnxConversionError(f"the ONNX copy differs from TensorFlow by {difference:.3g} on "
                                  f"{len(images)} real images (tolerance {tolerance:g})")
    return OnnxExport(onnx_bytes=onnx_bytes, input_size=int(model.input_shape[1]), max_abs_difference=difference,
                      tolerance=tolerance, verification_images=len(images), verified_on=verified_on)


# --- loaded by servers -------------------------------------------------------------------------
def load_fast_predictor(
    model: keras.Model,
    onnx_copy: tuple[bytes, OnnxManifest] | None,
    smoke_images: np.ndarray,
    *,
    weights_sha256: str | None,
    use_onnx: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    threads: int | None = None,
    spinning: bool = True,
    absent_reason: str = NO_COPY_REASON,
) -> FastPredictor:
    """The stored ONNX copy when it belongs to these weights, was within `tolerance` of
    TensorFlow when it was made and passes a smoke test here; else the TensorFlow graph and
    the reason. Never raises for an ONNX problem."""
    fast = stored_onnx_predictor(onnx_copy, smoke_images, weights_sha256=weights_sha256, use_onnx=use_onnx,
                                 tolerance=tolerance, threads=threads, spinning=spinning,
                                 absent_reason=absent_reason)
    if isinstance(fast, FastPredictor):
        return fast
    return tensorflow_fallback(model, onnx_copy, fast)


def stored_onnx_predictor(
    onnx_copy: tuple[bytes, OnnxManifest] | None,
    smoke_images: np.ndarray,
    *,
    weights_sha256: str | None,
    use_onnx: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    threads: int | None = None,
    spinning: bool = True,
    absent_reason: str = NO_COPY_REASON,
) -> FastPredictor | str:
    """The stored copy, checked as `load_fast_predictor` says, or the reason it cannot serve
    (needs neither TensorFlow nor the Keras model)."""
    reason = _onnx_refusal(onnx_copy, weights_sha256=weights_sha256, use_onnx=use_onnx,
                           tolerance=tolerance, absent_reason=absent_reason)
    if reason is not None or onnx_copy is None:
        return reason or absent_reason
    onnx_bytes, manifest = onnx_copy
    try:
        both = onnx_both(onnx_bytes, threads=threads, spinning=spinning)

        def candidate(batch: np.ndarray) -> np.ndarray:
            return both(batch)[0]

        problem = smoke_test(candidate, smoke_images, tolerance=tolerance)
    except OnnxConversionError as exc:
        problem = str(exc)
    except Exception as exc:  # a broken copy can make the runtime raise anything
        problem = f"the ONNX copy failed its smoke test: {type(exc).__name__}: {str(exc)[:200]}"
    return problem if problem is not None else FastPredictor(candidate, BACKEND_ONNX, manifest.max_abs_difference,
                                                             None, both)


def tensorflow_fallback(model: keras.Model, onnx_copy: tuple[bytes, OnnxManifest] | None,
                        reason: str) -> FastPredictor:
    logger.warning("%s: serving with TensorFlow: %s", model.name, reason)
    difference = onnx_copy[1].max_abs_difference if onnx_copy is not None else None
    both = keras_both(model)
    return FastPredictor(lambda batch: both(batch)[0], BACKEND_TF, difference, reason, both)


def _onnx_refusal(onnx_copy: tuple[bytes, OnnxManifest] | None, *, weights_sha256: str | None, use_onnx: bool,
                  tolerance: float, absent_reason: str) -> str | None:
    if not use_onnx:
        return "ONNX disabled by configuration"
    if onnx_copy is None:
        return absent_reason
    manifest = onnx_copy[1]
    if manifest.weights_sha256 != weights_sha256:
        return "the stored ONNX copy was made from other weights"
    if not manifest.max_abs_difference <= tolerance:
        return (f"the ONNX copy differed from TensorFlow by {manifest.max_abs_difference:.3g} when it was "
                f"made (tolerance {tolerance:g})")
    return None


def smoke_test(predict: Predict, images: np.ndarray, *, tolerance: float) -> str | None:
    """None when `predict` gives one finite probability per image, the same one alone and in
    a batch; else what is wrong."""
    batched = predict(images)
    if batched.shape != (len(images),):
        return f"the ONNX copy gave {batched.shape} outputs for {len(images)} images"
    if not np.all(np.isfinite(batched) & (batched >= 0) & (batched <= 1)):
        return "the ONNX copy gave probabilities outside 0..1"
    difference = max_difference(batched, predict, images)
    if not difference <= tolerance:
        return f"the ONNX copy answers differently alone and in a batch (by {difference:.3g})"
    return None


def load_verification_images(folder: Path, count: int) -> list[np.ndarray]:
    """Up to `count` real CT slices (greyscale, both classes, val split of a dataset folder;
    else any PNG/JPEG in the folder); empty when there are none."""
    from ctscan.data.dataset import CTDataset
    from ctscan.imaging.decoding import decode_image

    paths: list[Path] = []
    try:
        dataset = CTDataset(folder)
        by_label: dict[str, list[Path]] = {}
        for sample in dataset.split("val"):
            by_label.setdefault(sample.label, []).append(sample.path)
        for index in range(count):
            for label in sorted(by_label):
                if index < len(by_label[label]) and len(paths) < count:
                    paths.append(by_label[label][index])
    except DataError:
        if folder.is_dir():
            paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:count]
    images = []
    for path in paths:
        try:
            images.append(decode_image(path.read_bytes()).grey)
        except (ImageError, OSError) as exc:
            logger.warning("verification image %s skipped: %s", path.name, exc)
    return images

