"""The study page: several slices or one ZIP in, one verdict, a strip along the body, the top slices."""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from ctscan import DISCLAIMER

from .conftest import WEB_API_KEY, ContractServer, csrf_token
from .test_clinic import assert_friendly, client_for


def post_study(client: FlaskClient, files: list[tuple[bytes, str]], *, model: str = "ensemble",
               explain: bool = True) -> Any:
    token = csrf_token(client.get("/study").get_data(as_text=True))
    form: dict[str, Any] = {"csrf_token": token, "model": model,
                            "files": [(io.BytesIO(data), name) for data, name in files]}
    if explain:
        form["explain"] = "y"
    return client.post("/study", data=form, content_type="multipart/form-data")


def test_the_study_page_offers_the_form(make_settings: Callable[..., Any]) -> None:
    html = client_for(make_settings()).get("/study").get_data(as_text=True)
    assert 'id="study-form"' in html and 'multiple' in html and ".zip" in html
    assert DISCLAIMER in html


def test_a_study_shows_its_verdict_the_strip_and_the_top_slices(make_settings: Callable[..., Any],
                                                                contract_server: ContractServer) -> None:
    client = client_for(make_settings(inference_url=contract_server.url))
    files = [(b"\0" * 128 + b"DICM" + bytes(100 + i), f"Doe_Jane_{i}.dcm") for i in range(6)]
    response = post_study(client, files)
    html = response.get_data(as_text=True)
    assert response.status_code == 200, html[-1500:]
    assert "Findings consistent with COVID-19 pneumonia" in html
    assert 'id="probability">77%' in html and 'id="slice-count">4 / 6' in html
    assert "2 no lungs visible" in html and "mean of its 3 most suspicious" in html
    # One bar per slice, coloured by outcome; the threshold line across.
    assert len(re.findall(r'<rect class="strip-bar strip-', html)) == 6
    assert html.count("strip-skipped") == 2 and html.count("strip-covid") == 2
    assert 'class="strip-threshold"' in html
    assert html.count('class="top-slice-image"') == 1 and "Heatmap not requested" in html
    assert len(re.findall(r"<tr><th scope=\"row\">\d+</th>", html)) == 6
    # Every file was forwarded as a `file` part, in order, without the user's file names.
    sent = contract_server.requests_seen[0]
    assert sent["path"].startswith("/predict/study") and sent["query"] == {"model": "ensemble", "explain": "true"}
    assert sent["body"].count(b'name="file"') == 6 and b"Doe_Jane" not in sent["body"]
    assert "Doe_Jane" not in html


def test_a_refused_study_says_why(make_settings: Callable[..., Any], contract_server: ContractServer) -> None:
    contract_server.mode = "reject415"
    client = client_for(make_settings(inference_url=contract_server.url))
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("a.dcm", b"x")
    html = post_study(client, [(archive.getvalue(), "series.zip")]).get_data(as_text=True)
    assert "The study could not be analysed" in html and "cannot decode image" in html
    assert_friendly(html)


def test_no_files_get_a_plain_message(make_settings: Callable[..., Any]) -> None:
    client = client_for(make_settings())
    token = csrf_token(client.get("/study").get_data(as_text=True))
    response = client.post("/study", data={"csrf_token": token, "model": "ensemble"},
                           content_type="multipart/form-data")
    assert response.status_code == 400
    assert "Please choose the slices of one series" in response.get_data(as_text=True)


@pytest.mark.slow
def test_a_real_ct_md_study_through_the_real_service(make_settings: Callable[..., Any], inference_service: Any,
                                                      tiny_model_store: Path, ctmd_dir: Path,
                                                      ctmd_slices: dict) -> None:
    client = client_for(make_settings(inference_url=inference_service.url, inference_read_timeout_s=300,
                                      model_store=str(tiny_model_store), inference_api_key=WEB_API_KEY))
    rows = ctmd_slices["P001"][::3]
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as handle:
        for index, row in enumerate(rows):
            handle.writestr(f"IM{index:03d}", (ctmd_dir / row["path"]).read_bytes())
    response = post_study(client, [(archive.getvalue(), "P001.zip")], model="mobilenetv2")
    html = response.get_data(as_text=True)
    assert response.status_code == 200, html[-1500:]
    assert re.search(r'id="slice-count">\d+ / ' + str(len(rows)), html)
    assert len(re.findall(r'<rect class="strip-bar strip-', html)) == len(rows)
    assert "strip-skipped" in html  # the abdomen and neck ends show no lungs
    assert 'class="top-slice-image"' in html
