"""What the images install: the project as a wheel (not the source tree), each service with its
own extra. The web page is rendered from a wheel installed with only the `web` extra into a
fresh virtual environment outside the repository, so missing package data (templates, static
files) or a web import that needs TensorFlow fails here, not first in a container."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from harness import free_port

from ctscan import DISCLAIMER

from .conftest import REPO_ROOT

ML_PACKAGES = ("tensorflow", "keras", "onnxruntime", "onnx", "tf2onnx")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")  # the machine's; CI starts one
ADMIN_PASSWORD = "wheel-test-admin-password"
INSTALL_TIMEOUT_S = 900
WheelWeb = tuple[str, subprocess.Popen[bytes], Path]  # URL, process, log file


def run(argv: list[str], *, cwd: Path, timeout: float = INSTALL_TIMEOUT_S) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{' '.join(argv)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@dataclass
class WebVenv:
    root: Path
    wheel: Path

    @property
    def bin(self) -> Path:
        return self.root / "venv" / "bin"


@pytest.fixture(scope="module")
def web_venv(tmp_path_factory: pytest.TempPathFactory) -> WebVenv:
    root = tmp_path_factory.mktemp("wheel")
    # The build context of the Dockerfiles: only these travel (see .dockerignore).
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, source / name)
    for name in ("ctscan", "services"):
        shutil.copytree(REPO_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(root / "dist"),
         str(source)], cwd=root)
    wheel = next((root / "dist").glob("ctscan-*.whl"))
    run([sys.executable, "-m", "venv", str(root / "venv")], cwd=root)
    run([str(root / "venv" / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
         "--constraint", str(REPO_ROOT / "requirements.lock"), f"{wheel}[web]"], cwd=root)
    return WebVenv(root, wheel)


@pytest.fixture(scope="module")
def private_queue() -> Iterator[str]:
    """A queue of our own on the machine's Redis (no worker consumes it), removed afterwards."""
    import redis

    name = f"wheel-test-{secrets.token_hex(4)}"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(name, f"_kombu.binding.{name}")


@pytest.fixture(scope="module")
def wheel_web(web_venv: WebVenv, data_dir: Path, private_queue: str,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[WheelWeb]:
    """`ctscan serve web` from the wheel's virtual environment, started outside the repository,
    with the real data set published so that the console can queue a job."""
    from ctscan.access.admin_credential import AdminVerifier
    from ctscan.data.versions import publish_once

    workdir = tmp_path_factory.mktemp("wheel-web")
    publish_once(data_dir, str(workdir / "datasets"), "ucsd-covid-ct")
    # Set-up writes the admin verifier (`ctscan admin init`): without it the console refuses to queue.
    AdminVerifier.for_store(str(workdir / "store")).init("wheel-test-trainer-token")
    port = free_port()
    env = {"PATH": f"{web_venv.bin}:/usr/bin:/bin", "HOME": str(workdir), "PYTHONUNBUFFERED": "1",
           "WEB_SECRET_KEY": "wheel-test-secret-key-0123456789", "WEB_ADMIN_PASSWORD": ADMIN_PASSWORD,
           "CTSCAN_ADMIN_TOKEN": "wheel-test-trainer-token", "INFERENCE_URL": f"http://127.0.0.1:{free_port()}",
           "CTSCAN_MODEL_STORE": str(workdir / "store"), "CTSCAN_DATASETS_URL": str(workdir / "datasets"),
           "REDIS_URL": REDIS_URL, "CTSCAN_TRAINER_QUEUE": private_queue,
           "CTSCAN_TRAINER_WORK_DIR": str(workdir / "trainer")}
    log_path = workdir / "web.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([str(web_venv.bin / "ctscan"), "serve", "web", "--host", "127.0.0.1", "--port",
                                    str(port)], cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, f"the web service exited with {process.returncode}:\n{log_path.read_text()}"
        try:
            if requests.get(url + "/healthz", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, f"the web service did not answer:\n{log_path.read_text()}"
        time.sleep(0.5)
    yield url, process, log_path
    if process.poll() is None:
        process.kill()
        process.wait(timeout=30)


@pytest.mark.slow
def test_the_web_extra_installs_no_machine_learning_stack(web_venv: WebVenv) -> None:
    found = run([str(web_venv.bin / "python"), "-c",
                 "import importlib.util as u, sys; "
                 f"print([n for n in {ML_PACKAGES!r} if u.find_spec(n)])"], cwd=web_venv.root)
    assert found.strip() == "[]"


@pytest.mark.slow
def test_the_page_renders_from_the_installed_wheel(wheel_web: WheelWeb,
                                                   web_venv: WebVenv) -> None:
    url, _, _ = wheel_web
    with requests.Session() as browser:
        assert browser.get(url + "/", timeout=30, allow_redirects=False).headers["Location"] == "/login?next=/"
        page = log_in_as_admin(browser, url, next_page="/")
    assert page.status_code == 200, page.text[-2000:]
    assert 'id="predict-form"' in page.text and DISCLAIMER in page.text
    stylesheet = re.search(r'href="(/static/style\.css[^"]*)"', page.text)
    assert stylesheet, "no stylesheet link"
    css = requests.get(url + stylesheet.group(1), timeout=30)
    assert css.status_code == 200 and ".verdict" in css.text
    assert requests.get(url + "/static/app.js", timeout=30).status_code == 200
    # Served from the installed package, not from a source tree.
    location = run([str(web_venv.bin / "python"), "-c", "import services.web, sys; print(services.web.__file__)"],
                   cwd=web_venv.root)
    assert "site-packages" in location and not location.startswith(str(REPO_ROOT))


def csrf_token(html: str) -> str:
    token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', html)
    assert token, html[-2000:]
    return token.group(1)


def log_in_as_admin(browser: requests.Session, url: str, *, next_page: str) -> requests.Response:
    """The built-in account "admin" (WEB_ADMIN_PASSWORD), through the login form."""
    login = browser.get(url + "/login", timeout=30)
    return browser.post(url + "/login", timeout=30, data={
        "csrf_token": csrf_token(login.text), "username": "admin", "password": ADMIN_PASSWORD, "next": next_page})


@pytest.mark.slow
def test_the_admin_console_queues_a_job_without_tensorflow(wheel_web: WheelWeb, private_queue: str) -> None:
    import redis

    url, _, _ = wheel_web
    with requests.Session() as browser:
        answer = log_in_as_admin(browser, url, next_page="/admin")
        assert answer.status_code == 200 and "Training console" in answer.text, answer.text[-2000:]
        # The trainer's JobsClient answered (no jobs yet), without TensorFlow in this environment.
        assert 'id="no-jobs"' in answer.text and 'id="queue-form"' in answer.text
        version = re.search(r'id="job-dataset_version"[^>]*value="([^"]+)"', answer.text)
        assert version, "the published dataset version is not offered"
        queued = browser.post(url + "/admin/jobs", timeout=120, data={
            "csrf_token": csrf_token(answer.text), "model": "mobilenetv2", "init": "none", "input_size": "64",
            "dataset": "ucsd-covid-ct", "dataset_version": version.group(1), "epochs": "1"})
    assert queued.status_code == 200
    message = re.search(r"Queued job (\S+) \(mobilenetv2, 1 epochs\)", queued.text)
    assert message, queued.text[-3000:]
    # The message is on the broker, for a worker to take (Celery's Redis transport).
    assert redis.Redis.from_url(REDIS_URL).llen(private_queue) == 1


@pytest.mark.slow
def test_sigterm_stops_the_web_service_cleanly(wheel_web: WheelWeb) -> None:
    _, process, log_path = wheel_web
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 0, log_path.read_text()
    assert "SIGTERM received: stopping the web service" in log_path.read_text()


@pytest.mark.slow  # starts a Python process
def test_the_web_imports_no_machine_learning_stack() -> None:
    """The web service's modules, the trainer client it queues jobs with, and the CLI parser
    that `ctscan serve web` goes through: none of them loads TensorFlow or ONNX."""
    code = (
        "import sys\n"
        "from ctscan.cli import build_parser; build_parser()\n"
        "import services.web.main, services.web.views, services.trainer.api, services.trainer.celery_app\n"
        f"print(sorted(n for n in {ML_PACKAGES!r} if n in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                          cwd=REPO_ROOT, env={**os.environ, "CTSCAN_TRAINER_QUEUE": "import-check"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
