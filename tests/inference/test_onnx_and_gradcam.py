"""ONNX copies: made and checked against TensorFlow once, when a version is saved, stored with
their checksums; loaded and smoke-tested by the service, with TensorFlow as the fallback. And
Grad-CAM."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctscan.errors import ChecksumError, ModelError, StoreError, VersionExistsError
from ctscan.gradcam import gradcam_heatmap, make_gradcam, overlay_png
from ctscan.imaging.decoding import decode_image, resize_for_model
from ctscan.models import load_keras_model
from ctscan.serving.onnx_runtime import (
    BACKEND_ONNX,
    BACKEND_TF,
    NO_COPY_REASON,
    export_onnx,
    keras_predictor,
    load_fast_predictor,
    onnx_predictor,
)
from ctscan.storage.store import ONNX_FILE, ONNX_FOLDER, open_store

MODEL = "mobilenetv2"


@pytest.fixture(scope="module")
def store(tiny_model_store: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A copy of the tiny store these tests may damage."""
    return open_store(shutil.copytree(tiny_model_store, tmp_path_factory.mktemp("onnx") / "store"))


@pytest.fixture(scope="module")
def mobilenet(store):  # type: ignore[no-untyped-def]
    return load_keras_model(store, MODEL)


@pytest.fixture(scope="module")
def real_batch(real_ct_images: dict[str, Path], mobilenet) -> np.ndarray:  # type: ignore[no-untyped-def]
    size = mobilenet[1].input_size
    return np.stack([resize_for_model(decode_image(p.read_bytes()).grey, size)
                     for p in sorted(real_ct_images.values())])


def test_saved_version_carries_a_checked_onnx_copy(store, mobilenet, real_batch) -> None:  # type: ignore[no-untyped-def]
    model, card = mobilenet
    copy = store.onnx_copy(MODEL, card.version)
    assert copy is not None
    onnx_bytes, manifest = copy
    assert manifest.weights_sha256 == card.weights_sha256 and manifest.max_abs_difference <= 1e-4
    assert manifest.verification_images >= 2 and manifest.input_size == card.input_size
    # The stored copy answers as TensorFlow does on real images it was not checked on.
    np.testing.assert_allclose(onnx_predictor(onnx_bytes)(real_batch), keras_predictor(model)(real_batch), atol=1e-4)


def test_service_side_uses_the_stored_copy(store, mobilenet, real_batch) -> None:  # type: ignore[no-untyped-def]
    model, card = mobilenet
    fast = load_fast_predictor(model, store.onnx_copy(MODEL, card.version), real_batch,
                               weights_sha256=card.weights_sha256)
    assert fast.backend == BACKEND_ONNX and fast.fallback_reason is None
    np.testing.assert_allclose(fast.predict(real_batch), keras_predictor(model)(real_batch), atol=1e-4)


@pytest.mark.parametrize(("threads", "spinning"), [(1, False), (2, True)])
def test_onnx_thread_settings_give_the_same_answers(store, mobilenet, real_batch,  # type: ignore[no-untyped-def]
                                                    threads: int, spinning: bool) -> None:
    model, card = mobilenet
    expected = keras_predictor(model)(real_batch)
    fast = load_fast_predictor(model, store.onnx_copy(MODEL, card.version), real_batch,
                               weights_sha256=card.weights_sha256, threads=threads, spinning=spinning)
    assert fast.backend == BACKEND_ONNX
    np.testing.assert_allclose(fast.predict(real_batch), expected, atol=1e-4)


def test_copies_are_attached_once_and_bound_to_their_weights(store, mobilenet, real_batch) -> None:  # type: ignore[no-untyped-def]
    model, card = mobilenet
    onnx_bytes, manifest = store.onnx_copy(MODEL, card.version)
    with pytest.raises(VersionExistsError, match="never replaced"):
        store.attach_onnx(MODEL, card.version, onnx_bytes, manifest)
    other = store.production("densenet121")
    with pytest.raises(StoreError, match="other weights"):
        store.attach_onnx("densenet121", other, onnx_bytes, manifest)
    # A copy made from other weights is not served, even if someone stored it by hand.
    fast = load_fast_predictor(model, (onnx_bytes, manifest), real_batch, weights_sha256="0" * 64)
    assert fast.backend == BACKEND_TF and "other weights" in (fast.fallback_reason or "")


def test_a_copy_outside_the_tolerance_is_refused_when_made_and_when_served(  # type: ignore[no-untyped-def]
        mobilenet, real_batch, store, monkeypatch: pytest.MonkeyPatch) -> None:
    from ctscan.serving import onnx_runtime

    model, card = mobilenet
    # A converter that gets the model wrong (here: hands back DenseNet's copy, same input size).
    other = store.onnx_copy("densenet121", store.production("densenet121"))[0]
    monkeypatch.setattr(onnx_runtime, "convert_to_onnx", lambda _model: other)
    with pytest.raises(ModelError, match="differs from TensorFlow"):
        export_onnx(model, real_batch, verified_on="test")
    monkeypatch.undo()
    with pytest.raises(ModelError, match="no real images"):
        export_onnx(model, real_batch[:0], verified_on="test")
    onnx_bytes, manifest = store.onnx_copy(MODEL, card.version)
    loose = manifest.model_copy(update={"max_abs_difference": 0.01})
    fast = load_fast_predictor(model, (onnx_bytes, loose), real_batch, weights_sha256=card.weights_sha256)
    assert fast.backend == BACKEND_TF and "differed from TensorFlow by 0.01" in (fast.fallback_reason or "")


def test_missing_or_broken_copy_falls_back_to_tensorflow(store, mobilenet, real_batch) -> None:  # type: ignore[no-untyped-def]
    model, card = mobilenet
    fast = load_fast_predictor(model, None, real_batch, weights_sha256=card.weights_sha256)
    assert fast.backend == BACKEND_TF and fast.fallback_reason == NO_COPY_REASON
    np.testing.assert_allclose(fast.predict(real_batch), keras_predictor(model)(real_batch), atol=1e-6)

    onnx_bytes, manifest = store.onnx_copy(MODEL, card.version)
    garbage = load_fast_predictor(model, (b"not an onnx model", manifest), real_batch,
                                  weights_sha256=card.weights_sha256)
    assert garbage.backend == BACKEND_TF and "ONNX Runtime refused" in (garbage.fallback_reason or "")

    # Bytes changed in the store after the checksums were written: the store refuses the copy.
    path = store.objects.local_path(f"{MODEL}/{card.version}/{ONNX_FOLDER}/{ONNX_FILE}")
    path.write_bytes(onnx_bytes[:-64] + b"\0" * 64)
    try:
        with pytest.raises(ChecksumError, match="does not match its SHA-256"):
            store.onnx_copy(MODEL, card.version)
    finally:
        path.write_bytes(onnx_bytes)


def test_onnx_can_be_switched_off(mobilenet, real_batch) -> None:  # type: ignore[no-untyped-def]
    fast = load_fast_predictor(mobilenet[0], None, real_batch, weights_sha256=None, use_onnx=False)
    assert fast.backend == BACKEND_TF and fast.fallback_reason == "ONNX disabled by configuration"


def test_gradcam_heatmap_is_normalised_and_depends_on_the_image(mobilenet, real_batch) -> None:  # type: ignore[no-untyped-def]
    model, _ = mobilenet
    explain = make_gradcam(model)
    first, second = explain(real_batch[0]), explain(real_batch[-1])
    assert first.ndim == 2 and first.shape == second.shape
    assert first.min() >= 0.0 and first.max() <= 1.0
    np.testing.assert_allclose(gradcam_heatmap(model, real_batch[0]), first, atol=1e-5)
    with pytest.raises(ValueError, match="needs"):
        explain(real_batch[0][:10])
    with pytest.raises(ModelError, match="no layer"):
        make_gradcam(model, layer_name="no_such_layer")


def test_overlay_keeps_the_slice_aspect() -> None:
    slice_pixels = np.zeros((300, 600, 3), np.uint8)
    heatmap = np.zeros((7, 7), np.float32)
    heatmap[3, 3] = 1.0
    overlay = Image.open(io.BytesIO(overlay_png(slice_pixels, heatmap)))
    assert overlay.size == (512, 256)
    pixels = np.asarray(overlay, dtype=np.int16)
    centre, corner = pixels[128, 256], pixels[5, 5]
    assert centre[0] > corner[0]  # hot centre is red-ish, cold corner is blue-ish
