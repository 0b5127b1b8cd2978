"""Settings of the web service, read once from environment variables (or a `.env` file).

Secrets have no default; the app refuses to start with an empty or placeholder value so a
forgotten deployment step fails loudly instead of running with a guessable key.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ctscan.config import REPO_ROOT, get_core_settings

# Values people paste from examples; refused whatever their case or surrounding spaces.
PLACEHOLDER_SECRETS = frozenset({
    "changeme", "change-me", "change_me", "changethis", "change-this", "secret", "password",
    "placeholder", "admin", "default", "example", "test", "todo", "xxx", "none", "null",
    "your-secret-key", "secret-key", "please-change",
})
MIN_SECRET_KEY_LENGTH = 16
MIN_ADMIN_PASSWORD_LENGTH = 8


def _refuse_placeholder(value: SecretStr, *, name: str, min_length: int) -> SecretStr:
    text = value.get_secret_value().strip()
    if not text:
        raise ValueError(f"{name} is empty; set it to a real secret")
    if text.lower() in PLACEHOLDER_SECRETS or text.lower().startswith(("changeme", "change-me", "<")):
        raise ValueError(f"{name} is a placeholder; set it to a real secret")
    if len(text) < min_length:
        raise ValueError(f"{name} must be at least {min_length} characters long")
    return value


class WebSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    # Signs the session cookie and the CSRF tokens.
    secret_key: SecretStr = Field(validation_alias=AliasChoices("WEB_SECRET_KEY", "secret_key"))
    # The admins' console password (there is one admin role; the password is the credential).
    admin_password: SecretStr = Field(
        validation_alias=AliasChoices("WEB_ADMIN_PASSWORD", "admin_password"))
    # The trainer's admin token, passed on when a logged-in admin queues or cancels a job.
    # Optional: without it the console still shows jobs and models but cannot queue.
    trainer_admin_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("CTSCAN_ADMIN_TOKEN", "trainer_admin_token"))

    inference_url: str = Field(
        default="http://127.0.0.1:8000", validation_alias=AliasChoices("INFERENCE_URL", "inference_url"))
    # Connect fails fast (the service is down); reading waits for Grad-CAM on a CPU.
    inference_connect_timeout_s: float = Field(
        default=3.0, gt=0, validation_alias=AliasChoices("WEB_INFERENCE_CONNECT_TIMEOUT_S",
                                                         "inference_connect_timeout_s"))
    inference_read_timeout_s: float = Field(
        default=60.0, gt=0, validation_alias=AliasChoices("WEB_INFERENCE_READ_TIMEOUT_S",
                                                          "inference_read_timeout_s"))
    inference_retries: int = Field(
        default=2, ge=0, le=5, validation_alias=AliasChoices("WEB_INFERENCE_RETRIES", "inference_retries"))

    max_upload_mb: float = Field(
        default=20.0, gt=0, validation_alias=AliasChoices("WEB_MAX_UPLOAD_MB", "max_upload_mb"))
    # Local folder or s3://bucket/prefix; the console lists, promotes and rolls back here.
    model_store: str = Field(
        default_factory=lambda: get_core_settings().model_store,
        validation_alias=AliasChoices("CTSCAN_MODEL_STORE", "model_store"))
    # Where published dataset versions live (the trainer's CTSCAN_DATASETS_URL): the queue
    # form offers the versions found there.
    datasets_url: str = Field(
        default=str(REPO_ROOT / "var" / "datasets"),
        validation_alias=AliasChoices("CTSCAN_DATASETS_URL", "datasets_url"))
    # Defaults offered in the "queue a training job" form; an empty version means the newest
    # published one.
    default_dataset: str = Field(
        default="ucsd-covid-ct", validation_alias=AliasChoices("WEB_DEFAULT_DATASET", "default_dataset"))
    default_dataset_version: str = Field(
        default="", validation_alias=AliasChoices("WEB_DEFAULT_DATASET_VERSION", "default_dataset_version"))
    # Behind TLS in production: send the session cookie over HTTPS only.
    session_cookie_secure: bool = Field(
        default=False, validation_alias=AliasChoices("WEB_SESSION_COOKIE_SECURE", "session_cookie_secure"))
    session_hours: float = Field(
        default=8.0, gt=0, validation_alias=AliasChoices("WEB_SESSION_HOURS", "session_hours"))

    @field_validator("secret_key")
    @classmethod
    def _check_secret_key(cls, value: SecretStr) -> SecretStr:
        return _refuse_placeholder(value, name="WEB_SECRET_KEY", min_length=MIN_SECRET_KEY_LENGTH)

    @field_validator("admin_password")
    @classmethod
    def _check_admin_password(cls, value: SecretStr) -> SecretStr:
        return _refuse_placeholder(value, name="WEB_ADMIN_PASSWORD", min_length=MIN_ADMIN_PASSWORD_LENGTH)

    @field_validator("trainer_admin_token")
    @classmethod
    def _check_trainer_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        return _refuse_placeholder(value, name="CTSCAN_ADMIN_TOKEN", min_length=MIN_ADMIN_PASSWORD_LENGTH)

    @field_validator("inference_url")
    @classmethod
    def _check_inference_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("INFERENCE_URL must start with http:// or https://")
        return value.rstrip("/")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


@lru_cache
def get_web_settings() -> WebSettings:
    return WebSettings()  # type: ignore[call-arg]  # required fields come from the environment
