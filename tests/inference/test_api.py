"""The inference API end to end: real service process, real CT images, tiny real models."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from ctscan import DISCLAIMER
from ctscan.imaging.decoding import decode_image
from inference.conftest import RunningService

MODELS = ("inceptionv3", "densenet121", "mobilenetv2")


def _first(real_ct_images: dict[str, Path], suffix: str) -> Path:
    return next(path for key, path in sorted(real_ct_images.items()) if key.endswith(suffix))


def _check_prediction(body: dict, *, model: str, source_format: str) -> None:
    """A classified slice (real UCSD chest slices: lungs visible) in API version 2."""
    assert body["model"] == model and body["api_version"] == 2
    assert body["outcome"] in ("covid", "non_covid", "indeterminate"), body["reasons"]
    assert 0.0 <= body["probability_covid"] <= 1.0
    side = "covid" if body["probability_covid"] >= body["threshold"] else "non_covid"
    assert body["label"] == {"covid": "COVID", "non_covid": "non-COVID"}[side]
    band = body["indeterminate_band"]
    close = abs(body["probability_covid"] - body["threshold"]) < band
    if body["outcome"] != "indeterminate":
        assert body["outcome"] == side and not close and body["reasons"] == []
    else:  # close to the threshold, or the ensemble's models disagree; the reasons say which
        assert close or body["disagreement"]
        assert body["reasons"] and body["outcome_text"].startswith("Indeterminate")
    # Deprecated v1 field, kept for old clients: p or 1 - p by the label, not a chance of being right.
    expected_confidence = body["probability_covid"] if side == "covid" else 1 - body["probability_covid"]
    assert body["confidence"] == pytest.approx(expected_confidence)
    assert body["lung_findings"]["lung_fraction"] > 0.06
    assert body["disclaimer"] == DISCLAIMER
    assert body["source_format"] == source_format
    assert body["request_id"]
    assert body["timings_ms"]["total"] >= body["timings_ms"]["inference"] >= 0


def test_health_and_readiness(inference_service: RunningService) -> None:
    assert inference_service.get("/healthz").json() == {"status": "ok"}
    ready = inference_service.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready" and set(body["models"]) == set(MODELS)


def test_models_lists_versions_thresholds_and_card_metrics(inference_service: RunningService) -> None:
    from ctscan.storage.store import open_store

    store = open_store(inference_service.store_dir)
    body = inference_service.get("/models").json()
    listed = {entry["name"]: entry for entry in body["models"]}
    assert set(listed) == set(MODELS)
    for name, entry in listed.items():
        version = store.production(name)
        card = store.card(name, version)
        assert entry["version"] == version
        assert entry["input_size"] == card.input_size
        assert entry["threshold"] == pytest.approx(card.threshold)
        assert entry["init"] == "none"
        assert entry["metrics"]["val"]["auc"] == pytest.approx(card.metrics["val"]["auc"])
        assert entry["backend"] in ("onnxruntime", "tensorflow")
    ensemble = body["ensemble"]
    assert ensemble["members"] == {name: store.production(name) for name in MODELS}
    assert ensemble["threshold_source"] == "val-calibrated"
    record = store.ensemble_record()
    assert record is not None and ensemble["threshold"] == pytest.approx(record.threshold)


def test_stored_onnx_copies_are_used(inference_service: RunningService) -> None:
    from ctscan.storage.store import open_store

    store = open_store(inference_service.store_dir)
    for entry in inference_service.get("/models").json()["models"]:
        assert entry["backend"] == "onnxruntime", entry["onnx_fallback_reason"]
        # The difference measured when the copy was made, as its manifest records it.
        copy = store.onnx_copy(entry["name"], entry["version"])
        assert copy is not None and entry["onnx_max_abs_difference"] == copy[1].max_abs_difference <= 1e-4


@pytest.mark.parametrize("model", MODELS)
def test_each_model_on_real_ct_images(inference_service: RunningService, real_ct_images: dict[str, Path],
                                      model: str) -> None:
    versions = {e["name"]: e["version"] for e in inference_service.get("/models").json()["models"]}
    for _key, path in sorted(real_ct_images.items()):
        response = inference_service.predict(path.read_bytes(), filename=path.name, params={"model": model})
        assert response.status_code == 200, response.text
        body = response.json()
        _check_prediction(body, model=model, source_format="JPEG" if path.suffix.lower() == ".jpg" else "PNG")
        assert body["model_version"] == versions[model]
        assert body["members"] is None and body["disagreement"] is None
        assert body["heatmap_png_base64"] is None and body["timings_ms"]["gradcam"] is None


def test_ensemble_is_the_default_and_reports_members(inference_service: RunningService,
                                                      real_ct_images: dict[str, Path]) -> None:
    path = _first(real_ct_images, "png")
    body = inference_service.predict(path.read_bytes()).json()
    _check_prediction(body, model="ensemble", source_format="PNG")
    assert set(body["members"]) == set(MODELS)
    # The ensemble: the members' calibrated probabilities, averaged and calibrated again, as fitted on val.
    from ctscan.calibration import Calibration
    from ctscan.storage.store import open_store

    record = open_store(inference_service.store_dir).ensemble_record()
    assert record is not None
    member_probabilities = [m["probability_covid"] for m in body["members"].values()]
    expected = float(Calibration.from_dict(record.calibration).apply(float(np.mean(member_probabilities))))
    assert body["probability_covid"] == pytest.approx(expected, abs=1e-6)
    assert body["threshold"] == pytest.approx(record.threshold)
    assert body["disagreement"] == (len({m["label"] for m in body["members"].values()}) > 1)
    assert body["model_version"] == ",".join(f"{n}={m['version']}" for n, m in body["members"].items())
    # Each member's answer matches the same model asked alone (batching changes nothing).
    for name, member in body["members"].items():
        alone = inference_service.predict(path.read_bytes(), params={"model": name}).json()
        assert alone["probability_covid"] == pytest.approx(member["probability_covid"], abs=1e-5)


def test_model_can_be_given_as_form_field(inference_service: RunningService,
                                          real_ct_images: dict[str, Path]) -> None:
    path = _first(real_ct_images, "png")
    body = inference_service.predict(path.read_bytes(), data={"model": "mobilenetv2", "explain": "false"}).json()
    assert body["model"] == "mobilenetv2" and body["heatmap_png_base64"] is None


@pytest.mark.parametrize("model", ["mobilenetv2", "ensemble"])
def test_gradcam_heatmap_is_drawn_over_the_original_slice(inference_service: RunningService,
                                                         real_ct_images: dict[str, Path], model: str) -> None:
    path = _first(real_ct_images, "png")
    original = decode_image(path.read_bytes()).grey  # each model's map is placed where its crop lies
    response = inference_service.predict(path.read_bytes(), params={"model": model, "explain": "true"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["timings_ms"]["gradcam"] is not None
    heatmap = Image.open(io.BytesIO(base64.b64decode(body["heatmap_png_base64"])))
    assert heatmap.format == "PNG" and heatmap.mode == "RGB"
    assert heatmap.width / heatmap.height == pytest.approx(original.shape[1] / original.shape[0], rel=0.02)
    expected = sorted(body["members"]) if model == "ensemble" else [model]
    assert sorted(body["heatmap_members"]) == expected  # the answer says whose maps it combines
    # Drawn over the uploaded slice itself: where no colour is laid on, the pixels are the slice's.
    pixels = np.asarray(heatmap, dtype=np.int16)
    plain = (pixels[..., 0] == pixels[..., 1]) & (pixels[..., 1] == pixels[..., 2])
    resized = np.asarray(Image.fromarray(original).resize(heatmap.size, Image.Resampling.BILINEAR), dtype=np.int16)
    assert plain.any() and np.abs(pixels[..., 0][plain] - resized[plain]).mean() < 3
    if model == "ensemble":
        # An overlay, not the bare slice: colour appears where a greyscale CT has none. (A single
        # tiny fixture model's map may be all zero: no region pushed it towards COVID-19, and then
        # nothing is coloured.)
        assert np.abs(pixels[..., 0] - pixels[..., 2]).max() > 20


def _dicom_bytes(*, with_pixels: bool = True, rows: int = 64, columns: int = 64) -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset("slice.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.SOPClassUID = CTImageStorage
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.PatientName = "Doe^Jane"
    dataset.PatientID = "SECRET-PATIENT-4711"
    dataset.Modality = "CT"
    if with_pixels:
        y, x = np.mgrid[0:rows, 0:columns]
        lungs = ((x - columns * 0.3) ** 2 + (y - rows / 2) ** 2) < (rows / 5) ** 2
        # Scanner noise (about 15 HU): a real slice has many grey levels, not two.
        noise = np.random.default_rng(0).normal(0, 15, (rows, columns))
        hounsfield = (np.where(lungs, -850, 40) + noise).round().astype(np.int16)
        dataset.Rows, dataset.Columns = rows, columns
        dataset.SamplesPerPixel = 1
        dataset.PhotometricInterpretation = "MONOCHROME2"
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 16, 15
        dataset.PixelRepresentation = 1
        dataset.RescaleSlope, dataset.RescaleIntercept = 1, -1024
        dataset.PixelData = (hounsfield + 1024).astype(np.int16).tobytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_dicom_is_windowed_and_patient_data_never_leaks(inference_service: RunningService) -> None:
    dicom = _dicom_bytes()
    response = inference_service.predict(dicom, filename="slice.dcm", params={"model": "ensemble", "explain": "true"})
    assert response.status_code == 200, response.text
    body = response.json()
    _check_prediction(body, model="ensemble", source_format="DICOM")
    assert "SECRET-PATIENT-4711" not in response.text and "Doe" not in response.text
    assert "SECRET-PATIENT-4711" not in inference_service.log()
    no_pixels = inference_service.predict(_dicom_bytes(with_pixels=False), filename="empty.dcm")
    assert no_pixels.status_code == 422
    assert no_pixels.json()["error"]["code"] == "undecodable_image"
    assert "pixel data" in no_pixels.json()["error"]["message"]


def test_unknown_model_is_400(inference_service: RunningService, real_ct_images: dict[str, Path]) -> None:
    path = _first(real_ct_images, "png")
    response = inference_service.predict(path.read_bytes(), params={"model": "resnet50"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "unknown_model" and "mobilenetv2" in error["message"]


def test_upload_over_the_limit_is_413(inference_service: RunningService) -> None:
    # The fixture's limit is 2 MB; a 3 MB PNG-looking upload is refused before decoding.
    response = inference_service.predict(b"\x89PNG\r\n\x1a\n" + b"\0" * (3 * 1024 * 1024))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "upload_too_large"


def test_missing_file_is_422_json(inference_service: RunningService) -> None:
    import requests

    response = requests.post(inference_service.url + "/predict", data={"model": "ensemble"}, timeout=30,
                             headers=inference_service.headers)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"
    assert "file" in response.json()["error"]["message"]


def test_unknown_route_is_json_404(inference_service: RunningService) -> None:
    response = inference_service.get("/nope")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_metrics_count_requests_batches_and_versions(inference_service: RunningService,
                                                     real_ct_images: dict[str, Path]) -> None:
    path = _first(real_ct_images, "png")
    assert inference_service.predict(path.read_bytes(), params={"model": "densenet121"}).status_code == 200
    assert inference_service.predict(path.read_bytes(), params={"model": "bogus"}).status_code == 400
    text = inference_service.get("/metrics").text
    assert 'inference_requests_total{action="predict",model="densenet121",status="200"}' in text
    assert 'inference_requests_total{action="predict",model="invalid",status="400"}' in text
    assert 'inference_batch_size_count{model="densenet121"}' in text
    assert 'inference_request_seconds_bucket{action="predict",le="0.5",model="densenet121",status="200"}' in text
    versions = {e["name"]: e["version"] for e in inference_service.get("/models").json()["models"]}
    served = f'backend="onnxruntime",model="mobilenetv2",version="{versions["mobilenetv2"]}"'
    assert f"inference_model_version_info{{{served}}} 1.0" in text


def test_concurrent_requests_are_batched(inference_service: RunningService,
                                         real_ct_images: dict[str, Path]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    path = _first(real_ct_images, "png")
    content = path.read_bytes()
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(
            lambda _: inference_service.predict(content, params={"model": "mobilenetv2"}), range(24)))
    assert all(r.status_code == 200 for r in responses)
    probabilities = {round(r.json()["probability_covid"], 5) for r in responses}
    assert len(probabilities) == 1  # same image, same answer whatever batch it landed in
    text = inference_service.get("/metrics").text
    counts = {}
    for line in text.splitlines():
        if line.startswith('inference_batch_size_count{model="mobilenetv2"}'):
            counts["batches"] = float(line.split()[-1])
        if line.startswith('inference_batch_size_sum{model="mobilenetv2"}'):
            counts["images"] = float(line.split()[-1])
    assert counts["images"] > counts["batches"]  # at least one forward pass held several images


def test_request_ids_are_minted_and_the_clients_is_echoed_beside(inference_service: RunningService,
                                                                  real_ct_images: dict[str, Path]) -> None:
    # The service always names a request with its own id; the caller's comes back beside it
    # (X-Client-Request-ID), so a reused or forged id never stands for two requests.
    content = _first(real_ct_images, "png").read_bytes()
    url = inference_service.url + "/predict"
    ok = requests.post(url, params={"model": "mobilenetv2"}, files={"file": ("a.png", content)},
                       headers={"X-Request-ID": "ward-7.scan-42", **inference_service.headers}, timeout=60)
    assert ok.status_code == 200 and ok.headers["X-Client-Request-ID"] == "ward-7.scan-42"
    minted = ok.headers["X-Request-ID"]
    assert minted != "ward-7.scan-42" and len(minted) == 32 and ok.json()["request_id"] == minted
    unknown = requests.post(url, params={"model": "bogus"}, files={"file": ("a.png", content)},
                            headers={"X-Request-ID": "bad id with spaces", **inference_service.headers}, timeout=60)
    generated = unknown.headers["X-Request-ID"]
    assert unknown.status_code == 400 and len(generated) == 32 and "X-Client-Request-ID" not in unknown.headers
    missing_file = requests.post(url, headers={"X-Request-ID": "no-file-1", **inference_service.headers}, timeout=60)
    assert missing_file.status_code == 422 and missing_file.headers["X-Client-Request-ID"] == "no-file-1"


def test_broken_uploads_in_a_crowd_get_422_and_the_rest_their_answers(inference_service: RunningService,
                                                                       real_ct_images: dict[str, Path]) -> None:
    # Requests announce themselves to the batchers before decoding; broken ones withdraw
    # (tests/inference/test_batching.py times that), the others are batched together.
    from concurrent.futures import ThreadPoolExecutor

    good = _first(real_ct_images, "png").read_bytes()
    broken = good[: len(good) // 3]
    uploads = [good if i % 2 else broken for i in range(24)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda data: inference_service.predict(data, params={"model": "ensemble"}),
                                uploads))
    assert [a.status_code for a in answers] == [200 if i % 2 else 422 for i in range(24)]
    probabilities = {round(a.json()["probability_covid"], 5) for a in answers if a.status_code == 200}
    assert len(probabilities) == 1  # the same slice gets the same answer whatever batch it joined
    assert inference_service.get("/readyz").status_code == 200
