"""Response bodies of the inference API (they also document it in /openapi.json)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready"]
    models: dict[str, str]  # name -> version
    backends: dict[str, str]  # name -> onnxruntime | tensorflow


class MemberPrediction(BaseModel):
    probability_covid: float
    label: Literal["COVID", "non-COVID"]
    version: str
    threshold: float


class Timings(BaseModel):
    decode: float
    inference: float
    gradcam: float | None
    total: float


class Prediction(BaseModel):
    label: Literal["COVID", "non-COVID"]
    probability_covid: float
    confidence: float
    threshold: float
    model: str
    model_version: str
    members: dict[str, MemberPrediction] | None
    disagreement: bool | None
    heatmap_png_base64: str | None
    request_id: str
    timings_ms: Timings
    source_format: Literal["PNG", "JPEG", "DICOM"]
    disclaimer: str


class ModelInfo(BaseModel):
    name: str
    version: str
    input_size: int
    threshold: float
    init: str | None
    metrics: dict[str, Any]
    backend: str
    onnx_max_abs_difference: float | None
    onnx_fallback_reason: str | None
    loaded_at: float
    reload_error: str | None


class EnsembleModelInfo(BaseModel):
    members: dict[str, str]
    threshold: float
    threshold_source: str


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    ensemble: EnsembleModelInfo | None
    missing: list[str]
    errors: dict[str, str]
