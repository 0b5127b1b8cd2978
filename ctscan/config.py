"""Core settings, read from environment variables (prefix CTSCAN_) or a `.env` file."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class CoreSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CTSCAN_", env_file=".env", extra="ignore")

    # Dataset folder laid out like UCSD COVID-CT (split.csv, SHA256SUMS, images).
    data_dir: Path = REPO_ROOT.parent / "shared" / "data" / "ucsd-covid-ct"
    # Local folder or s3://bucket/prefix.
    model_store: str = str(REPO_ROOT / "var" / "model-store")
    # The shipped release (seeds a fresh store without any download).
    release_dir: Path = REPO_ROOT / "models"
    runs_dir: Path = REPO_ROOT / "var" / "runs"


@lru_cache
def get_core_settings() -> CoreSettings:
    return CoreSettings()
