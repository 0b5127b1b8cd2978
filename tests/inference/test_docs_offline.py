"""/docs (Swagger UI) and /redoc work offline: headless Chromium, with every request to another
origin refused as on a hospital network without internet, renders both pages of the real
service from its own files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from harness import CHROMIUM_ARGS, chromium_executable

from inference.conftest import RunningService


@pytest.fixture(scope="module")
def offline_page(inference_service: RunningService) -> Any:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_executable(), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.elsewhere = []  # type: ignore[attr-defined]

        def route(request_route: Any) -> None:
            url = request_route.request.url
            if url.startswith(inference_service.url + "/") or url.startswith(("data:", "blob:")):
                request_route.continue_()
            else:  # the internet is not there
                page.elsewhere.append(url)  # type: ignore[attr-defined]
                request_route.abort()

        page.route("**/*", route)
        yield page
        context.close()
        browser.close()


def test_swagger_ui_renders_the_api_from_local_files(offline_page: Any, inference_service: RunningService,
                                                     artifacts_dir: Path) -> None:
    offline_page.goto(inference_service.url + "/docs")
    offline_page.wait_for_selector(".opblock-summary-path[data-path='/predict']")
    paths = offline_page.locator(".opblock-summary-path").all_inner_texts()
    assert {"/predict", "/models", "/readyz"} <= {path.strip() for path in paths}
    offline_page.screenshot(path=str(artifacts_dir / "inference-docs-offline.png"))
    assert offline_page.elsewhere == []


def test_redoc_renders_the_api_from_local_files(offline_page: Any, inference_service: RunningService) -> None:
    offline_page.goto(inference_service.url + "/redoc")
    offline_page.wait_for_selector("text=/predict")
    assert "ctscan inference" in offline_page.inner_text("body")
    assert offline_page.elsewhere == []


def test_the_docs_assets_are_served_by_the_service(inference_service: RunningService) -> None:
    for name in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
        answer = inference_service.get(f"/docs-static/{name}")
        assert answer.status_code == 200 and len(answer.content) > 10_000, name
    for path in ("/docs", "/redoc"):
        page = inference_service.get(path)
        assert "cdn.jsdelivr.net" not in page.text and "fonts.googleapis.com" not in page.text
        # Whatever the viewers' own code links to, the browser may load only from here.
        assert "default-src 'self'" in page.headers["Content-Security-Policy"]
