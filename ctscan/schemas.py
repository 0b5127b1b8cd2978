"""The inference API's answers: the contract between the inference service, its clients and
the web page.

The service declares them as `response_model`s (so they document /openapi.json and every
answer is validated on the way out), the web service's client parses answers with them, and
the web tests' stand-in server builds its answers from them, so none of them can drift.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

Label = Literal["COVID", "non-COVID"]


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
    label: Label
    version: str
    threshold: float


class Timings(BaseModel):
    decode: float
    inference: float
    gradcam: float | None
    total: float


class Prediction(BaseModel):
    # Answers from a newer service may carry more fields; a client keeps what it knows.
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    label: Label
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
    source_format: str  # one of ctscan.formats.format_names(): PNG, JPEG, DICOM
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
