"""`make up` / `make down`: the whole system on one machine, no Docker.

    python scripts/devstack.py up       seed the model store, pick a broker, start inference,
                                        web and the trainer worker, wait until healthy, print
                                        the URLs, stay in the foreground; Ctrl-C stops all
    python scripts/devstack.py down     stop a stack started by `up` (from its pid file)
    python scripts/devstack.py status   say whether a stack is running

Broker, in order: a Redis already answering at REDIS_URL; else a `redis-server` started here
(when installed and REDIS_URL points at this machine), stopped with the stack; else the
embedded fallback, Celery's `filesystem://` transport in <var>/broker (no server at all; one
machine only, for trying things out). Without REDIS_URL the stack uses database
DEVSTACK_REDIS_DB (default 1) of the machine's Redis, never database 0 that other programs
share, and a queue named after this checkout's var folder.

The local data set (CTSCAN_DATA_DIR) is published once as a dataset version, so the admin
console can queue a training job at once.

Environment (all optional):
    DEVSTACK_VAR_DIR     folder for logs, pid file, dev secrets, broker files (default var/)
    DEVSTACK_HOST        interface to listen on (default 127.0.0.1)
    INFERENCE_PORT       default 8000          WEB_PORT       default 8080
    DEVSTACK_TIMEOUT     seconds to wait for the services to become healthy (default 900)
    REDIS_URL            default redis://127.0.0.1:6379/<DEVSTACK_REDIS_DB> (DEVSTACK_REDIS_DB default 1)
    CTSCAN_TRAINER_QUEUE default ctscan-devstack-<hash of the var folder>
    CTSCAN_DATA_DIR      the data set published for training jobs (default ../shared/data/ucsd-covid-ct)
    CTSCAN_DATASETS_URL  where it is published (default <var>/datasets)
    CTSCAN_MODEL_STORE   default <var>/model-store, seeded from models/ (CTSCAN_RELEASE_DIR)
    CTSCAN_DATASETS_URL, CTSCAN_TRAINER_WORK_DIR, CTSCAN_BROKER_DIR
                         default <var>/datasets, <var>/trainer, <var>/broker
    CTSCAN_DATA_DIR      real CT slices for the smoke predictions (`make up` passes DATA)
    WEB_SECRET_KEY, WEB_ADMIN_PASSWORD, CTSCAN_ADMIN_TOKEN, WEB_INFERENCE_API_KEY, DEVSTACK_API_KEY
                         generated into <var>/dev-secrets.env when not set (kept for reuse)
    CTSCAN_AUDIT_DIR     the audit trail (default <var>/audit)

Access control is on, as in production: the page asks for a login (account "admin", password
WEB_ADMIN_PASSWORD; more with `ctscan accounts create`) and the API for a key (the stack
registers DEVSTACK_API_KEY as key "local"; more with `ctscan keys create`). Both are printed
when the stack is ready.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
# WEB_INFERENCE_API_KEY is the page's key (the page registers it); DEVSTACK_API_KEY is
# registered as key "local" for programs and printed at start.
SECRET_NAMES = ("WEB_SECRET_KEY", "WEB_ADMIN_PASSWORD", "CTSCAN_ADMIN_TOKEN", "WEB_INFERENCE_API_KEY",
                "DEVSTACK_API_KEY")
# The machine's Redis database for `make up` when REDIS_URL is not given: not 0, which every
# program that does not choose one shares.
DEFAULT_REDIS_DB = 1
STOP_GRACE_S = 20.0


class DevstackError(Exception):
    """A start-up step failed; the message says which and what to do."""


def say(message: str) -> None:
    print(f"devstack: {message}", flush=True)


# --- configuration ------------------------------------------------------------------------
@dataclass
class Layout:
    var_dir: Path
    host: str
    inference_port: int
    web_port: int
    timeout_s: float

    @classmethod
    def from_env(cls) -> Layout:
        var_dir = Path(os.environ.get("DEVSTACK_VAR_DIR") or REPO_ROOT / "var").resolve()
        return cls(
            var_dir=var_dir,
            host=os.environ.get("DEVSTACK_HOST", "127.0.0.1"),
            inference_port=int(os.environ.get("INFERENCE_PORT", "8000")),
            web_port=int(os.environ.get("WEB_PORT", "8080")),
            timeout_s=float(os.environ.get("DEVSTACK_TIMEOUT", "900")),
        )

    @property
    def pid_file(self) -> Path:
        return self.var_dir / "devstack.pid"

    @property
    def logs(self) -> Path:
        return self.var_dir / "logs"

    @property
    def secrets_file(self) -> Path:
        return self.var_dir / "dev-secrets.env"

    @property
    def cli_env_file(self) -> Path:
        return self.var_dir / "dev.env"

    def url(self, port: int) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{port}"


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            name, sep, value = line.partition("=")
            if sep and not name.startswith("#"):
                values[name.strip()] = value.strip()
    return values


def dev_secrets(layout: Layout, env: dict[str, str]) -> dict[str, str]:
    """Secrets from the environment, else from <var>/dev-secrets.env, else new random ones
    (written there, mode 0600, so sessions and logins survive a restart)."""
    stored = read_env_file(layout.secrets_file)
    chosen = {}
    for name in SECRET_NAMES:
        chosen[name] = env.get(name) or stored.get(name) or secrets.token_urlsafe(32)
    missing = {name: chosen[name] for name in SECRET_NAMES if not env.get(name)}
    if any(stored.get(name) != value for name, value in missing.items()):
        layout.secrets_file.parent.mkdir(parents=True, exist_ok=True)
        stored.update(missing)
        text = "# Development secrets generated by scripts/devstack.py; never commit them.\n"
        text += "".join(f"{name}={value}\n" for name, value in stored.items())
        fd = os.open(layout.secrets_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        say(f"generated development secrets in {layout.secrets_file}")
    elif missing:
        say(f"development secrets from {layout.secrets_file}")
    return chosen


# What the command line needs to work against the running stack (`ctscan --env var/dev.env …`
# or `. var/dev.env`): the same store, audit folder, data, queue and admin token.
CLI_VARIABLES = ("CTSCAN_MODEL_STORE", "CTSCAN_DATASETS_URL", "CTSCAN_AUDIT_DIR", "CTSCAN_TRAINER_WORK_DIR",
                 "CTSCAN_BROKER_DIR", "CTSCAN_DATA_DIR", "REDIS_URL", "CELERY_BROKER_URL", "CTSCAN_TRAINER_QUEUE",
                 "INFERENCE_URL", "CTSCAN_ADMIN_TOKEN")


def write_cli_env(layout: Layout, env: dict[str, str]) -> Path:
    """<var>/dev.env: `export NAME='value'` lines, readable by the shell and by `ctscan --env`;
    owner-only, since it holds the admin token."""
    import shlex

    lines = ["# Written by `make up`: `. var/dev.env` or `ctscan --env var/dev.env …` points the CLI at this stack."]
    lines += [f"export {name}={shlex.quote(env[name])}" for name in CLI_VARIABLES if env.get(name)]
    path = layout.cli_env_file
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text("\n".join(lines) + "\n")
    return path


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host if host not in ("0.0.0.0", "") else "0.0.0.0", port))
        except OSError:
            return False
    return True


# --- child processes ----------------------------------------------------------------------
@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    log_start: int = 0  # where this run's lines begin in the (appended) log
    log_handle: IO[bytes] | None = field(default=None, repr=False)

    def start(self, env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_handle = self.log_path.open("ab")
        self.log_start = self.log_handle.tell()
        self.log_handle.write(f"\n=== devstack: starting {' '.join(self.argv)}\n".encode())
        self.log_handle.flush()
        # Own session and process group: stopping the group also stops the service's own
        # children (Celery's pool processes), and Ctrl-C in the terminal reaches only us.
        self.process = subprocess.Popen(self.argv, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                        stdout=self.log_handle, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(self.log_start)
                return handle.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_text().splitlines()
        return "\n".join("    " + line for line in text[-lines:]) or "    (empty log)"

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                say(f"{self.name} did not stop in {STOP_GRACE_S:.0f} s; killing it")
                signal_group(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        # Leftovers of the group (a pool process that outlived its parent) go too.
        wait_group_gone(self.process.pid, STOP_GRACE_S)
        if self.log_handle:
            self.log_handle.close()


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_group_gone(pgid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while group_alive(pgid):
        if time.monotonic() > deadline:
            signal_group(pgid, signal.SIGKILL)
            deadline = time.monotonic() + 5
        time.sleep(0.1)


def ctscan_argv(*args: str) -> list[str]:
    script = Path(sys.executable).parent / "ctscan"
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "ctscan.cli", *args]


# --- broker -------------------------------------------------------------------------------
def redis_answers(url: str, timeout_s: float = 1.0) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


@dataclass
class Broker:
    kind: str  # "redis" (already running), "redis-server" (started here), "filesystem"
    env: dict[str, str]
    child: Child | None = None


def stack_queue(layout: Layout) -> str:
    """A queue of this checkout's own, so two stacks on one Redis never take each other's jobs."""
    return "ctscan-devstack-" + hashlib.sha256(str(layout.var_dir).encode()).hexdigest()[:8]


def choose_broker(layout: Layout, env: dict[str, str]) -> Broker:
    redis_db = int(env.get("DEVSTACK_REDIS_DB") or DEFAULT_REDIS_DB)
    redis_url = env.get("REDIS_URL") or f"redis://127.0.0.1:6379/{redis_db}"
    queue = env.get("CTSCAN_TRAINER_QUEUE") or stack_queue(layout)
    if redis_answers(redis_url):
        say(f"broker: Redis answering at {redis_url}, queue {queue}")
        return Broker("redis", {"REDIS_URL": redis_url, "CTSCAN_TRAINER_QUEUE": queue})
    parsed = urlparse(redis_url)
    server = shutil.which("redis-server")
    if parsed.scheme == "redis" and (parsed.hostname or "127.0.0.1") in LOCAL_HOSTS and server:
        port = parsed.port or 6379
        data_dir = layout.var_dir / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)
        child = Child("redis", [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(data_dir)], layout.logs / "redis.log")
        child.start(env)
        deadline = time.monotonic() + 15
        while not redis_answers(redis_url):
            if not child.running() or time.monotonic() > deadline:
                child.stop()
                raise DevstackError(f"redis-server on port {port} did not start; log:\n{child.log_tail()}")
            time.sleep(0.2)
        say(f"broker: started redis-server at {redis_url} (log {child.log_path})")
        return Broker("redis-server", {"REDIS_URL": redis_url, "CTSCAN_TRAINER_QUEUE": queue}, child)
    folder = layout.var_dir / "broker"
    for sub in ("queue", "processed", "control"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    say(f"broker: no Redis at {redis_url} and no redis-server installed; using the embedded "
        f"filesystem:// broker in {folder} (one machine only)")
    return Broker("filesystem", {
        "CTSCAN_TRAINER_QUEUE": queue,
        "CELERY_BROKER_URL": "filesystem://",
        "CTSCAN_BROKER_DIR": str(folder),
        "CELERY_RESULT_BACKEND": f"file://{layout.var_dir / 'celery-results'}",
    })


# --- model store --------------------------------------------------------------------------
def seed_store(env: dict[str, str]) -> None:
    release = Path(env.get("CTSCAN_RELEASE_DIR") or REPO_ROOT / "models")
    store = env["CTSCAN_MODEL_STORE"]
    if release.is_dir():
        done = subprocess.run(ctscan_argv("models", "seed", "--release", str(release), "--store", store),
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            raise DevstackError(f"seeding {store} from {release} failed:\n{done.stderr.strip()}")
        result = json.loads(done.stdout or "{}")
        copied, kept = len(result.get("copied", [])), len(result.get("kept", []))
        if copied:
            say(f"model store {store}: seeded with the shipped release from {release} ({copied} model version(s))")
        else:
            say(f"model store {store}: holds the shipped release ({kept} model version(s))")
        return
    from ctscan.storage.store import open_store

    if not open_store(store).list_models():
        raise DevstackError(f"no release in {release} and no models in {store}: train one first "
                            f"(scripts/train_release.sh) or set CTSCAN_MODEL_STORE to a store with models")
    say(f"model store {store} (no release folder at {release}; using the store as it is)")


def init_admin_verifier(env: dict[str, str]) -> None:
    """The store's admin verifier from CTSCAN_ADMIN_TOKEN (`ctscan admin init`): without it
    every admin command is refused (ctscan.access.admin_credential)."""
    from ctscan.access.admin_credential import AdminCredentialError, AdminVerifier

    try:
        outcome = AdminVerifier.for_store(env["CTSCAN_MODEL_STORE"]).init(env["CTSCAN_ADMIN_TOKEN"])
    except AdminCredentialError as exc:
        raise DevstackError(f"the admin credential does not match this store: {exc}") from None
    say(f"admin verifier {outcome} (CTSCAN_ADMIN_TOKEN)")


# --- dataset ------------------------------------------------------------------------------
def register_local_key(env: dict[str, str]) -> None:
    """DEVSTACK_API_KEY becomes the store's key "local" (once; a revoked one is replaced)."""
    from ctscan.access.keys_and_accounts import AccessError, open_access

    access = open_access(env["CTSCAN_MODEL_STORE"])
    try:
        access.register_key("local", env["DEVSTACK_API_KEY"])
    except AccessError as exc:
        raise DevstackError(f"the local API key cannot be registered ({exc}); remove DEVSTACK_API_KEY from "
                            "the dev-secrets file to get a new one") from None
    say("API key \"local\" registered for programs (DEVSTACK_API_KEY)")


def publish_dataset(env: dict[str, str]) -> None:
    """Publish the local data set once, so the console's queue form has a version to offer."""
    from ctscan.data.versions import publish_once
    from ctscan.errors import CTScanError
    from ctscan.settings import get_core_settings

    data_dir = Path(env.get("CTSCAN_DATA_DIR") or get_core_settings().data_dir)
    datasets_url = env["CTSCAN_DATASETS_URL"]
    name = env.get("WEB_DEFAULT_DATASET") or "ucsd-covid-ct"
    if not (data_dir / "split.csv").is_file():
        say(f"no data set at {data_dir} (CTSCAN_DATA_DIR), so none is published: training jobs need "
            f"one (`ctscan data upload DIR {datasets_url}/{name}`)")
        return
    try:
        version, published = publish_once(data_dir, datasets_url, name)
    except CTScanError as exc:
        raise DevstackError(f"publishing the data set {data_dir} to {datasets_url} failed: {exc}") from None
    state = "published" if published else "already published"
    say(f"dataset {name} version {version} {state} in {datasets_url} (from {data_dir}); "
        "the admin console offers it for training jobs")


# --- health -------------------------------------------------------------------------------
def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError):
        return False


def worker_ready(child: Child) -> bool:
    # Celery logs "<node> ready." once it consumes; a ping also needs a broadcast-capable
    # broker, which the filesystem transport is not, so the log line is the common check.
    return " ready." in child.log_text()


def wait_healthy(children: dict[str, Child], checks: dict[str, Callable[[], bool]], timeout_s: float,
                 stopping: Callable[[], bool]) -> None:
    pending = dict(checks)
    deadline = time.monotonic() + timeout_s
    started = time.monotonic()
    last_note = started
    while pending:
        for name in list(pending):
            child = children[name]
            if not child.running():
                raise DevstackError(f"{name} exited with status {child.process.returncode} before it was "
                                    f"healthy; last lines of {child.log_path}:\n{child.log_tail()}")
            if pending[name]():
                say(f"{name} is healthy ({time.monotonic() - started:.0f} s)")
                del pending[name]
        if not pending:
            return
        if stopping():
            raise DevstackError("interrupted while starting")
        if time.monotonic() > deadline:
            name = min(pending)
            child = children[name]
            raise DevstackError(f"{name} not healthy after {timeout_s:.0f} s (DEVSTACK_TIMEOUT); last lines of "
                                f"{child.log_path}:\n{child.log_tail()}")
        if time.monotonic() - last_note > 30:
            say(f"waiting for {', '.join(sorted(pending))} ({time.monotonic() - started:.0f} s)")
            last_note = time.monotonic()
        time.sleep(0.5)


# --- up / down ----------------------------------------------------------------------------
def read_pid_file(layout: Layout) -> dict[str, Any] | None:
    try:
        return json.loads(layout.pid_file.read_text())
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not running
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def cmd_up(layout: Layout) -> int:
    record = read_pid_file(layout)
    if record and pid_alive(record["pid"]):
        say(f"a stack is already running (pid {record['pid']}); stop it with `make down`")
        return 1
    for name, port in (("inference", layout.inference_port), ("web", layout.web_port)):
        if not port_free(layout.host, port):
            say(f"port {port} for {name} is in use; set {name.upper()}_PORT to a free one")
            return 1

    stop_requested = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    layout.var_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # Everything the stack keeps lives in its var folder (the services' own defaults are the
    # per-user data folder, see ctscan/settings.py).
    env.setdefault("CTSCAN_MODEL_STORE", str(layout.var_dir / "model-store"))
    env.setdefault("CTSCAN_DATASETS_URL", str(layout.var_dir / "datasets"))
    env.setdefault("CTSCAN_TRAINER_WORK_DIR", str(layout.var_dir / "trainer"))
    env.setdefault("CTSCAN_BROKER_DIR", str(layout.var_dir / "broker"))
    env.setdefault("CTSCAN_AUDIT_DIR", str(layout.var_dir / "audit"))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(dev_secrets(layout, env))
    env["INFERENCE_URL"] = layout.url(layout.inference_port)

    children: dict[str, Child] = {}
    broker: Broker | None = None
    status = 0
    try:
        seed_store(env)
        init_admin_verifier(env)
        register_local_key(env)
        publish_dataset(env)
        broker = choose_broker(layout, env)
        env.update(broker.env)
        cli_env = write_cli_env(layout, env)
        if broker.child:
            children["redis"] = broker.child
        children["inference"] = Child("inference", ctscan_argv(
            "serve", "inference", "--host", layout.host, "--port", str(layout.inference_port)),
            layout.logs / "inference.log")
        children["web"] = Child("web", ctscan_argv(
            "serve", "web", "--host", layout.host, "--port", str(layout.web_port)), layout.logs / "web.log")
        children["worker"] = Child("worker", ctscan_argv("serve", "worker", "--concurrency", "1"),
                                   layout.logs / "worker.log")
        for name in ("inference", "web", "worker"):
            children[name].start(env)
        write_pid_file(layout, children)
        say(f"started inference, web and worker; logs in {layout.logs}")
        wait_healthy(children, {
            "inference": lambda: http_ok(layout.url(layout.inference_port) + "/readyz"),
            "web": lambda: http_ok(layout.url(layout.web_port) + "/healthz"),
            "worker": lambda: worker_ready(children["worker"]),
        }, layout.timeout_s, lambda: stop_requested)
        say("ready:")
        say(f"  web UI         {layout.url(layout.web_port)}/")
        say(f"  inference API  {layout.url(layout.inference_port)}/docs  (POST /predict, header "
            f"X-API-Key: {env['DEVSTACK_API_KEY']})")
        say(f"  admin console  {layout.url(layout.web_port)}/admin  (user admin, password "
            f"{env['WEB_ADMIN_PASSWORD']}; kept in {layout.secrets_file})")
        say(f"  audit trail    {env['CTSCAN_AUDIT_DIR']}  (ctscan audit-log)")
        say(f"  command line   `. {cli_env}` or `ctscan --env {cli_env} …` uses this stack's store, audit "
            "trail and queue (`ctscan info` shows which)")
        say("Ctrl-C (or `make down`) stops everything")
        while not stop_requested:
            dead = [name for name, child in children.items() if not child.running()]
            if dead:
                name = dead[0]
                raise DevstackError(f"{name} stopped unexpectedly (status {children[name].process.returncode}); "
                                    f"last lines of {children[name].log_path}:\n{children[name].log_tail()}")
            time.sleep(0.5)
        say("stopping")
    except DevstackError as exc:
        say(f"error: {exc}")
        status = 1
    finally:
        # Web first (it calls inference), the broker last (the worker talks to it).
        for name in ("web", "inference", "worker", "redis"):
            if name in children:
                children[name].stop()
        layout.pid_file.unlink(missing_ok=True)
        say("stopped")
    return status


def write_pid_file(layout: Layout, children: dict[str, Child]) -> None:
    record = {"pid": os.getpid(), "groups": {name: child.pid for name, child in children.items()}}
    layout.pid_file.write_text(json.dumps(record))


def cmd_down(layout: Layout) -> int:
    record = read_pid_file(layout)
    if not record:
        say(f"no stack running (no {layout.pid_file})")
        return 0
    pid = record["pid"]
    if pid_alive(pid):
        say(f"stopping the stack (pid {pid})")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 4 * STOP_GRACE_S
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    # If the supervisor was killed outright, its children are still ours to stop.
    for name, pgid in record.get("groups", {}).items():
        if group_alive(pgid):
            say(f"stopping leftover {name} (process group {pgid})")
            signal_group(pgid, signal.SIGTERM)
            wait_group_gone(pgid, STOP_GRACE_S)
    layout.pid_file.unlink(missing_ok=True)
    say("stopped")
    return 0


def cmd_status(layout: Layout) -> int:
    record = read_pid_file(layout)
    if record and pid_alive(record["pid"]):
        say(f"running (pid {record['pid']}): web {layout.url(layout.web_port)}, "
            f"inference {layout.url(layout.inference_port)}")
        return 0
    say("not running")
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("command", choices=("up", "down", "status"))
    args = parser.parse_args(argv)
    layout = Layout.from_env()
    return {"up": cmd_up, "down": cmd_down, "status": cmd_status}[args.command](layout)


if __name__ == "__main__":
    sys.exit(main())
