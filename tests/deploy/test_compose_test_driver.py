"""scripts/compose_test.py's own logic, without an engine: the start order it derives from
docker-compose.yml for podman 4.3 (which ignores depends_on conditions) and the engine choice."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from .conftest import REPO_ROOT


def load_driver():
    spec = importlib.util.spec_from_file_location("compose_test", REPO_ROOT / "scripts" / "compose_test.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_services_start_in_the_compose_files_dependency_order() -> None:
    driver = load_driver()
    services = driver.read_services()
    assert driver.start_stages(services) == [["minio", "redis"], ["seed"], ["inference", "trainer"], ["web"]]
    # Waited for to exit 0 (service_completed_successfully), not for a healthcheck.
    assert {name for name, service in services.items() if service.one_shot} == {"seed"}
    assert all(services[name].has_healthcheck for name in ("redis", "minio", "inference", "web", "trainer"))


def test_a_dependency_cycle_is_named() -> None:
    driver = load_driver()
    services = {"a": driver.Service("a", {"b": "service_healthy"}), "b": driver.Service("b", {"a": "service_healthy"})}
    with pytest.raises(driver.ComposeTestError, match="dependency cycle"):
        driver.start_stages(services)


def test_without_any_engine_it_says_how_to_get_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    driver = load_driver()
    monkeypatch.setattr(driver.shutil, "which", lambda name: None)
    with pytest.raises(driver.ComposeTestError, match="container-engine-setup.sh"):
        driver.choose_engine("p", tmp_path / "env", {})


def test_the_env_file_has_every_required_secret_and_free_ports(tmp_path: Path) -> None:
    import re

    driver = load_driver()
    path, values = driver.write_env_file(tmp_path, tmp_path / "data")
    required = set(re.findall(r"\$\{(\w+):\?", (REPO_ROOT / "docker-compose.yml").read_text()))
    assert required <= {name for name, value in values.items() if value}
    assert (path.stat().st_mode & 0o777) == 0o600
    assert len({values["WEB_PORT"], values["INFERENCE_PORT"], values["MINIO_CONSOLE_PORT"]}) == 3
