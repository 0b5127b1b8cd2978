"""Settings of the inference service, read once from INFERENCE_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ctscan.config import REPO_ROOT, get_core_settings
from ctscan.imaging import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE
from ctscan.models import MODEL_NAMES


class InferenceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INFERENCE_", env_file=".env", extra="ignore")

    # Model store (local folder or s3://...); empty = CTSCAN_MODEL_STORE.
    model_store: str = ""
    # Which models to serve; the ensemble is offered when two or more are loaded.
    # Comma-separated in the environment: INFERENCE_MODELS=mobilenetv2,densenet121
    models: Annotated[list[str], NoDecode] = Field(default_factory=lambda: list(MODEL_NAMES))
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=64)
    max_side: int = Field(default=DEFAULT_MAX_SIDE, ge=8)
    # Dynamic batching: a batch closes at max_batch_size or max_wait_ms after its first request.
    max_batch_size: int = Field(default=16, ge=1, le=256)
    max_wait_ms: float = Field(default=2.0, ge=0.0, le=1000.0)
    use_onnx: bool = True
    onnx_tolerance: float = Field(default=1e-4, gt=0.0)
    # Threads decoding uploads (0 = one per core): more only adds contention and memory.
    decode_threads: int = Field(default=0, ge=0, le=256)
    # ONNX Runtime threads per model (0 = one per core), and whether they busy-wait between
    # layers while a batch runs: that shaves about a millisecond off a lone request, but
    # under load, and for the ensemble's three models at once, it takes the cores from
    # decoding and from each other (measured: fewer requests per second). Off by default.
    onnx_threads: int = Field(default=0, ge=0, le=256)
    onnx_spinning: bool = False
    onnx_cache_dir: Path | None = REPO_ROOT / "var" / "onnx-cache"
    # Real CT images for the ONNX check and smoke predictions; empty = CTSCAN_DATA_DIR.
    verification_dir: str = ""
    verification_images: int = Field(default=4, ge=1, le=64)
    # Seconds between polls of the store's production pointers; 0 turns hot reload off.
    reload_poll_seconds: float = Field(default=30.0, ge=0.0)
    warmup_gradcam: bool = True
    log_level: str = "info"

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("models")
    @classmethod
    def _known_models(cls, models: list[str]) -> list[str]:
        unknown = sorted(set(models) - set(MODEL_NAMES))
        if unknown:
            raise ValueError(f"unknown models {unknown}; choose from {list(MODEL_NAMES)}")
        if not models:
            raise ValueError("at least one model must be served")
        return list(dict.fromkeys(models))

    def store_url(self) -> str:
        return self.model_store or get_core_settings().model_store

    def verification_path(self) -> Path:
        return Path(self.verification_dir) if self.verification_dir else get_core_settings().data_dir


@lru_cache
def get_settings() -> InferenceSettings:
    return InferenceSettings()
