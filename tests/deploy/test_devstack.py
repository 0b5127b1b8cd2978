"""`make up` (scripts/devstack.py): unit checks of its choices, and the end-to-end run:
start the whole stack in the background on free ports with a private var folder and its own
redis-server, send a real CT slice through the web page and through the API, stop it with
`down`, and check that no process is left behind."""

from __future__ import annotations

import html
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from harness import CHROMIUM_ARGS, chromium_executable, free_port

from ctscan import DISCLAIMER

from .conftest import REPO_ROOT

DEVSTACK = REPO_ROOT / "scripts" / "devstack.py"
START_TIMEOUT_S = 900


def load_devstack():
    import importlib.util

    spec = importlib.util.spec_from_file_location("devstack", DEVSTACK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_dev_secrets_are_generated_once_and_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    devstack = load_devstack()
    monkeypatch.setenv("DEVSTACK_VAR_DIR", str(tmp_path))
    layout = devstack.Layout.from_env()
    first = devstack.dev_secrets(layout, {"WEB_ADMIN_PASSWORD": "given-by-the-user"})
    assert first["WEB_ADMIN_PASSWORD"] == "given-by-the-user"
    assert len(first["WEB_SECRET_KEY"]) >= 32 and first["WEB_SECRET_KEY"] != first["CTSCAN_ADMIN_TOKEN"]
    assert (layout.secrets_file.stat().st_mode & 0o777) == 0o600
    assert "given-by-the-user" not in layout.secrets_file.read_text()
    assert devstack.dev_secrets(layout, {})["WEB_SECRET_KEY"] == first["WEB_SECRET_KEY"]  # reused


def test_the_cli_finds_the_running_stack_through_dev_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`make up` writes var/dev.env; `ctscan --env var/dev.env info` then names the stack's store,
    audit folder and queue (not the per-user defaults), and never prints the admin token."""
    import json

    from ctscan import cli, settings

    devstack = load_devstack()
    monkeypatch.setenv("DEVSTACK_VAR_DIR", str(tmp_path))
    for name in devstack.CLI_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    layout = devstack.Layout.from_env()
    stack = {"CTSCAN_MODEL_STORE": str(tmp_path / "model store"), "CTSCAN_AUDIT_DIR": str(tmp_path / "audit"),
             "CTSCAN_TRAINER_QUEUE": "ctscan-devstack-abc", "REDIS_URL": "redis://127.0.0.1:6379/1",
             "CTSCAN_ADMIN_TOKEN": "dev-admin-token-0123456789abcdef", "UNRELATED": "x"}
    path = devstack.write_cli_env(layout, stack)
    assert path == tmp_path / "dev.env" and (path.stat().st_mode & 0o777) == 0o600
    assert "UNRELATED" not in path.read_text()
    # The shell reads it as the CLI does.
    shell = subprocess.run(["bash", "-c", f". {path} && printf %s \"$CTSCAN_MODEL_STORE\""], capture_output=True,
                           text=True, check=True)
    assert shell.stdout == stack["CTSCAN_MODEL_STORE"]
    saved = dict(os.environ)
    try:
        assert cli.main(["--env", str(path), "info"]) == 0
    finally:
        os.environ.clear()
        os.environ.update(saved)
        settings.get_store_settings.cache_clear()
        settings.get_audit_settings.cache_clear()
        settings.get_trainer_settings.cache_clear()
        settings.get_admin_settings.cache_clear()
    output = capsys.readouterr().out
    info = json.loads(output)
    assert info["CTSCAN_MODEL_STORE"] == {"value": stack["CTSCAN_MODEL_STORE"], "from": f"--env {path}"}
    assert info["CTSCAN_AUDIT_DIR"]["value"] == stack["CTSCAN_AUDIT_DIR"]
    assert info["CTSCAN_TRAINER_QUEUE"]["value"] == "ctscan-devstack-abc"
    assert info["CTSCAN_ADMIN_TOKEN"]["value"] == "set" and stack["CTSCAN_ADMIN_TOKEN"] not in output


def test_broker_falls_back_to_the_filesystem_transport(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    devstack = load_devstack()
    monkeypatch.setenv("DEVSTACK_VAR_DIR", str(tmp_path))
    monkeypatch.setattr(devstack.shutil, "which", lambda name: None)  # no redis-server installed
    layout = devstack.Layout.from_env()
    broker = devstack.choose_broker(layout, {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert broker.kind == "filesystem" and broker.child is None
    assert broker.env["CELERY_BROKER_URL"] == "filesystem://"
    assert Path(broker.env["CTSCAN_BROKER_DIR"]).is_dir()


def test_the_machines_redis_is_used_in_a_database_and_queue_of_the_stacks_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    devstack = load_devstack()
    monkeypatch.setenv("DEVSTACK_VAR_DIR", str(tmp_path))
    asked: list[str] = []
    monkeypatch.setattr(devstack, "redis_answers", lambda url, timeout_s=1.0: asked.append(url) or True)
    layout = devstack.Layout.from_env()
    broker = devstack.choose_broker(layout, {})
    assert asked == ["redis://127.0.0.1:6379/1"] and broker.kind == "redis"
    assert broker.env["REDIS_URL"] == "redis://127.0.0.1:6379/1"  # not database 0, which everyone shares
    queue = broker.env["CTSCAN_TRAINER_QUEUE"]
    assert queue.startswith("ctscan-devstack-") and queue != "training"
    other = devstack.Layout(var_dir=tmp_path / "other", host="127.0.0.1", inference_port=1, web_port=2,
                            timeout_s=1)
    assert devstack.choose_broker(other, {}).env["CTSCAN_TRAINER_QUEUE"] != queue  # another checkout's
    # What the user chose stays.
    chosen = devstack.choose_broker(layout, {"REDIS_URL": "redis://127.0.0.1:6379/7", "CTSCAN_TRAINER_QUEUE": "mine"})
    assert chosen.env == {"REDIS_URL": "redis://127.0.0.1:6379/7", "CTSCAN_TRAINER_QUEUE": "mine"}


@pytest.mark.slow  # copies the shipped release and publishes the whole data set
def test_first_start_says_the_store_was_seeded_and_the_data_set_published(
        tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ctscan.data.versions import list_dataset_versions

    devstack = load_devstack()
    env = {**os.environ, "CTSCAN_MODEL_STORE": str(tmp_path / "store"), "CTSCAN_DATA_DIR": str(data_dir),
           "CTSCAN_DATASETS_URL": str(tmp_path / "datasets")}
    devstack.seed_store(env)
    devstack.publish_dataset(env)
    first = capsys.readouterr().out
    devstack.seed_store(env)
    devstack.publish_dataset(env)
    second = capsys.readouterr().out
    versions = list_dataset_versions(str(tmp_path / "datasets"), "ucsd-covid-ct")
    assert len(versions) == 1
    assert "seeded with the shipped release" in first and f"version {versions[0]} published" in first
    assert "holds the shipped release (3 model version(s))" in second
    assert f"version {versions[0]} already published" in second
    assert "copied 0" not in first + second


@pytest.mark.slow  # starts a Python process
def test_down_without_a_stack_says_so(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(DEVSTACK), "down"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DEVSTACK_VAR_DIR": str(tmp_path)}, check=False)
    assert done.returncode == 0 and "no stack running" in done.stdout


def devstack_secret(var_dir: Path, name: str) -> str:
    for line in (var_dir / "dev-secrets.env").read_text().splitlines():
        if line.startswith(name + "="):
            return line.split("=", 1)[1]
    raise AssertionError(f"{name} not in {var_dir / 'dev-secrets.env'}")


def csrf_token(page: str) -> str:
    match = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page) or re.search(
        r'value="([^"]+)"[^>]*name="csrf_token"', page)
    assert match, "no CSRF token on the upload form"
    return match.group(1)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


JOB_TIMEOUT_S = 900  # one epoch at the console's default input size on two shared cores


def queue_a_job_with_the_console_defaults(web_url: str, password: str) -> tuple[str, str]:
    """Log in, queue a one-epoch job with the form as it comes, wait for it: (job id, its row)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_executable(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(120_000)
            page.goto(web_url + "/admin")  # asks for a login first
            page.fill("#username", "admin")
            page.fill("#password", password)
            page.click("button[type=submit]")
            page.wait_for_selector("#queue-form")
            assert page.input_value("#job-dataset_version"), "no published dataset version is offered"
            page.fill("#job-epochs", "1")
            page.click("#queue-form button[type=submit]")
            page.wait_for_selector(".alert-success, .alert-error")
            message = page.inner_text(".alert-success, .alert-error")
            assert message.startswith("Queued job "), message
            job_id = message.split()[2]
            row = f'tr[data-job-id="{job_id}"]'
            # The page polls its jobs table while the job is queued or running.
            page.wait_for_selector(f"{row} .badge-succeeded, {row} .badge-failed, {row} .badge-cancelled",
                                   timeout=JOB_TIMEOUT_S * 1000)
            return job_id, page.inner_text(row)
        finally:
            browser.close()


@pytest.mark.slow
@pytest.mark.timeout(START_TIMEOUT_S + JOB_TIMEOUT_S + 300)
def test_make_up_serves_a_real_ct_image_and_stops_cleanly(
    tmp_path: Path, real_ct_images: dict[str, Path], data_dir: Path, request: pytest.FixtureRequest
) -> None:
    for service in ("inference", "web", "trainer"):
        if not (REPO_ROOT / "services" / service / "main.py").is_file():
            pytest.fail(f"services/{service}/main.py does not exist yet: the stack cannot start")
    var_dir = tmp_path / "var"
    inference_port, web_port, redis_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in (
        "WEB_SECRET_KEY", "WEB_ADMIN_PASSWORD", "CTSCAN_ADMIN_TOKEN", "CELERY_BROKER_URL", "WEB_INFERENCE_API_KEY",
        "DEVSTACK_API_KEY", "CTSCAN_AUDIT_DIR", "WEB_AUTH", "INFERENCE_AUTH")}
    env.update({
        "DEVSTACK_VAR_DIR": str(var_dir), "INFERENCE_PORT": str(inference_port), "WEB_PORT": str(web_port),
        # Nothing answers on this port, so devstack starts (and later stops) its own redis-server.
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "DEVSTACK_TIMEOUT": str(START_TIMEOUT_S),
        "CTSCAN_TRAINER_WORK_DIR": str(tmp_path / "trainer"),
        "CTSCAN_DATASETS_URL": str(tmp_path / "datasets"),
        "CTSCAN_DATA_DIR": str(data_dir),  # published for training jobs
    })
    release = REPO_ROOT / "models"
    if release.is_dir() and any(release.iterdir()):
        env["CTSCAN_MODEL_STORE"] = str(tmp_path / "model-store")  # seeded from the shipped release
    else:
        env["CTSCAN_MODEL_STORE"] = str(request.getfixturevalue("tiny_model_store"))
        env["CTSCAN_RELEASE_DIR"] = str(tmp_path / "no-release")
    output = (tmp_path / "devstack.out").open("wb")
    up = subprocess.Popen([sys.executable, str(DEVSTACK), "up"], cwd=REPO_ROOT, env=env, stdout=output,
                          stderr=subprocess.STDOUT, start_new_session=True)
    groups: dict[str, int] = {}
    try:
        deadline = time.monotonic() + START_TIMEOUT_S + 60
        log = ""
        while "devstack: ready:" not in log:
            log = (tmp_path / "devstack.out").read_text(errors="replace")
            assert up.poll() is None, f"devstack up exited with {up.returncode}:\n{log}"
            assert time.monotonic() < deadline, f"stack not ready in time:\n{log}"
            time.sleep(1)
        import json

        groups = json.loads((var_dir / "devstack.pid").read_text())["groups"]
        assert set(groups) == {"redis", "inference", "web", "worker"}
        assert (var_dir / "dev-secrets.env").is_file() and str(var_dir / "dev-secrets.env") in log

        image = real_ct_images.get("CT_COVID_png") or next(iter(real_ct_images.values()))
        data = image.read_bytes()

        # The API asks for a key; the stack's own is printed when it is ready.
        predict_url = f"http://127.0.0.1:{inference_port}/predict"
        refused = requests.post(predict_url, timeout=60, files={"file": (image.name, data)})
        assert refused.status_code == 401, refused.text
        key = devstack_secret(var_dir, "DEVSTACK_API_KEY")
        assert f"X-API-Key: {key}" in log
        answer = requests.post(predict_url, timeout=120, files={"file": (image.name, data)},
                               data={"model": "mobilenetv2"}, headers={"X-API-Key": key})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["label"] in ("COVID", "non-COVID")
        assert 0.0 <= body["probability_covid"] <= 1.0
        assert body["disclaimer"] == DISCLAIMER

        # The web page, as a browser sends the form (session cookie + CSRF token).
        password = devstack_secret(var_dir, "WEB_ADMIN_PASSWORD")
        assert password in log  # local mode prints the generated credentials
        with requests.Session() as browser:
            login = browser.get(f"http://127.0.0.1:{web_port}/", timeout=30)  # -> the login page
            assert login.status_code == 200 and "/login" in login.url
            browser.post(login.url, timeout=30, data={"csrf_token": csrf_token(login.text), "username": "admin",
                                                      "password": password})
            page = browser.get(f"http://127.0.0.1:{web_port}/", timeout=30)
            assert page.status_code == 200 and "/login" not in page.url
            result = browser.post(f"http://127.0.0.1:{web_port}/predict", timeout=180,
                                  data={"csrf_token": csrf_token(page.text), "model": "mobilenetv2"},
                                  files={"file": (image.name, data, "image/png")})
        assert result.status_code == 200, result.text[-2000:]
        text = html.unescape(result.text)
        from ctscan.decision import OUTCOME_TEXT

        verdict = re.search(r'id="verdict">\s*([^<]*?)\s*<', text)
        assert verdict, "no verdict on the result page"
        # The page words the outcome the API gave for the same image.
        assert verdict.group(1) == OUTCOME_TEXT[body["outcome"]]
        assert "Not a diagnosis." in text and DISCLAIMER in text

        # The console right after `make up`, no manual step: the local data set is published
        # and a job queued with the form's defaults is trained by the stack's own worker.
        assert re.search(r"devstack: dataset ucsd-covid-ct version \S+ published in ", log), log
        job_id, row = queue_a_job_with_the_console_defaults(f"http://127.0.0.1:{web_port}", password)
        assert job_id in row and "succeeded" in row and "mobilenetv2" in row and "init none" in row, row
        assert re.search(r"AUC [0-9.]+", row), row

        # The audit trail: the program's and the page's predictions, the admin's job.
        from ctscan.access.audit_trail import read_events

        events = list(read_events(var_dir / "audit"))
        who = {(e.service, e.action, e.actor) for e in events}
        # (The API names the person behind the page: the page's key passes who is signed in.)
        assert {("inference", "predict", "local"), ("web", "predict", "admin"), ("inference", "predict", "admin"),
                ("web", "job_queue", "admin")} <= who, who
    finally:
        down = subprocess.run([sys.executable, str(DEVSTACK), "down"], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=180, check=False)
        try:
            status = up.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            status = up.wait()
        output.close()
    assert down.returncode == 0, down.stdout + down.stderr
    assert status == 0, (tmp_path / "devstack.out").read_text()
    left = [name for name, pgid in groups.items() if group_alive(pgid)]
    assert not left, f"processes left behind: {left}"
    assert not group_alive(up.pid)
    assert not (var_dir / "devstack.pid").exists()
    with socket.socket() as sock:  # the stack's own redis-server is gone too
        assert sock.connect_ex(("127.0.0.1", redis_port)) != 0
