"""The inference API's answers: the contract between the inference service, its clients and
the web page.

The service declares them as `response_model`s (so they document /openapi.json and every
answer is validated on the way out), the web service's client parses answers with them, and
the web tests' stand-in server builds its answers from them, so none of them can drift.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Label = Literal["COVID", "non-COVID"]
# API version 2 (see ctscan.decision): what a clinician is told.
Outcome = Literal["covid", "non_covid", "indeterminate", "no_lungs_visible", "not_chest_ct"]
API_VERSION = 2


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
    ensemble: dict[str, str] | None = Field(default=None, description=(
        "The member versions the ensemble serves (pinned), once loaded; null when it is not served "
        "(GET /models says why)"))


class MemberPrediction(BaseModel):
    probability_covid: float = Field(description="This model's calibrated probability of COVID-19")
    label: Label = Field(description="Which side of this model's own threshold the probability lies on")
    version: str
    threshold: float
    gate_distance: float | None = Field(
        default=None, description="Distance to the training slices in this model's feature space (input gate)")
    gate_threshold: float | None = Field(default=None, description="Distances above this are refused")


class Timings(BaseModel):
    decode: float
    inference: float
    gradcam: float | None
    total: float


class LungFindings(BaseModel):
    """What the lung preprocessing found (shares of the body's area, 0..1): the answer's form
    of `ctscan.imaging.preprocessing.LungFindings` (its `as_dict()`, which leaves out the crop box).
    The fields mirror the dataclass; tests/core/test_answers.py keeps them equal."""

    body_fraction: float
    lung_fraction: float
    lung_components: int
    largest_lung_fraction: float
    lung_balance: float
    posterior_fraction: float
    contrast: float


class Prediction(BaseModel):
    """One slice's answer, API version 2.

    `outcome` is what to tell a clinician: `covid` / `non_covid` only when the calibrated
    probability lies clearly on one side of the decision threshold; `indeterminate` when it
    lies within `indeterminate_band` of it or the ensemble's models disagree (review by a
    radiologist); `no_lungs_visible` / `not_chest_ct` when the input was not classified at
    all (then `probability_covid`, `threshold` and `label` are null)."""

    # Answers from a newer service may carry more fields; a client keeps what it knows.
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    api_version: int = API_VERSION
    outcome: Outcome
    outcome_text: str = Field(description="The outcome in plain words, as the web page shows it")
    probability_covid: float | None = Field(
        description="Calibrated probability of COVID-19 (fitted on the validation split); null when not classified")
    threshold: float | None = Field(description="Decision threshold on probability_covid, chosen on validation data")
    indeterminate_band: float | None = Field(
        default=None, description="Probabilities within this distance of the threshold are indeterminate")
    reasons: list[str] = Field(default_factory=list, description="Why the outcome is indeterminate or refused")
    label: Label | None = Field(description="API v1: the side of the threshold; null when not classified")
    confidence: float | None = Field(
        default=None, deprecated=True,
        description="Deprecated (API v1): probability_covid if label is COVID, else 1 - probability_covid. It is "
                    "not the chance that the label is right; read outcome and probability_covid instead")
    calibrated: bool = Field(default=False, description=(
        "Whether probability_covid is calibrated: the ensemble's own calibration, else every model's"))
    model: str
    model_version: str
    members: dict[str, MemberPrediction] | None
    disagreement: bool | None
    lung_findings: LungFindings | None = None
    heatmap_png_base64: str | None
    heatmap_members: list[str] | None = Field(default=None, description=(
        "Whose Grad-CAM maps the heatmap combines (their mean on the original slice, masked to the body)"))
    request_id: str
    timings_ms: Timings
    source_format: str  # one of ctscan.imaging.formats.format_names(): PNG, JPEG, DICOM
    disclaimer: str


class StudySlice(BaseModel):
    index: int = Field(description="Position along the body axis, 0 = the first slice (feet end)")
    upload_index: int = Field(description="Which uploaded file (or ZIP entry, in archive order) this is")
    position_mm: float | None = Field(description="Distance from the first slice along the body axis (DICOM)")
    outcome: Outcome
    probability_covid: float | None
    reasons: list[str] = Field(default_factory=list)


class TopSlice(BaseModel):
    index: int
    probability_covid: float
    heatmap_png_base64: str | None
    heatmap_members: list[str] | None = Field(default=None, description="Whose Grad-CAM maps the heatmap combines")


class Aggregation(BaseModel):
    rule: str = Field(description="top_k_mean: the mean of the k most suspicious classified slices")
    k: int | None
    classified_slices: int


class StudyTimings(BaseModel):
    slices: float = Field(description="Decoding, screening and classifying every slice (they overlap)")
    gradcam: float | None
    total: float


class StudyPrediction(BaseModel):
    """A whole study's answer, API version 2: one outcome for the study (from the slices'
    calibrated probabilities, `aggregation`), and every slice's outcome in body order."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    api_version: int = API_VERSION
    outcome: Outcome
    outcome_text: str
    probability_covid: float | None
    threshold: float | None
    indeterminate_band: float | None = None
    reasons: list[str] = Field(default_factory=list)
    aggregation: Aggregation
    slice_count: int
    skipped: dict[str, int] = Field(description="Slices not classified, by outcome (no_lungs_visible, ...)")
    slices: list[StudySlice]
    top_slices: list[TopSlice]
    model: str
    model_version: str
    request_id: str
    timings_ms: StudyTimings
    source_format: str
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
    preprocessing: str | None = None
    calibration: str | None = Field(default=None, description="Calibration method fitted on val (none: raw scores)")
    indeterminate_band: float | None = None
    input_gate: bool = Field(default=False, description="Whether inputs far from the training data are refused")


class EnsembleModelInfo(BaseModel):
    members: dict[str, str] = Field(description="The member versions the ensemble's calibration and threshold "
                                                "were fitted for (on val), which are the ones served")
    pinned: bool = Field(default=True, description=(
        "The ensemble serves exactly these member versions, whatever a member's production version is now, "
        "until it is calibrated again (`ctscan models calibrate-ensemble`)"))
    awaiting_recalibration: dict[str, str] = Field(default_factory=dict, description=(
        "Members whose production version has moved on -> that version: single-model requests get it, the "
        "ensemble uses it only once recalibrated"))
    members_rule: str | None = Field(default=None, description=(
        "How the members were chosen: floors (the production models that clear the promotion floors on every "
        "val source) or explicit (named by an admin); null for records from before the choice was recorded"))
    excluded: dict[str, str] = Field(default_factory=dict, description="Models left out of the ensemble -> why")
    threshold: float
    threshold_source: str
    indeterminate_band: float | None = None
    calibration: str | None = Field(default=None, description="Calibration method of the ensemble's mean")
    calibrated_at: str | None = None


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    ensemble: EnsembleModelInfo | None
    ensemble_error: str | None = Field(default=None, description="Why the ensemble is not served, when it is not")
    missing: list[str]
    errors: dict[str, str]
