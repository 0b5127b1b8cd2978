"""Trainer service settings, read once from the environment (or `.env`).

Names follow the cross-team contract: REDIS_URL, CELERY_BROKER_URL, CTSCAN_MODEL_STORE,
CTSCAN_DATASETS_URL, CTSCAN_ADMIN_TOKEN; S3 endpoint and credentials are read by
`ctscan.s3store.S3Settings` and boto3.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ctscan.config import REPO_ROOT, get_core_settings

# Values that mean "someone forgot to set the secret"; the service refuses them.
PLACEHOLDER_TOKENS = {"", "changeme", "change-me", "changethis", "secret", "admin", "token"}


class TrainerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    redis_url: str = Field(default="redis://127.0.0.1:6379/0", validation_alias="REDIS_URL")
    # Empty = REDIS_URL; `filesystem://` works too (job records do not live in the broker).
    broker_url: str = Field(default="", validation_alias="CELERY_BROKER_URL")
    # Empty = REDIS_URL; "disabled" runs without a result backend (progress then only in S3).
    result_backend: str = Field(default="", validation_alias="CELERY_RESULT_BACKEND")
    model_store: str = Field(default_factory=lambda: get_core_settings().model_store,
                             validation_alias="CTSCAN_MODEL_STORE")
    datasets_url: str = Field(default=str(REPO_ROOT / "var" / "datasets"), validation_alias="CTSCAN_DATASETS_URL")
    admin_token: SecretStr | None = Field(default=None, validation_alias="CTSCAN_ADMIN_TOKEN")
    # Local scratch: dataset cache and run folders (checkpoints are mirrored to the store).
    work_dir: Path = Field(default=REPO_ROOT / "var" / "trainer", validation_alias="CTSCAN_TRAINER_WORK_DIR")
    queue: str = Field(default="training", validation_alias="CTSCAN_TRAINER_QUEUE")
    # A training job longer than this is stopped (soft limit: the job records why).
    soft_time_limit_s: int = Field(default=6 * 3600, ge=10, validation_alias="CTSCAN_TRAINER_SOFT_TIME_LIMIT")
    # Redis redelivers an unacknowledged job after this long; it must exceed the time limit,
    # or a healthy long job would be handed to a second worker.
    visibility_timeout_s: int | None = Field(default=None, ge=1, validation_alias="CTSCAN_TRAINER_VISIBILITY_TIMEOUT")
    promotion_metric: str = Field(default="auc", validation_alias="CTSCAN_PROMOTION_METRIC")
    # Message folder of the embedded `filesystem://` broker (make up without Redis).
    broker_dir: Path = Field(default=REPO_ROOT / "var" / "broker", validation_alias="CTSCAN_BROKER_DIR")

    @field_validator("promotion_metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        allowed = {"auc", "accuracy", "f1", "precision", "recall"}
        if value not in allowed:
            raise ValueError(f"CTSCAN_PROMOTION_METRIC must be one of {', '.join(sorted(allowed))}")
        return value

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def celery_result_backend(self) -> str | None:
        if self.result_backend == "disabled":
            return None
        return self.result_backend or self.redis_url

    @property
    def hard_time_limit_s(self) -> int:
        return self.soft_time_limit_s + 120  # room to write the failed record after the soft limit

    @property
    def broker_visibility_timeout_s(self) -> int:
        return self.visibility_timeout_s or self.hard_time_limit_s + 3600

    def admin_token_value(self) -> str | None:
        """The configured admin token, or None when unset or a placeholder."""
        if self.admin_token is None:
            return None
        value = self.admin_token.get_secret_value().strip()
        return None if value.lower() in PLACEHOLDER_TOKENS else value


@lru_cache
def get_trainer_settings() -> TrainerSettings:
    return TrainerSettings()
