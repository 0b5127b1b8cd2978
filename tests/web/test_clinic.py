"""The clinicians' page through Flask's test client: upload, result, refusals, outages."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from ctscan import DISCLAIMER
from services.web.app import create_app

from .conftest import WEB_API_KEY, ContractServer, clinician_client, csrf_token, tiny_png

TRACEBACK_MARKERS = ("Traceback", 'File "', "requests.exceptions", "urllib3")


def client_for(settings: Any) -> FlaskClient:
    """The page, with a clinician logged in through the login form."""
    return clinician_client(create_app(settings))


def post_image(client: FlaskClient, data: bytes, *, filename: str = "scan.png", model: str = "ensemble",
               explain: bool = True, token: str | None = None) -> Any:
    if token is None:
        token = csrf_token(client.get("/").get_data(as_text=True))
    form: dict[str, Any] = {"csrf_token": token, "model": model, "file": (io.BytesIO(data), filename)}
    if explain:
        form["explain"] = "y"
    return client.post("/predict", data=form, content_type="multipart/form-data")


def assert_friendly(html: str) -> None:
    for marker in TRACEBACK_MARKERS:
        assert marker not in html


def test_index_offers_upload_models_and_disclaimer(make_settings: Callable[..., Any]) -> None:
    response = client_for(make_settings()).get("/")
    html = response.get_data(as_text=True)
    assert response.status_code == 200
    assert 'enctype="multipart/form-data"' in html and 'type="file"' in html
    for model in ("ensemble", "inceptionv3", "densenet121", "mobilenetv2"):
        assert f'value="{model}"' in html
    assert DISCLAIMER in html
    assert response.headers["Cache-Control"] == "no-store"
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]


def test_healthz_needs_no_login(make_settings: Callable[..., Any]) -> None:
    response = create_app(make_settings()).test_client().get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_result_shows_label_members_versions_timing_images(make_settings: Callable[..., Any],
                                                           contract_server: ContractServer) -> None:
    client = client_for(make_settings(inference_url=contract_server.url))
    image = tiny_png()
    response = post_image(client, image, filename="Doe_John_1970.png")
    html = response.get_data(as_text=True)
    assert response.status_code == 200
    # The models disagree: no call is made, and the page says so in plain words.
    assert "Indeterminate: review by a radiologist" in html and "the ensemble&#39;s models disagree" in html
    assert 'id="probability">62%' in html and 'id="threshold">50%' in html and 'id="band">40–60%' in html
    assert "Confidence" not in html  # the confusing v1 number is gone from the page
    assert "calibrated on the validation data" in html
    for version in ("v-inc", "v-dense", "v-mob"):
        assert version in html
    # Each bar takes its model's own label: two members and the ensemble say COVID, one not.
    assert html.count("bar-fill-positive") == 3 and html.count("bar-fill-negative") == 1
    assert "The models disagree" in html
    assert "101 ms" in html and "req-123" in html
    assert DISCLAIMER in html
    assert re.search(r'<img src="data:image/png;base64,[^"]+" alt="Grad-CAM heatmap[^"]*" id="heatmap-image">', html)
    # The upload is shown back inline from memory, never from a stored file.
    assert re.search(r'<img src="data:image/png;base64,[^"]+" alt="The uploaded CT slice"', html)
    # The file name may carry a patient's name: never shown nor sent on.
    assert "Doe_John" not in html
    assert b"Doe_John" not in contract_server.requests_seen[0]["body"]
    assert contract_server.requests_seen[0]["query"] == {"model": "ensemble", "explain": "true"}


def test_single_model_without_heatmap(make_settings: Callable[..., Any], contract_server: ContractServer) -> None:
    client = client_for(make_settings(inference_url=contract_server.url))
    html = post_image(client, tiny_png(), model="mobilenetv2", explain=False).get_data(as_text=True)
    assert contract_server.requests_seen[0]["query"] == {"model": "mobilenetv2", "explain": "false"}
    assert "MobileNetV2" in html and "v-single" in html
    assert "The models disagree" not in html
    assert "Findings consistent with COVID-19 pneumonia" in html


def test_a_refused_image_shows_why_and_no_numbers(make_settings: Callable[..., Any],
                                                  contract_server: ContractServer) -> None:
    contract_server.mode = "refused"
    client = client_for(make_settings(inference_url=contract_server.url))
    response = post_image(client, tiny_png())
    html = response.get_data(as_text=True)
    assert response.status_code == 200
    assert "Not analysed: this does not look like an axial chest CT slice" in html
    assert "far from the chest CT slices" in html
    assert 'id="probability"' not in html and 'id="models-table"' not in html
    assert "No heatmap: the slice was not classified" in html
    assert DISCLAIMER in html


def test_real_dicom_is_forwarded_and_previewed_without_header(
        make_settings: Callable[..., Any], contract_server: ContractServer, tmp_path: Path) -> None:
    import numpy as np
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.2")
    meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset = FileDataset(str(tmp_path / "slice.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.PatientName = "Roe^Richard"
    dataset.Rows, dataset.Columns = 32, 32
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 16, 15
    dataset.PixelRepresentation, dataset.SamplesPerPixel = 1, 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.RescaleSlope, dataset.RescaleIntercept = 1, -1024
    dataset.PixelData = np.full((32, 32), 400, dtype=np.int16).tobytes()
    dataset.save_as(tmp_path / "slice.dcm", enforce_file_format=True)
    data = (tmp_path / "slice.dcm").read_bytes()

    client = client_for(make_settings(inference_url=contract_server.url))
    html = post_image(client, data, filename="slice.dcm").get_data(as_text=True)
    assert contract_server.requests_seen[0]["body"].count(b"Roe^Richard") == 1  # forwarded as is
    assert b'filename="upload.dcm"' in contract_server.requests_seen[0]["body"]
    assert "Roe" not in html  # no patient data on the page
    assert "DICOM, lung window" in html
    assert html.count('src="data:image/png;base64,') == 2  # rendered preview and heatmap


def test_unsupported_file_is_refused_before_inference(make_settings: Callable[..., Any],
                                                      contract_server: ContractServer) -> None:
    client = client_for(make_settings(inference_url=contract_server.url))
    response = post_image(client, b"%PDF-1.7 not an image", filename="report.pdf")
    assert response.status_code == 415
    assert "This file type is not supported" in response.get_data(as_text=True)
    assert contract_server.requests_seen == []


def test_oversized_file_gets_a_friendly_message(make_settings: Callable[..., Any],
                                                contract_server: ContractServer) -> None:
    client = client_for(make_settings(inference_url=contract_server.url, max_upload_mb=0.01))
    token = csrf_token(client.get("/").get_data(as_text=True))
    response = post_image(client, tiny_png() + b"\0" * 20_000, token=token)
    html = response.get_data(as_text=True)
    assert response.status_code == 413
    assert "larger than the 0.01 MB limit" in html
    assert contract_server.requests_seen == []
    assert_friendly(html)


def test_missing_file_asks_for_one(make_settings: Callable[..., Any]) -> None:
    client = client_for(make_settings())
    token = csrf_token(client.get("/").get_data(as_text=True))
    response = client.post("/predict", data={"csrf_token": token, "model": "ensemble"},
                           content_type="multipart/form-data")
    assert response.status_code == 400
    assert "Please choose a CT image" in response.get_data(as_text=True)


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_predict_without_valid_csrf_token_is_refused(make_settings: Callable[..., Any],
                                                     contract_server: ContractServer, token: str | None) -> None:
    client = client_for(make_settings(inference_url=contract_server.url))
    client.get("/")
    form: dict[str, Any] = {"model": "ensemble", "file": (io.BytesIO(tiny_png()), "scan.png")}
    if token:
        form["csrf_token"] = token
    response = client.post("/predict", data=form, content_type="multipart/form-data")
    assert response.status_code == 400
    assert "security token" in response.get_data(as_text=True)
    assert contract_server.requests_seen == []


def test_inference_down_gives_a_friendly_message(make_settings: Callable[..., Any],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    client = client_for(make_settings(inference_connect_timeout_s=0.5))  # nothing listens there
    with caplog.at_level(logging.INFO, logger="ctscan.web"):
        response = post_image(client, tiny_png(), filename="Doe_John.png")
    html = response.get_data(as_text=True)
    assert response.status_code == 503
    assert "The analysis service cannot be reached right now" in html
    assert DISCLAIMER in html
    assert_friendly(html)
    assert "Doe_John" not in caplog.text


def test_inference_slow_gives_a_friendly_message(make_settings: Callable[..., Any],
                                                 contract_server: ContractServer) -> None:
    contract_server.mode, contract_server.delay_s = "slow", 2.0
    client = client_for(make_settings(inference_url=contract_server.url, inference_read_timeout_s=0.5))
    response = post_image(client, tiny_png())
    html = response.get_data(as_text=True)
    assert response.status_code == 504
    assert "taking too long" in html
    assert_friendly(html)


@pytest.mark.parametrize(("mode", "status", "text"), [
    ("reject415", 415, "could not be read as a CT image"),
    ("reject413", 413, "too large for the analysis service"),
    ("notready", 503, "starting up or not ready"),
    ("error500", 502, "had a problem with this request"),
    ("garbage", 502, "could not be read"),
])
def test_inference_refusals_are_explained(make_settings: Callable[..., Any], contract_server: ContractServer,
                                          mode: str, status: int, text: str) -> None:
    contract_server.mode = mode
    client = client_for(make_settings(inference_url=contract_server.url, inference_retries=0))
    response = post_image(client, tiny_png())
    html = response.get_data(as_text=True)
    assert response.status_code == status
    assert text in html
    assert_friendly(html)


def test_get_predict_returns_to_the_upload_page(make_settings: Callable[..., Any]) -> None:
    response = client_for(make_settings()).get("/predict")
    assert response.status_code == 302 and response.headers["Location"] == "/"


def test_unknown_page_is_friendly(make_settings: Callable[..., Any]) -> None:
    response = client_for(make_settings()).get("/no-such-page")
    assert response.status_code == 404
    assert "There is no page at this address" in response.get_data(as_text=True)


def test_unexpected_error_never_shows_a_traceback(make_settings: Callable[..., Any]) -> None:
    app = create_app(make_settings())

    def broken(**_: Any) -> Any:
        raise RuntimeError("secret internals")

    app.extensions["ctscan_web"].inference.predict = broken
    client = clinician_client(app)
    response = post_image(client, tiny_png())
    html = response.get_data(as_text=True)
    assert response.status_code == 500
    assert "Something went wrong" in html and "secret internals" not in html
    assert_friendly(html)


def test_real_inference_service_answers_a_real_ct_image(make_settings: Callable[..., Any],
                                                       inference_service: Any, tiny_model_store: Path,
                                                       real_ct_images: dict[str, Path]) -> None:
    # The page registers its key in the store the service reads; the service checks it.
    client = client_for(make_settings(inference_url=inference_service.url, inference_read_timeout_s=120,
                                      model_store=str(tiny_model_store), inference_api_key=WEB_API_KEY))
    image = real_ct_images["covid_png"] if "covid_png" in real_ct_images else next(iter(real_ct_images.values()))
    response = post_image(client, image.read_bytes(), filename=image.name)
    html = response.get_data(as_text=True)
    from ctscan.decision import OUTCOME_TEXT

    assert response.status_code == 200, html[-2000:]
    assert any(text in html for text in OUTCOME_TEXT.values())
    assert 'id="heatmap-image"' in html
    assert DISCLAIMER in html


def test_while_the_ensemble_is_off_the_page_says_so_and_offers_the_single_models(
        make_settings: Callable[..., Any], contract_server: ContractServer) -> None:
    contract_server.mode = "ensemble_off"
    client = client_for(make_settings(inference_url=contract_server.url, inference_retries=0))
    response = post_image(client, tiny_png(), model="ensemble")
    html = response.get_data(as_text=True)
    assert response.status_code == 503
    assert "switched off for now" in html and "Trying again will not help" in html
    assert "starting up" not in html  # not the words for a service that is still loading
    offered = re.search(r'<p id="single-models">(.*?)</p>', html, re.S)
    assert offered and all(label in offered.group(1) for label in ("InceptionV3", "DenseNet-121", "MobileNetV2"))
    assert re.search(r'<option selected value="mobilenetv2">|<option value="mobilenetv2" selected>', html)
    assert_friendly(html)


def test_result_names_the_calibrated_ensemble_and_each_models_threshold(
        make_settings: Callable[..., Any], contract_server: ContractServer) -> None:
    client = client_for(make_settings(inference_url=contract_server.url))
    html = post_image(client, tiny_png()).get_data(as_text=True)
    row = re.search(r'<tr class="total-row" id="ensemble-row">(.*?)</tr>', html, re.S)
    assert row and "Calibrated ensemble" in row.group(1) and "Ensemble (mean)" not in html
    sides = re.findall(r'<td class="side" data-threshold="([0-9.]+)">(.*?)</td>', html, re.S)
    assert len(sides) == 4  # three models and the ensemble, each with its own threshold shown
    for threshold, words in sides:
        assert f"threshold {float(threshold) * 100:.0f}%" in words
    caption = re.search(r'<figcaption id="heatmap-caption">(.*?)</figcaption>', html, re.S)
    assert caption and "Grad-CAM of InceptionV3, DenseNet-121, MobileNetV2 (their mean)" in caption.group(1)
