"""Screenshots of the clinicians' page for the README: an indeterminate result, a refused
(non-CT) upload and a whole CT-MD study. Starts its own inference and web services on free
ports against a model store (default: the shipped release in models/).

    .venv/bin/python scripts/screenshots.py --out docs/images \
        --data ../shared/data/ucsd-covid-ct --ctmd ../shared/data/covid-ct-md-sample
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CTSCAN = str(Path(sys.executable).with_name("ctscan"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
SCREENSHOT_USER = "dr.example"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"{url} not ready after {timeout_s:.0f} s")


def find_indeterminate(api: str, images: list[Path], model: str) -> Path:
    """The first test image the service calls indeterminate (the screenshot shows that case)."""
    import requests

    for image in images:
        answer = requests.post(f"{api}/predict", params={"model": model}, timeout=120,
                               files={"file": (image.name, image.read_bytes())})
        if answer.ok and answer.json()["outcome"] == "indeterminate":
            return image
    raise SystemExit("no indeterminate answer among the images tried")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=str(REPO_ROOT / "models"))
    parser.add_argument("--data", required=True)
    parser.add_argument("--ctmd", required=True)
    parser.add_argument("--model", default="ensemble")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "images")
    args = parser.parse_args()

    import numpy as np
    import skimage.data
    from PIL import Image
    from playwright.sync_api import sync_playwright

    from ctscan.data.dataset import CTDataset

    work = Path(tempfile.mkdtemp(prefix="ctscan-shots-"))
    api_port, web_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WEB_", "INFERENCE_", "CTSCAN_"))}
    # Nothing is written into the store (by default the shipped release): no API key and no
    # account are registered there. The services listen on 127.0.0.1 only, the inference
    # service without keys, and the page in proxy mode with the browser sending the header an
    # authenticating proxy would, so the pages show a clinician logged in as people see them.
    env |= {"CTSCAN_MODEL_STORE": args.store, "TF_CPP_MIN_LOG_LEVEL": "2",
            "WEB_SECRET_KEY": secrets.token_hex(32), "WEB_AUTH": "proxy", "INFERENCE_AUTH": "off",
            "CTSCAN_AUDIT_DIR": str(work / "audit"),
            "CTSCAN_ADMIN_TOKEN": secrets.token_urlsafe(24), "INFERENCE_URL": f"http://127.0.0.1:{api_port}"}
    processes = [
        subprocess.Popen([CTSCAN, "serve", "inference", "--host", "127.0.0.1", "--port", str(api_port)], env=env,
                         stdout=(work / "inference.log").open("wb"), stderr=subprocess.STDOUT),
        subprocess.Popen([CTSCAN, "serve", "web", "--host", "127.0.0.1", "--port", str(web_port)], env=env,
                         stdout=(work / "web.log").open("wb"), stderr=subprocess.STDOUT),
    ]
    try:
        api, web = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{web_port}"
        wait_ready(api + "/readyz")
        wait_ready(web + "/healthz")
        borderline = find_indeterminate(api, [s.path for s in CTDataset(args.data).split("test")], args.model)
        photo = work / "astronaut.png"
        Image.fromarray(np.asarray(skimage.data.astronaut())).save(photo)
        study = work / "P001.zip"
        with zipfile.ZipFile(study, "w") as archive:
            for path in sorted((Path(args.ctmd) / "P001").glob("*.dcm")):
                archive.write(path, f"P001/{path.name}")
        args.out.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 900},
                                    extra_http_headers={"X-Forwarded-User": SCREENSHOT_USER})
            page.set_default_timeout(600_000)
            for upload, name in ((borderline, "page-indeterminate.png"), (photo, "page-refused.png")):
                page.goto(web + "/")
                page.set_input_files("#file", str(upload))
                page.select_option("#model", args.model)
                page.click("#analyse-button")
                page.wait_for_selector("#verdict")
                page.screenshot(path=str(args.out / name), full_page=True)
                print(f"{name}: {upload.name}: {page.inner_text('#verdict').strip()}")
            page.goto(web + "/study")
            page.set_input_files("#files", str(study))
            page.select_option("#study-model", args.model)
            page.click("#study-button")
            page.wait_for_selector("#verdict")
            page.screenshot(path=str(args.out / "page-study.png"), full_page=True)
            print(f"page-study.png: P001: {page.inner_text('#verdict').strip()}")
            browser.close()
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
