"""Starting and stopping the real services the tests talk to: a free port, a subprocess in
its own process group, readiness polled over HTTP, and a stop that never leaves orphans."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServiceProcess:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self, tail: int | None = None) -> str:
        text = self.log_path.read_text(errors="replace")
        return text if tail is None else text[-tail:]


def start_service_process(args: list[str], *, env: dict[str, str], log_path: Path, ready_path: str,
                          timeout_s: float) -> ServiceProcess:
    """Run `args --host 127.0.0.1 --port P` and wait until GET ready_path answers 200."""
    port = free_port()
    with log_path.open("wb") as log:  # the child keeps its own descriptor
        process = subprocess.Popen([*args, "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=REPO_ROOT,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    service = ServiceProcess(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stop_service_process(service)
            pytest.fail(f"{args} exited with {process.returncode}:\n{service.log(4000)}")
        try:
            if requests.get(service.url + ready_path, timeout=5).status_code == 200:
                return service
        except requests.RequestException:
            pass
        time.sleep(0.5)
    stop_service_process(service)
    pytest.fail(f"{args} not ready after {timeout_s:.0f} s:\n{service.log(4000)}")


def stop_service_process(service: ServiceProcess, *, grace_s: float = 30) -> None:
    """SIGTERM the whole process group, SIGKILL it if it does not leave in time."""
    if service.process.poll() is None:
        os.killpg(service.process.pid, signal.SIGTERM)
        try:
            service.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(service.process.pid, signal.SIGKILL)
            service.process.wait(timeout=10)


@contextlib.contextmanager
def serve_app_in_thread(app: Any) -> Iterator[str]:
    """Serve an ASGI app (lifespan included) over real HTTP on a free port from this process;
    yields its base URL. For apps a test builds itself (registered extensions)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, name="test-server", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the in-process server did not start")
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
# Headless Chromium (Debian's package) as the browser tests drive it through Playwright.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_executable() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        pytest.fail("Debian's chromium is missing: apt-get install -y chromium")
    return path


# --- uploads must never reach the disk ----------------------------------------------------------
class TempFileWatch:
    """Notes every temporary file opened in this process while on (an audit hook sees every
    `open`, including the O_TMPFILE ones `tempfile.TemporaryFile` makes)."""

    def __init__(self) -> None:
        self.on = False
        self.opened: list[str] = []
        self.tempdir = os.path.realpath(tempfile.gettempdir())

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.on:
            return
        if event.startswith("tempfile."):
            self.opened.append(f"{event} {args!r}")
        elif event == "open" and isinstance(args[0], str):
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            if flags & getattr(os, "O_TMPFILE", 0) or os.path.realpath(args[0]).startswith(self.tempdir + "/tmp"):
                self.opened.append(f"open {args[0]}")


_WATCH = TempFileWatch()
sys.addaudithook(_WATCH.hook)  # hooks cannot be removed: this one is idle unless switched on


@pytest.fixture()
def temp_file_watch() -> Iterator[TempFileWatch]:
    _WATCH.opened.clear()
    _WATCH.on = True
    try:
        yield _WATCH
    finally:
        _WATCH.on = False
