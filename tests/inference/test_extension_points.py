"""Adding an input format or an endpoint: one registration or one route, proved through the
real app over HTTP (served from this process, so the test's registrations are in effect; its
lifespan loads the models) and, for the format, the web page."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from harness import serve_app_in_thread
from pydantic import BaseModel

from ctscan.imaging.decoding import DecodedImage, resize_for_model
from ctscan.imaging.formats import InputFormat, accept_attribute, register_format, sniff, unregister_format
from services.inference.deps import RegistryDep  # module level: FastAPI resolves route annotations here


def _decode_npy(data: bytes, *, max_pixels: int, max_side: int) -> DecodedImage:
    """A 2-D NumPy array of any range -> 8-bit greyscale (a toy format, not a product one)."""
    from ctscan.errors import ImageTooLargeError, UnsupportedImageError

    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise UnsupportedImageError(f"cannot read the array: {exc}") from None
    if array.ndim != 2:
        raise UnsupportedImageError("send one 2-D slice")
    if max(array.shape) > max_side or array.size > max_pixels:
        raise ImageTooLargeError("the array is too large")
    low, high = float(array.min()), float(array.max())
    scaled = np.zeros(array.shape) if high <= low else (array - low) / (high - low) * 255
    return DecodedImage(grey=scaled.round().astype(np.uint8), source_format="NPY")


NPY = InputFormat("NPY", "application/x-npy", (".npy",), lambda data: data.startswith(b"\x93NUMPY"), _decode_npy)


@pytest.fixture()
def npy_format() -> Iterator[InputFormat]:
    register_format(NPY)
    yield NPY
    unregister_format(NPY.name)


def _npy_slice(real_png: Path) -> bytes:
    from ctscan.imaging.decoding import decode_image

    buffer = io.BytesIO()
    np.save(buffer, decode_image(real_png.read_bytes()).grey.astype(np.int16) * 7 - 1000)  # HU-like range
    return buffer.getvalue()


@pytest.fixture()
def small_store(tmp_path: Path) -> Path:
    """One untrained MobileNetV2 at 32 px in production (no ONNX copy: TensorFlow serves it)."""
    from ctscan.models import build_model, pack_weights
    from ctscan.storage.store import open_store

    store = open_store(tmp_path / "store")
    model = build_model("mobilenetv2", init="none", input_size=32, compile_model=False)
    version = store.save("mobilenetv2", weights=pack_weights(model),
                         card={"architecture": "mobilenetv2", "input_size": 32, "threshold": 0.5, "init": "none"})
    store.promote("mobilenetv2", version)
    return tmp_path / "store"


def _app(store: Path, data_dir: Path, **settings: object) -> object:
    from ctscan.settings import InferenceSettings, StoreSettings
    from services.inference.app import create_app

    return create_app(InferenceSettings.from_values(
        _env_file=None, models=["mobilenetv2"], reload_poll_seconds=0, verification_dir=str(data_dir), auth="off",
        store=StoreSettings.from_values(_env_file=None, model_store=str(store)), **settings))


@pytest.mark.slow  # builds a Keras model and loads it into the service
def test_a_registered_input_format_is_served_and_accepted_by_the_page(
        npy_format: InputFormat, small_store: Path, data_dir: Path, real_ct_images: dict[str, Path]) -> None:
    png = next(path for key, path in sorted(real_ct_images.items()) if key.endswith("png"))
    data = _npy_slice(png)
    assert sniff(data) is NPY and ".npy" in accept_attribute()

    with serve_app_in_thread(_app(small_store, data_dir)) as url:
        deadline = time.monotonic() + 120
        while requests.get(url + "/readyz", timeout=10).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        answer = requests.post(url + "/predict", params={"model": "mobilenetv2", "explain": "true"},
                               files={"file": ("slice.npy", data, "application/octet-stream")}, timeout=60)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["source_format"] == "NPY" and 0 <= body["probability_covid"] <= 1
        assert body["heatmap_png_base64"]
        # Garbage that claims to be an array is a broken image (422), not an unknown file (415).
        broken = requests.post(url + "/predict", params={"model": "mobilenetv2"}, timeout=60,
                               files={"file": ("x.npy", b"\x93NUMPY garbage", "application/octet-stream")})
        assert broken.status_code == 422 and broken.json()["error"]["code"] == "undecodable_image"

    # The web page takes it, renders its preview to PNG and sends it on under a neutral name.
    from services.web.uploads import check_upload, preview_data_url

    upload = check_upload(data=data)
    assert upload.source_format == "NPY" and upload.neutral_filename == "upload.npy"
    assert (preview_data_url(upload) or "").startswith("data:image/png;base64,")
    model_input = resize_for_model(NPY.decode(data, max_pixels=10**7, max_side=10**4).grey, 32)
    assert model_input.shape == (32, 32, 3)


class Uptime(BaseModel):
    served_models: list[str]
    ready: bool


def test_a_route_added_to_the_router_is_served_with_its_response_model(tmp_path: Path, data_dir: Path) -> None:
    from services.inference.auth import PUBLIC
    from services.inference.routes import router

    @router.get("/toy/uptime", response_model=Uptime, tags=["toy"], dependencies=[PUBLIC])
    async def toy_uptime(registry: RegistryDep) -> dict[str, object]:
        # Extra keys are dropped by the response model: only the contract goes out.
        return {"served_models": sorted(registry.models), "ready": registry.is_ready(), "secret": "x"}

    try:
        with serve_app_in_thread(_app(tmp_path / "empty-store", data_dir)) as url:
            response = requests.get(url + "/toy/uptime", timeout=10)
            assert response.status_code == 200 and response.json() == {"served_models": [], "ready": False}
            assert "X-Request-ID" in response.headers  # the app's middleware applies to it too
            schema = requests.get(url + "/openapi.json", timeout=10).json()
            assert schema["paths"]["/toy/uptime"]["get"]["tags"] == ["toy"]
            assert "Uptime" in schema["components"]["schemas"]
    finally:
        router.routes[:] = [route for route in router.routes if getattr(route, "path", "") != "/toy/uptime"]
