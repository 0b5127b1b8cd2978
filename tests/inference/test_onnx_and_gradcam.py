"""ONNX copies verified against TensorFlow on real images (with fallback), and Grad-CAM."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctscan.errors import ModelError
from ctscan.gradcam import gradcam_heatmap, make_gradcam, overlay_png
from ctscan.imaging import decode_image, resize_for_model
from ctscan.onnx_runtime import (
    BACKEND_ONNX,
    BACKEND_TF,
    build_fast_predictor,
    cached_onnx,
    keras_predictor,
    onnx_predictor,
)
from ctscan.store import LocalModelStore, load_keras_model


@pytest.fixture(scope="module")
def mobilenet(tiny_model_store: Path):  # type: ignore[no-untyped-def]
    model, card = load_keras_model(LocalModelStore(tiny_model_store), "mobilenetv2")
    return model, card


@pytest.fixture(scope="module")
def real_batch(real_ct_images: dict[str, Path], mobilenet) -> np.ndarray:  # type: ignore[no-untyped-def]
    size = int(mobilenet[1]["input_size"])
    return np.stack([resize_for_model(decode_image(p.read_bytes()).grey, size)
                     for p in sorted(real_ct_images.values())])


def test_onnx_copy_matches_tensorflow_on_real_images(mobilenet, real_batch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, card = mobilenet
    fast = build_fast_predictor(model, real_batch, weights_sha256=card["weights_sha256"], cache_dir=tmp_path)
    assert fast.backend == BACKEND_ONNX and fast.fallback_reason is None
    assert fast.max_abs_difference is not None and fast.max_abs_difference <= 1e-4
    expected = keras_predictor(model)(real_batch)
    np.testing.assert_allclose(fast.predict(real_batch), expected, atol=1e-4)
    assert list(tmp_path.glob("*.onnx"))  # cached for the next load of these weights


@pytest.mark.parametrize(("threads", "spinning"), [(1, False), (2, True)])
def test_onnx_thread_settings_give_the_same_answers(mobilenet, real_batch, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                    threads: int, spinning: bool) -> None:
    model, card = mobilenet
    expected = keras_predictor(model)(real_batch)
    fast = build_fast_predictor(model, real_batch, weights_sha256=card["weights_sha256"], cache_dir=tmp_path,
                                threads=threads, spinning=spinning)
    assert fast.backend == BACKEND_ONNX
    np.testing.assert_allclose(fast.predict(real_batch), expected, atol=1e-4)
    onnx_bytes = cached_onnx(model, card["weights_sha256"], tmp_path)
    np.testing.assert_allclose(onnx_predictor(onnx_bytes, threads=threads, spinning=spinning)(real_batch),
                               expected, atol=1e-4)


def test_broken_onnx_copy_falls_back_to_tensorflow(mobilenet, real_batch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, card = mobilenet
    build_fast_predictor(model, real_batch, weights_sha256=card["weights_sha256"], cache_dir=tmp_path)
    for cached in tmp_path.glob("*.onnx"):
        cached.write_bytes(b"not an onnx model")
    fast = build_fast_predictor(model, real_batch, weights_sha256=card["weights_sha256"], cache_dir=tmp_path)
    assert fast.backend == BACKEND_TF and "ONNX Runtime refused" in (fast.fallback_reason or "")
    np.testing.assert_allclose(fast.predict(real_batch), keras_predictor(model)(real_batch), atol=1e-6)


def test_onnx_can_be_switched_off(mobilenet, real_batch) -> None:  # type: ignore[no-untyped-def]
    fast = build_fast_predictor(mobilenet[0], real_batch, use_onnx=False)
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
