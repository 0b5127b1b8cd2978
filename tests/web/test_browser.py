"""The real pages in headless Chromium (Debian's package, driven by Playwright), against the
real web service (`ctscan serve web`) in front of the real inference service (API keys on).
People log in through the real login form first.

Screenshots land in test-artifacts/ for people to look at.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import CHROMIUM_ARGS

from ctscan import DISCLAIMER

from .conftest import ADMIN_PASSWORD, CLINICIAN, TRAINER_TOKEN, Service, trainer_settings_for

pytestmark = pytest.mark.timeout(900)


def log_in(page: Any, web_url: str, username: str = CLINICIAN[0], password: str = CLINICIAN[1],
           path: str = "/") -> None:
    """Ask for `path`, get sent to the login form, fill it in, land on `path`."""
    page.goto(web_url + path)
    assert "/login?next=" in page.url
    page.fill("#username", username)
    page.fill("#password", password)
    page.click("#login-button")
    page.wait_for_selector("#signed-in")
    assert page.url == web_url + path

@pytest.fixture(scope="module")
def browser(chromium_path: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.console_errors = []  # type: ignore[attr-defined]
    page.on("console", lambda message: message.type == "error" and page.console_errors.append(message.text))
    page.set_default_timeout(120_000)  # the tiny models answer fast, but the CPUs are shared
    yield page
    context.close()


def pick_image(real_ct_images: dict[str, Path]) -> Path:
    for key in ("covid_png", "covid_jpg", "non_covid_png", "non_covid_jpg"):
        if key in real_ct_images:
            return real_ct_images[key]
    return next(iter(real_ct_images.values()))


def image_loaded(page: Any, selector: str) -> bool:
    return bool(page.eval_on_selector(selector, "img => img.complete && img.naturalWidth > 0"))


def test_upload_a_real_ct_image_and_see_result_and_heatmap(page: Any, web_service: Service,
                                                           real_ct_images: dict[str, Path],
                                                           artifacts_dir: Path) -> None:
    log_in(page, web_service.url)
    assert page.get_by_role("note", name="Intended use").is_visible()
    assert CLINICIAN[0] in page.inner_text("#signed-in")
    assert page.locator("nav >> text=Admin console").count() == 0  # clinicians get no console link
    page.screenshot(path=str(artifacts_dir / "web-upload.png"), full_page=True)

    page.set_input_files("#file", str(pick_image(real_ct_images)))
    assert "Selected:" in page.inner_text("#file-chosen")
    page.select_option("#model", "ensemble")
    page.click("#analyse-button")
    page.wait_for_selector("#verdict")

    from ctscan.decision import OUTCOME_TEXT

    verdict = page.inner_text("#verdict")
    assert verdict.strip() in OUTCOME_TEXT.values()
    assert image_loaded(page, "#preview-image") and image_loaded(page, "#heatmap-image")
    rows = page.locator("#models-table tbody tr")
    assert rows.count() == 4  # three members and the ensemble
    for name in ("InceptionV3", "DenseNet-121", "MobileNetV2"):
        assert name in page.inner_text("#models-table")
    assert page.locator("#agreement, #disagreement").count() == 1
    # In a clinician's words: the ensemble row says what it is; each side is read against a threshold shown.
    ensemble_row = page.inner_text("#ensemble-row")
    assert ensemble_row.startswith("Calibrated ensemble") or ensemble_row.startswith("Ensemble (mean, not calibrated)")
    sides = page.locator("#models-table td.side")
    assert sides.count() == 4
    for index in range(4):
        threshold = float(sides.nth(index).get_attribute("data-threshold"))
        assert f"threshold {threshold * 100:.0f}%" in sides.nth(index).inner_text()
    caption = page.inner_text("#heatmap-caption")
    assert all(name in caption for name in ("InceptionV3", "DenseNet-121", "MobileNetV2"))
    assert page.inner_text("#timing").strip().split()[0].isdigit()
    assert DISCLAIMER in page.inner_text("#result-disclaimer")
    assert page.is_visible("#result-disclaimer")
    assert page.console_errors == []  # no CSP violations or script errors
    page.screenshot(path=str(artifacts_dir / "web-result.png"), full_page=True)


def test_the_result_fits_a_390_px_phone_screen(browser: Any, web_service: Service, real_ct_images: dict[str, Path],
                                               artifacts_dir: Path) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=1)
    try:
        page = context.new_page()
        page.set_default_timeout(120_000)
        log_in(page, web_service.url)
        page.set_input_files("#file", str(pick_image(real_ct_images)))
        page.select_option("#model", "ensemble")
        page.click("#analyse-button")
        page.wait_for_selector("#verdict")
        # No sideways scrolling: nothing on the page is wider than the screen, the request id
        # and the per-model table included.
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        for selector in ("#details", "#models-table", "#verdict", "#heatmap-image"):
            box = page.locator(selector).bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, selector
        # The answer is on the screen after "Analyse image", not below the form.
        verdict = page.evaluate("(() => { const r = document.getElementById('verdict').getBoundingClientRect();"
                                " return [r.top, r.bottom]; })()")
        assert 0 <= verdict[0] and verdict[1] <= 844, verdict
        # No clipped table: nothing inside it is cut off by its scroll box, every cell within the screen.
        assert page.evaluate("(() => { const t = document.getElementById('models-table');"
                             " return t.scrollWidth <= t.parentElement.clientWidth; })()")
        cells = page.locator("#models-table tbody th, #models-table tbody td:visible")
        for index in range(cells.count()):
            box = cells.nth(index).bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, cells.nth(index).inner_text()
        assert page.locator("#models-table td.side").nth(0).is_visible()
        page.screenshot(path=str(artifacts_dir / "web-result-390.png"), full_page=True)
    finally:
        context.close()


def test_drag_and_drop_upload(page: Any, web_service: Service, real_ct_images: dict[str, Path]) -> None:
    image = pick_image(real_ct_images)
    log_in(page, web_service.url)
    payload = base64.b64encode(image.read_bytes()).decode()
    transfer = page.evaluate_handle(
        """([payload, name]) => {
            const bytes = Uint8Array.from(atob(payload), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: "image/png"}));
            return transfer;
        }""", [payload, image.name])
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": transfer})
    assert image.name in page.inner_text("#file-chosen")
    page.select_option("#model", "mobilenetv2")
    page.click("#analyse-button")
    page.wait_for_selector("#verdict")
    assert "MobileNetV2" in page.inner_text("#models-table")
    assert page.locator("#models-table tbody tr").count() == 1


def test_page_works_without_javascript(browser: Any, web_service: Service, real_ct_images: dict[str, Path],
                                       artifacts_dir: Path) -> None:
    context = browser.new_context(java_script_enabled=False, viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        page.set_default_timeout(120_000)
        log_in(page, web_service.url)  # a plain form post: no script needed
        page.set_input_files("#file", str(pick_image(real_ct_images)))
        page.select_option("#model", "densenet121")
        page.click("#analyse-button")
        page.wait_for_selector("#verdict")
        assert "DenseNet-121" in page.inner_text("#models-table")
        assert image_loaded(page, "#heatmap-image")
    finally:
        context.close()


def test_unsupported_file_message_in_the_browser(page: Any, web_service: Service, tmp_path: Path,
                                                 artifacts_dir: Path) -> None:
    document = tmp_path / "notes.txt"
    document.write_text("not an image")
    log_in(page, web_service.url)
    page.set_input_files("#file", str(document))
    page.click("#analyse-button")
    page.wait_for_selector("#error-message")
    assert "This file type is not supported" in page.inner_text("#error-message")
    page.screenshot(path=str(artifacts_dir / "web-unsupported.png"), full_page=True)


def test_admin_logs_in_and_queues_a_job(page: Any, web_service: Service, tiny_model_store: Path,
                                        published_datasets: tuple[str, str, str], trainer_queue: str,
                                        artifacts_dir: Path) -> None:
    from ctscan.storage.records import JobProgress
    from services.trainer.api import JobsClient

    page.goto(web_service.url + "/admin")
    assert page.url.endswith("/login?next=/admin")
    page.screenshot(path=str(artifacts_dir / "web-admin-login.png"), full_page=True)
    page.fill("#username", "admin")
    page.fill("#password", "wrong-password")
    page.click("#login-button")
    assert "That user name or password is not correct" in page.inner_text("#login-error")
    page.fill("#username", "admin")  # the built-in admin (WEB_ADMIN_PASSWORD)
    page.fill("#password", ADMIN_PASSWORD)
    page.click("#login-button")
    page.wait_for_selector("#queue-form")
    assert page.url == web_service.url + "/admin"
    assert "admin" in page.inner_text("#signed-in")
    assert page.locator("#model-mobilenetv2").is_visible()  # the tiny store's versions

    page.select_option("#job-model", "mobilenetv2")
    page.select_option("#job-init", "none")
    page.fill("#job-epochs", "2")
    page.click("#queue-form button[type=submit]")
    page.wait_for_selector(".alert-success")
    message = page.inner_text(".alert-success")
    assert message.startswith("Queued job ")
    job_id = message.split()[2]
    row = page.locator(f'tr[data-job-id="{job_id}"]')
    assert "queued" in row.inner_text()
    page.screenshot(path=str(artifacts_dir / "web-admin-console.png"), full_page=True)

    trainer = JobsClient.from_settings(trainer_settings_for(
        CTSCAN_MODEL_STORE=str(tiny_model_store), CTSCAN_DATASETS_URL=published_datasets[0],
        CTSCAN_ADMIN_TOKEN=TRAINER_TOKEN, CTSCAN_TRAINER_QUEUE=trainer_queue))
    job = trainer.get(job_id)
    assert (job.model, job.init, job.epochs, job.dataset_version) == ("mobilenetv2", "none", 2,
                                                                      published_datasets[2])

    row.get_by_role("button", name="Cancel").click()
    page.wait_for_selector(".alert-success")
    assert f"Job {job_id} is cancelled" in page.inner_text(".alert-success")
    assert trainer.get(job_id).state == "cancelled"

    # Live progress: a second job, whose worker reports an epoch, updates without a reload.
    page.fill("#job-epochs", "4")
    page.click("#queue-form button[type=submit]")
    page.wait_for_selector(".alert-success")
    second_id = page.inner_text(".alert-success").split()[2]
    assert second_id != job_id
    record = trainer.get(second_id)
    record.state = "running"
    record.progress = [JobProgress(epoch=1, total_epochs=4, loss=0.61, val_loss=0.66, val_auc=0.705,
                                   val_accuracy=0.6, seconds=12)]
    trainer.records.save(record)  # what the worker writes after its first epoch
    page.wait_for_selector(f'tr[data-job-id="{second_id}"] .badge-running', timeout=30_000)
    assert "1/4" in page.inner_text(f'tr[data-job-id="{second_id}"]')
    assert "val AUC 0.705" in page.inner_text(f'tr[data-job-id="{second_id}"]')
    page.screenshot(path=str(artifacts_dir / "web-admin-progress.png"), full_page=True)


def test_a_clinician_is_kept_out_of_the_console_and_logs_out(page: Any, web_service: Service) -> None:
    log_in(page, web_service.url)
    response = page.goto(web_service.url + "/admin")
    assert response.status == 403
    assert "Administrators only" in page.inner_text("main") and not page.locator("#queue-form").count()
    page.click("#logout-button")
    page.wait_for_selector("#login-form")
    assert "You have been logged out" in page.inner_text("main")
    page.goto(web_service.url + "/study")
    assert "/login?next=/study" in page.url  # the session is gone
