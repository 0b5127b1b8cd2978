"""The compose stack as a person uses it: every image built here, every service in its
container (MinIO and Redis stand-ins where no registry is reachable), real CT slices, headless
Chromium. The tests run in file order; the last one stops the services."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from ctscan import DISCLAIMER

from .conftest import Stack

MODELS = ("inceptionv3", "densenet121", "mobilenetv2")
JOB_TIMEOUT_S = 1500  # one epoch at 64 px on two shared CPU cores, plus the data set download


def slice_image(real_ct_images: dict[str, Path]) -> Path:
    return real_ct_images.get("covid_png") or next(iter(real_ct_images.values()))


def test_predict_a_real_slice_with_each_model(stack: Stack, real_ct_images: dict[str, Path]) -> None:
    key = {"X-API-Key": stack.api_key}
    assert requests.get(stack.inference_url + "/models", timeout=30).status_code == 401  # no key
    production = {entry["name"]: entry["version"] for entry in
                  requests.get(stack.inference_url + "/models", timeout=30, headers=key).json()["models"]}
    assert set(MODELS) <= set(production)
    image = slice_image(real_ct_images)
    for model in ("ensemble", *MODELS):
        answer = requests.post(stack.inference_url + "/predict", params={"model": model}, timeout=180, headers=key,
                               files={"file": (image.name, image.read_bytes(), "image/png")})
        assert answer.status_code == 200, f"{model}: {answer.text}"
        body = answer.json()
        assert body["model"] == model
        assert body["label"] in ("COVID", "non-COVID")
        assert 0.0 <= body["probability_covid"] <= 1.0
        assert body["disclaimer"] == DISCLAIMER
        if model == "ensemble":
            assert {name: member["version"] for name, member in body["members"].items()} == \
                {name: production[name] for name in MODELS}
        else:
            assert body["model_version"] == production[model]


def test_api_docs_work_offline(stack: Stack, browser: Any, stack_artifacts: Path) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    elsewhere: list[str] = []

    def route(request_route: Any) -> None:
        if request_route.request.url.startswith(stack.inference_url + "/"):
            request_route.continue_()
        else:
            elsewhere.append(request_route.request.url)
            request_route.abort()

    page.route("**/*", route)
    try:
        page.goto(stack.inference_url + "/docs")
        page.wait_for_selector(".opblock-summary-path[data-path='/predict']")
        page.screenshot(path=str(stack_artifacts / "inference-docs.png"))
        page.goto(stack.inference_url + "/redoc")
        page.wait_for_selector("text=/predict")
    finally:
        context.close()
    assert elsewhere == []


@pytest.mark.parametrize("width", [1280, 390])
def test_the_page_in_chromium(stack: Stack, browser: Any, real_ct_images: dict[str, Path], stack_artifacts: Path,
                              width: int) -> None:
    context = browser.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    page.set_default_timeout(180_000)
    errors: list[str] = []
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))
    try:
        page.goto(stack.web_url + "/")  # the login page first
        page.fill("#username", "admin")
        page.fill("#password", stack.admin_password)
        page.click("button[type=submit]")
        page.wait_for_selector("#file")
        assert page.get_by_role("note", name="Intended use").is_visible()
        page.set_input_files("#file", str(slice_image(real_ct_images)))
        page.select_option("#model", "ensemble")
        page.click("#analyse-button")
        page.wait_for_selector("#verdict")
        from ctscan.decision import OUTCOME_TEXT, REFUSALS

        # A real chest slice: classified (covid, non_covid or indeterminate), never refused.
        assert page.inner_text("#verdict").strip() in {t for o, t in OUTCOME_TEXT.items() if o not in REFUSALS}
        assert page.locator("#models-table tbody tr").count() == 4
        assert page.eval_on_selector("#heatmap-image", "img => img.complete && img.naturalWidth > 0")
        assert DISCLAIMER in page.inner_text("#result-disclaimer")
        # Nothing wider than the screen: no sideways scrolling on a phone.
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        page.screenshot(path=str(stack_artifacts / f"web-result-{width}.png"), full_page=True)
        assert errors == []
    finally:
        context.close()


def _metrics(text: str) -> dict[str, str]:
    return dict(re.findall(r"\b(AUC|acc|F1)\s+([0-9.]+)", text))


@pytest.mark.timeout(JOB_TIMEOUT_S + 300)
def test_admin_queues_a_job_that_the_trainer_container_finishes(stack: Stack, browser: Any,
                                                                 stack_artifacts: Path) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(120_000)
    try:
        page.goto(stack.web_url + "/admin")
        page.fill("#username", "admin")
        page.fill("#password", "not-the-password")
        page.click("button[type=submit]")
        assert "not correct" in page.inner_text("main")
        page.fill("#username", "admin")
        page.fill("#password", stack.admin_password)
        page.click("button[type=submit]")
        page.wait_for_selector("#queue-form")

        # Right after `up`: the seed job published the data set, and the defaults work here.
        version = page.input_value("#job-dataset_version")
        assert version, "no published dataset version is offered"
        assert page.inner_text("#dataset-versions-note").startswith("1 published")
        assert page.input_value("#job-model") == "mobilenetv2"
        assert page.input_value("#job-init") == "none"
        assert int(page.input_value("#job-input_size")) <= 64
        page.fill("#job-epochs", "1")
        page.click("#queue-form button[type=submit]")
        page.wait_for_selector(".alert-success")
        message = page.inner_text(".alert-success")
        assert message.startswith("Queued job "), message
        job_id = message.split()[2]

        # The console polls its jobs table while a job is queued or running.
        row = f'tr[data-job-id="{job_id}"]'
        page.wait_for_selector(f"{row} .badge-succeeded, {row} .badge-failed, {row} .badge-cancelled",
                               timeout=JOB_TIMEOUT_S * 1000)
        assert page.inner_text(f"{row} .badge").strip() == "succeeded", page.inner_text(row)
        page.reload()  # the model table is drawn with the page; only the jobs table polls
        page.wait_for_selector(f"#model-mobilenetv2 code:text-is('{job_id}')")
        page.screenshot(path=str(stack_artifacts / "admin-console-after-job.png"), full_page=True)

        row_text = page.inner_text(row)
        assert f"{job_id}" in row_text and "1/1" in row_text
        # One set of metrics per run: the job row and the model table agree.
        version_row = page.locator(f'#model-mobilenetv2 tr:has(code:text-is("{job_id}"))')
        cells = version_row.locator("td").all_inner_texts()
        table = {"acc": cells[4].strip(), "F1": cells[7].strip(), "AUC": cells[8].strip()}
        assert _metrics(page.inner_text(f"{row} .result-metrics")) == table
        if not page.locator(f"{row} .badge-succeeded:text-is('promoted')").count():
            note = page.inner_text(f"{row} .promotion-note")
            # The gate's own reason: below a floor, or not better than production on the same val set.
            assert re.match(rf"Not promoted: (val AUC {table['AUC']} is below the promotion floor [0-9.]+|"
                            r"val balanced accuracy [0-9.]+ is below the promotion floor [0-9.]+|"
                            r"val auc [0-9.]+ does not beat production \S+ \([0-9.]+\) on the same validation set)",
                            note), note
    finally:
        context.close()

    # The trainer container did the work and the model is in MinIO (S3), not on a local disk.
    listing = stack.s3("ls", "--recursive", f"local/{stack.bucket}/models/mobilenetv2/{job_id}/")
    assert "card.json" in listing and "SHA256SUMS" in listing
    record = stack.s3("cat", f"local/{stack.bucket}/models/.jobs/{job_id}/job.json")
    # The worker is named by its container's host name and its process (host:pid).
    assert f'"worker": "{stack.inspect("trainer", "{{.Config.Hostname}}")}:' in record
    # The admin's login and job are in the audit trail on the shared volume.
    trail = stack.engine_run("exec", stack.containers["web"], "sh", "-c", "cat /data/audit/*/*.jsonl").stdout
    assert '"action":"job_queue"' in trail and '"actor":"admin"' in trail, trail[-2000:]


@pytest.mark.parametrize("service", ["web", "inference", "trainer"])
def test_each_service_stops_by_itself_on_sigterm(stack: Stack, service: str, stack_artifacts: Path) -> None:
    grace_s = 60  # the trainer's stop_grace_period; a busy machine slows a worker's warm shutdown
    started = time.monotonic()
    stack.engine_run("stop", "--time", str(grace_s), stack.containers[service], timeout=grace_s + 60)
    elapsed = time.monotonic() - started
    exit_code = int(stack.inspect(service, "{{.State.ExitCode}}"))
    with (stack_artifacts / "stop-times.txt").open("a") as record:
        record.write(f"{service}: exit {exit_code} after {elapsed:.1f} s\n")
    # A process that ignored SIGTERM is killed when the grace period ends: exit 137.
    assert exit_code == 0, f"{service} exited with {exit_code} after {elapsed:.1f} s"
    assert elapsed < grace_s, f"{service} took {elapsed:.1f} s to stop"
