"""The web service refuses to start without real secrets."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from ctscan.settings import WebSettings

from .conftest import ADMIN_PASSWORD, CTSCAN, REPO_ROOT, SECRET_KEY, _base_env


def settings_from(**values: Any) -> WebSettings:
    # Keyword values and the process environment only: a developer's .env must not leak in.
    return WebSettings.from_values(_env_file=None, **values)


@pytest.mark.parametrize("secret", ["", "   ", "changeme", "CHANGE-ME", "secret", "<your-secret>", "short"])
def test_placeholder_or_empty_secret_key_is_refused(secret: str) -> None:
    with pytest.raises(ValidationError, match="WEB_SECRET_KEY"):
        settings_from(secret_key=secret, admin_password=ADMIN_PASSWORD)


@pytest.mark.parametrize("password", ["changeme", "password", "admin", "abc"])
def test_placeholder_admin_password_is_refused(password: str) -> None:
    with pytest.raises(ValidationError, match="WEB_ADMIN_PASSWORD"):
        settings_from(secret_key=SECRET_KEY, admin_password=password)


@pytest.mark.parametrize("key", ["changeme", "too-short-key"])
def test_placeholder_inference_api_key_is_refused(key: str) -> None:
    with pytest.raises(ValidationError, match="WEB_INFERENCE_API_KEY"):
        settings_from(secret_key=SECRET_KEY, inference_api_key=key)


def test_secrets_have_no_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WEB_SECRET_KEY", "WEB_ADMIN_PASSWORD", "WEB_AUTH", "WEB_INFERENCE_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValidationError) as caught:
        settings_from()
    assert {error["loc"][0] for error in caught.value.errors()} == {"WEB_SECRET_KEY"}
    # Without WEB_ADMIN_PASSWORD there is no built-in admin: admins log in with their accounts.
    settings = settings_from(secret_key=SECRET_KEY, admin_password="")
    assert settings.admin_password is None and settings.auth == "accounts"
    assert settings.inference_api_key is None


def test_an_unknown_auth_mode_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEB_AUTH", "none")
    with pytest.raises(ValidationError, match="WEB_AUTH"):
        settings_from(secret_key=SECRET_KEY)


def test_settings_read_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEB_SECRET_KEY", SECRET_KEY)
    monkeypatch.setenv("WEB_ADMIN_PASSWORD", ADMIN_PASSWORD)
    monkeypatch.setenv("INFERENCE_URL", "http://inference.internal:8000/")
    monkeypatch.setenv("WEB_MAX_UPLOAD_MB", "5")
    monkeypatch.delenv("CTSCAN_ADMIN_TOKEN", raising=False)  # other suites in this session may set it
    settings = settings_from()
    assert settings.inference_url == "http://inference.internal:8000"
    assert settings.max_upload_bytes == 5 * 1024 * 1024
    assert settings.admin.token() is None  # optional: the console then cannot queue


@pytest.mark.slow  # starts the service's process
def test_serve_web_refuses_to_start_with_placeholder_secret(tmp_path: Path) -> None:
    env = _base_env() | {"WEB_SECRET_KEY": "changeme", "WEB_ADMIN_PASSWORD": ADMIN_PASSWORD}
    completed = subprocess.run([CTSCAN, "serve", "web", "--port", "1"], check=False, env=env, cwd=tmp_path,
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode != 0
    assert "ctscan: error: the web service refuses to start: WEB_SECRET_KEY is a placeholder" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert str(REPO_ROOT) not in completed.stdout
