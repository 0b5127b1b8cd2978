"""docker-compose.yml (and with the GPU override merged): valid against the Compose
Specification schema (the copy vendored by check-jsonschema, so this runs offline),
healthchecks, dependency conditions, named volumes, required secrets, pinned images and
commands that are real `ctscan serve ...` entry points. No Docker engine here, so the merge
of the override is done in the test, following Compose's rules for the keys used."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import REPO_ROOT

BASE = REPO_ROOT / "docker-compose.yml"
GPU = REPO_ROOT / "docker-compose.gpu.yml"
SERVES = {"inference": "inference", "web": "web", "trainer": "worker"}
ONE_SHOT = {"seed"}
REQUIRED_SECRETS = {"WEB_SECRET_KEY", "WEB_ADMIN_PASSWORD", "CTSCAN_ADMIN_TOKEN", "MINIO_ROOT_PASSWORD",
                    "WEB_INFERENCE_API_KEY"}


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def merge(base: Any, override: Any) -> Any:
    """Compose-style merge for mappings; scalars and sequences of the override win."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge(base[key], value) if key in base else value
        return merged
    return override


def validate_schema(path: Path) -> None:
    tool = shutil.which("check-jsonschema") or str(Path(sys.executable).parent / "check-jsonschema")
    done = subprocess.run([tool, "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load(BASE)


@pytest.fixture(scope="module")
def merged(compose: dict[str, Any]) -> dict[str, Any]:
    return merge(compose, load(GPU))


def test_compose_files_match_the_compose_specification(tmp_path: Path, merged: dict[str, Any]) -> None:
    validate_schema(BASE)
    validate_schema(GPU)
    merged_file = tmp_path / "merged.yml"
    merged_file.write_text(yaml.safe_dump(merged))
    validate_schema(merged_file)


def test_services_and_commands(compose: dict[str, Any], check_serve_command) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "minio", *ONE_SHOT, *SERVES}
    for name, service in SERVES.items():
        check_serve_command(services[name]["command"], service)
    seed = services["seed"]["command"]
    assert seed[0] == "python" and Path(seed[1]).name == "seed.py" and (REPO_ROOT / "docker" / "seed.py").is_file()


def test_healthchecks_and_dependency_conditions(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        if name not in ONE_SHOT:
            assert "healthcheck" in service, f"{name}: long-running service without a healthcheck"
        for dependency, spec in service.get("depends_on", {}).items():
            assert isinstance(spec, dict), f"{name}: depends_on {dependency} needs a condition"
            wanted = "service_completed_successfully" if dependency in ONE_SHOT else "service_healthy"
            assert spec.get("condition") == wanted, f"{name} -> {dependency}: condition should be {wanted}"
    assert services["inference"]["depends_on"]["seed"]["condition"] == "service_completed_successfully"
    assert services["trainer"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["web"]["depends_on"]["inference"]["condition"] == "service_healthy"


def test_volumes_are_named_or_explicit_binds(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes", {}))
    used = set()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/", "$")):
                continue  # bind mount of the release models or an optional dataset folder
            assert source in declared, f"{name}: volume {source} is not declared at the top level"
            used.add(source)
    assert used == declared, f"declared but unused volumes: {declared - used}"


def test_required_secrets_fail_loudly_when_missing() -> None:
    text = BASE.read_text()
    required = set(re.findall(r"\$\{(\w+):\?[^}]+\}", text))
    assert REQUIRED_SECRETS <= required
    for secret in REQUIRED_SECRETS:
        # Never a default value for a secret.
        assert not re.search(rf"\$\{{{secret}:?-", text), f"{secret} has a default"
    example = (REPO_ROOT / ".env.example").read_text()
    for variable in required:
        assert re.search(rf"^{variable}=\s*$", example, re.MULTILINE), f".env.example lacks an empty {variable}="


def test_images_are_pinned(merged: dict[str, Any]) -> None:
    for name, service in merged["services"].items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest", f"{name}: image {image} is not pinned to a tag"


def test_gpu_override_gives_trainer_and_inference_a_gpu(merged: dict[str, Any]) -> None:
    for name in ("trainer", "inference"):
        service = merged["services"][name]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), name
        assert service["build"]["dockerfile"] == "docker/trainer-cuda.Dockerfile"
        assert (REPO_ROOT / service["build"]["dockerfile"]).is_file()
    # The override changes the image, not what runs in it.
    assert merged["services"]["inference"]["command"][:3] == ["ctscan", "serve", "inference"]
    assert "deploy" not in merged["services"]["web"]
