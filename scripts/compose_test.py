"""`make compose-test`: build the images, start docker-compose.yml, use it as a person would, stop it.

    python scripts/compose_test.py [--keep] [--skip-build]

1. Picks the engine: `docker compose` where a Docker engine answers, else podman with
   podman-compose (`../shared/tools/container-engine-setup.sh` installs them on a machine with
   neither; `.ci/run` runs it).
2. Builds the images, one at a time (images that share build steps reuse their layers).
3. Starts the stack under its own project name, on free host ports, with generated secrets
   and the local data set (CTSCAN_TEST_DATA_DIR) for the seed job to publish, and waits until
   every service is healthy. Docker honours `depends_on` conditions itself (`up --wait`);
   podman 4.3 does not (see the caveats of container-engine-setup.sh), so with podman this
   script creates the containers without dependency links and starts them stage by stage in
   the compose file's dependency order, running each healthcheck by hand (`podman
   healthcheck run`) and waiting for one-shot services to exit 0. The compose file stays the
   one a Docker user runs.
4. Runs the user-level checks (pytest tests/deploy/stack/): /predict on a real slice with each
   model, the page in headless Chromium (screenshots at 1280 and 390 px in test-artifacts/),
   admin login, a one-epoch training job queued in the console and finished by the trainer
   container against MinIO, then SIGTERM to each service (each must stop by itself).
5. `down -v`, then checks that no container, pod, volume or network of the project is left.

Prints how long each phase took. Exit status 0 only when everything passed.
Environment: CTSCAN_TEST_DATA_DIR (default ../shared/data/ucsd-covid-ct), COMPOSE_TEST_PROJECT
(default ctscan-composetest), COMPOSE_TEST_TIMEOUT (seconds for the stack to become healthy,
default 1200).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
SETUP_SCRIPT = REPO_ROOT.parent / "shared" / "tools" / "container-engine-setup.sh"
ARTIFACTS_DIR = REPO_ROOT / "test-artifacts" / "compose"
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"


class ComposeTestError(Exception):
    """A phase failed; the message says which and shows what the engine said."""


def say(message: str) -> None:
    print(f"compose-test: {message}", flush=True)


def run(argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 600, check: bool = True,
        quiet: bool = False) -> subprocess.CompletedProcess[str]:
    if not quiet:
        say("$ " + " ".join(argv))
    done = subprocess.run(list(argv), cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    if check and done.returncode != 0:
        raise ComposeTestError(f"`{' '.join(argv)}` exited with {done.returncode}:\n"
                               f"{(done.stdout + done.stderr)[-4000:]}")
    return done


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the engine -----------------------------------------------------------------------------
@dataclass
class Engine:
    kind: str  # "docker" or "podman"
    project: str
    env_file: Path
    env: dict[str, str]

    @property
    def cli(self) -> str:
        return self.kind

    def compose(self, *args: str) -> list[str]:
        if self.kind == "docker":
            return ["docker", "compose", "--project-name", self.project, "--env-file", str(self.env_file),
                    "-f", str(COMPOSE_FILE), *args]
        return ["podman-compose", "--project-name", self.project, "--env-file", str(self.env_file),
                "-f", str(COMPOSE_FILE), *args]

    def containers(self) -> dict[str, str]:
        """service -> container name, for this project's containers (running or not)."""
        template = ('{{.Names}}\t{{.Label "%s"}}' if self.kind == "docker"
                    else '{{.Names}}\t{{index .Labels "%s"}}') % SERVICE_LABEL
        done = run([self.cli, "ps", "-a", "--filter", f"label={PROJECT_LABEL}={self.project}", "--format",
                    template], env=self.env, quiet=True)
        found = {}
        for line in done.stdout.splitlines():
            name, _, service = line.partition("\t")
            if name.strip():
                found[service.strip()] = name.strip()
        return found

    def state(self, container: str) -> dict[str, Any]:
        done = run([self.cli, "inspect", "--format", "{{json .State}}", container], env=self.env, quiet=True)
        return dict(json.loads(done.stdout))

    def logs(self, container: str, tail: int = 40) -> str:
        done = run([self.cli, "logs", "--tail", str(tail), container], env=self.env, check=False, quiet=True)
        return "\n".join("    " + line for line in (done.stdout + done.stderr).splitlines())

    def leftovers(self) -> list[str]:
        """Anything of this project still there after `down -v`."""
        found = [f"container {name}" for name in self.containers().values()]
        label = f"label={PROJECT_LABEL}={self.project}"
        for kind in ("volume", "network"):
            done = run([self.cli, kind, "ls", "--filter", label, "--format", "{{.Name}}"], env=self.env,
                       check=False, quiet=True)
            found += [f"{kind} {name}" for name in done.stdout.split()]
        if self.kind == "podman":
            done = run(["podman", "pod", "ls", "--filter", f"name=^pod_{self.project}$", "--format", "{{.Name}}"],
                       env=self.env, check=False, quiet=True)
            found += [f"pod {name}" for name in done.stdout.split()]
        return found


def docker_available() -> bool:
    if not shutil.which("docker"):
        return False
    info = subprocess.run(["docker", "info"], capture_output=True, timeout=60, check=False)
    compose = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60, check=False)
    return info.returncode == 0 and compose.returncode == 0


def choose_engine(project: str, env_file: Path, env: dict[str, str]) -> Engine:
    if docker_available():
        return Engine("docker", project, env_file, env)
    if shutil.which("podman") and shutil.which("podman-compose"):
        return Engine("podman", project, env_file, env | {"BUILDAH_FORMAT": "docker"})
    raise ComposeTestError("no container engine: neither a Docker engine (`docker info`) nor podman and "
                           f"podman-compose; as root, run {SETUP_SCRIPT} (what .ci/run does), or install Docker")


# --- the compose file's dependency order ------------------------------------------------------
@dataclass
class Service:
    name: str
    depends_on: dict[str, str] = field(default_factory=dict)  # dependency -> condition
    has_healthcheck: bool = False
    one_shot: bool = False  # another service waits for it to complete


def read_compose() -> dict[str, Any]:
    """docker-compose.yml with ${VAR:-default} image tags resolved as compose would here."""
    import re

    import yaml

    def substitute(match: re.Match[str]) -> str:
        return os.environ.get(match["name"]) or match["default"] or ""

    text = re.sub(r"\$\{(?P<name>\w+):-(?P<default>[^}]*)\}", substitute, COMPOSE_FILE.read_text())
    return dict(yaml.safe_load(text))


def read_services() -> dict[str, Service]:
    spec = read_compose()["services"]
    services = {name: Service(name, has_healthcheck="healthcheck" in body and not body["healthcheck"].get("disable"))
                for name, body in spec.items()}
    for name, body in spec.items():
        depends = body.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {dependency: {"condition": "service_started"} for dependency in depends}
        for dependency, rule in depends.items():
            condition = (rule or {}).get("condition", "service_started")
            services[name].depends_on[dependency] = condition
            if condition == "service_completed_successfully":
                services[dependency].one_shot = True
    return services


def start_stages(services: dict[str, Service]) -> list[list[str]]:
    """Services grouped in the order they can start: each stage only needs earlier ones."""
    stages: list[list[str]] = []
    placed: set[str] = set()
    while len(placed) < len(services):
        stage = sorted(name for name, service in services.items()
                       if name not in placed and set(service.depends_on) <= placed)
        if not stage:
            raise ComposeTestError(f"dependency cycle among {sorted(set(services) - placed)}")
        stages.append(stage)
        placed.update(stage)
    return stages


# --- phases -----------------------------------------------------------------------------------
def write_env_file(folder: Path, data_dir: Path) -> tuple[Path, dict[str, str]]:
    values = {
        "WEB_SECRET_KEY": secrets.token_urlsafe(32),
        "WEB_ADMIN_PASSWORD": secrets.token_urlsafe(16),
        "CTSCAN_ADMIN_TOKEN": secrets.token_urlsafe(24),
        "WEB_INFERENCE_API_KEY": secrets.token_urlsafe(32),
        "MINIO_ROOT_USER": "ctscan",
        "MINIO_ROOT_PASSWORD": secrets.token_urlsafe(24),
        "CTSCAN_BUCKET": "ctscan",
        "CTSCAN_DATASET_DIR": str(data_dir),
        "INFERENCE_PORT": str(free_port()),
        "WEB_PORT": str(free_port()),
        "MINIO_CONSOLE_PORT": str(free_port()),
    }
    path = folder / "compose-test.env"
    path.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
    path.chmod(0o600)
    return path, values


def build(engine: Engine, log_path: Path) -> None:
    # One image at a time: images that share build steps then reuse their cached layers.
    argv = engine.compose("build") if engine.kind == "docker" else engine.compose("--parallel", "1", "build")
    say("$ " + " ".join(argv) + f"  (log: {log_path})")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        status = subprocess.call(argv, cwd=REPO_ROOT, env=engine.env, stdout=log, stderr=subprocess.STDOUT,
                                 timeout=3600)
    if status != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise ComposeTestError(f"building the images failed ({status}); the end of {log_path}:\n{tail}")
    images = sorted({body["image"] for body in read_compose()["services"].values() if "build" in body})
    for image in images:
        done = run([engine.cli, "image", "inspect", "--format", "{{.Size}}", image], env=engine.env, check=False,
                   quiet=True)
        size = int(done.stdout.strip() or 0) if done.returncode == 0 else 0
        say(f"image {image}: {size / 1e6:.0f} MB")


def wait_until(engine: Engine, container: str, *, healthy: bool, timeout_s: float) -> None:
    """Until the container's healthcheck passes (healthy) or it exits 0 (a one-shot job)."""
    deadline = time.monotonic() + timeout_s
    started = time.monotonic()
    last_note = started
    while True:
        state = engine.state(container)
        if healthy:
            if not state.get("Running"):
                raise ComposeTestError(f"{container} stopped (exit {state.get('ExitCode')}) before it was healthy; "
                                       f"its last lines:\n{engine.logs(container)}")
            check = run(["podman", "healthcheck", "run", container], env=engine.env, check=False, quiet=True)
            if check.returncode == 0:
                say(f"{container} is healthy ({time.monotonic() - started:.0f} s)")
                return
        elif not state.get("Running") and state.get("Status") in ("exited", "stopped"):
            if state.get("ExitCode") != 0:
                raise ComposeTestError(f"{container} exited with {state.get('ExitCode')}; its last lines:\n"
                                       f"{engine.logs(container)}")
            say(f"{container} completed ({time.monotonic() - started:.0f} s)")
            return
        if time.monotonic() > deadline:
            raise ComposeTestError(f"{container} not {'healthy' if healthy else 'done'} after {timeout_s:.0f} s; "
                                   f"its last lines:\n{engine.logs(container)}")
        if time.monotonic() - last_note > 60:
            say(f"waiting for {container} ({time.monotonic() - started:.0f} s)")
            last_note = time.monotonic()
        time.sleep(3)


def up(engine: Engine, timeout_s: float) -> dict[str, str]:
    if engine.kind == "docker":
        run(engine.compose("up", "--detach", "--wait", "--wait-timeout", str(int(timeout_s))),
            env=engine.env, timeout=timeout_s + 120)
        return engine.containers()
    # podman 4.3: no links between the containers, then start them stage by stage.
    run(engine.compose("up", "--detach", "--no-start", "--no-deps", "--no-build"), env=engine.env, timeout=600)
    containers = engine.containers()
    services = read_services()
    missing = sorted(set(services) - set(containers))
    if missing:
        raise ComposeTestError(f"no container was created for {missing}")
    deadline = time.monotonic() + timeout_s
    for stage in start_stages(services):
        run(["podman", "start", *(containers[name] for name in stage)], env=engine.env, timeout=300)
        for name in stage:
            service = services[name]
            remaining = max(deadline - time.monotonic(), 30.0)
            if service.one_shot:
                wait_until(engine, containers[name], healthy=False, timeout_s=remaining)
            elif service.has_healthcheck:
                wait_until(engine, containers[name], healthy=True, timeout_s=remaining)
    return containers


def user_checks(engine: Engine, values: dict[str, str], containers: dict[str, str], data_dir: Path) -> int:
    env = dict(os.environ) | {
        "CTSCAN_STACK_ENGINE": engine.kind,
        "CTSCAN_STACK_PROJECT": engine.project,
        "CTSCAN_STACK_CONTAINERS": json.dumps(containers),
        "CTSCAN_STACK_WEB_URL": f"http://127.0.0.1:{values['WEB_PORT']}",
        "CTSCAN_STACK_INFERENCE_URL": f"http://127.0.0.1:{values['INFERENCE_PORT']}",
        "CTSCAN_STACK_ADMIN_PASSWORD": values["WEB_ADMIN_PASSWORD"],
        # The page's key, registered by the web container at start: the stack's one key.
        "CTSCAN_STACK_API_KEY": values["WEB_INFERENCE_API_KEY"],
        "CTSCAN_STACK_BUCKET": values["CTSCAN_BUCKET"],
        "CTSCAN_STACK_S3_USER": values["MINIO_ROOT_USER"],
        "CTSCAN_STACK_S3_PASSWORD": values["MINIO_ROOT_PASSWORD"],
        "CTSCAN_TEST_DATA_DIR": str(data_dir),
    }
    say("$ pytest tests/deploy/stack")
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/deploy/stack"],
                           cwd=REPO_ROOT, env=env)


def down(engine: Engine) -> list[str]:
    if engine.kind == "docker":
        run(engine.compose("down", "--volumes", "--remove-orphans", "--timeout", "30"), env=engine.env,
            timeout=600, check=False)
    else:
        run(engine.compose("down", "--volumes", "--timeout", "30"), env=engine.env, timeout=600, check=False)
    return engine.leftovers()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--keep", action="store_true", help="leave the stack running after the checks")
    parser.add_argument("--skip-build", action="store_true", help="use the images already built")
    args = parser.parse_args(argv)

    data_dir = Path(os.environ.get("CTSCAN_TEST_DATA_DIR") or REPO_ROOT.parent / "shared" / "data" / "ucsd-covid-ct")
    if not (data_dir / "split.csv").is_file():
        say(f"error: no data set at {data_dir} (set CTSCAN_TEST_DATA_DIR)")
        return 1
    project = os.environ.get("COMPOSE_TEST_PROJECT", "ctscan-composetest")
    timeout_s = float(os.environ.get("COMPOSE_TEST_TIMEOUT", "1200"))
    timings: dict[str, float] = {}
    status = 1
    with tempfile.TemporaryDirectory(prefix="compose-test-") as folder:
        env_file, values = write_env_file(Path(folder), data_dir.resolve())
        engine: Engine | None = None
        try:
            engine = choose_engine(project, env_file, dict(os.environ))
            say(f"engine: {engine.kind}; project {project}; web on :{values['WEB_PORT']}, "
                f"inference on :{values['INFERENCE_PORT']}")
            started = time.monotonic()
            stale = down(engine)  # a run that was killed may have left its stack behind
            if stale:
                raise ComposeTestError(f"a previous stack of project {project} could not be removed: {stale}")
            if not args.skip_build:
                build(engine, ARTIFACTS_DIR / "build.log")
                timings["build"] = time.monotonic() - started
            started = time.monotonic()
            containers = up(engine, timeout_s)
            timings["up until healthy"] = time.monotonic() - started
            started = time.monotonic()
            checks = user_checks(engine, values, containers, data_dir)
            timings["user checks"] = time.monotonic() - started
            status = 0 if checks == 0 else 1
            if checks != 0:
                for service, container in sorted(containers.items()):
                    say(f"last lines of {service} ({container}):\n{engine.logs(container, tail=25)}")
        except (ComposeTestError, subprocess.TimeoutExpired) as exc:
            say(f"error: {exc}")
            status = 1
        finally:
            if engine is not None and not args.keep:
                started = time.monotonic()
                left = down(engine)
                timings["down"] = time.monotonic() - started
                if left:
                    say(f"error: left behind after down: {', '.join(left)}")
                    status = 1
                else:
                    say("down: no container, pod, volume or network of the project is left")
    say("timings: " + ", ".join(f"{phase} {seconds / 60:.1f} min" for phase, seconds in timings.items()))
    say("passed" if status == 0 else "FAILED")
    return status


if __name__ == "__main__":
    sys.exit(main())
