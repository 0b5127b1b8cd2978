"""HTTP routes of the inference service: translation between HTTP and `prediction`/`registry`."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, Response, UploadFile
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from ctscan.access.audit_trail import upload_digest
from ctscan.errors import ImageError
from ctscan.imaging.formats import describe_formats
from ctscan.models import ENSEMBLE, architecture_names
from ctscan.schemas import (
    EnsembleModelInfo,
    ErrorResponse,
    Health,
    ModelInfo,
    ModelsResponse,
    Prediction,
    Readiness,
    StudyPrediction,
)
from ctscan.study import ArchiveError, StudyError, StudyLimits
from services.inference.auth import API_KEY, PUBLIC, UploadLimit
from services.inference.decoding import DecodeQueueFullError
from services.inference.deps import MetricsDep, RegistryDep, SettingsDep
from services.inference.errors import APIError, error_response, image_error
from services.inference.prediction import UnrecognisedFileError, predict_upload
from services.inference.registry import EnsembleUnavailableError, ModelNotReadyError, ModelNotServedError
from services.inference.study import SliceError, predict_study, study_blobs

logger = logging.getLogger(__name__)
# Every route states its access in `dependencies` (PUBLIC or API_KEY; an upload route also
# its UploadLimit); one that states nothing is refused to everyone (services/inference/auth.py).
router = APIRouter()

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_READ_CHUNK = 1 << 20
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "Unknown model"), (413, "Upload or image dimensions too large"),
        (415, f"Not a {describe_formats()} file"), (422, "Undecodable image or invalid request"),
        (401, "No valid API key"), (429, "Rate limit of this API key reached (see Retry-After)"),
        (503, "Model not loaded yet"))
}


def new_request_id() -> str:
    """The service's own id of a request (in the answer, the logs and the audit trail)."""
    return uuid.uuid4().hex


def client_request_id_from(supplied: str) -> str | None:
    """The caller's X-Request-ID when it is a sane token (kept beside ours), else None."""
    return supplied if _REQUEST_ID.match(supplied) else None


@router.get("/healthz", response_model=Health, tags=["operations"], dependencies=[PUBLIC])
async def healthz() -> Health:
    """Liveness: the process answers."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, tags=["operations"], dependencies=[PUBLIC],
            responses={503: {"model": ErrorResponse, "description": "Models still loading"}})
async def readyz(registry: RegistryDep) -> Any:
    """200 once every configured model is loaded and warmed up, and the ensemble's pinned member
    versions have been loaded (it is the default model), else 503 naming what is missing. A
    pinned version that cannot be loaded does not hold readiness back: the single models
    answer, the ensemble answers 503 `ensemble_unavailable` with the reason (GET /models)."""
    if not registry.is_ready():
        missing = registry.missing()
        state = "loading" if not registry.loading_done.is_set() else "failed to load"
        details = "; ".join(f"{n}: {registry.errors[n]}" for n in missing if n in registry.errors)
        message = f"not ready: {', '.join(missing) or 'models'} {state}" + (f" ({details})" if details else "")
        return error_response(503, "not_ready", message)
    models, ensemble = registry.models, registry.ensemble
    return Readiness(status="ready", models={n: m.version for n, m in models.items()},
                     backends={n: m.predictor.backend for n, m in models.items()},
                     ensemble=dict(ensemble.members) if ensemble is not None else None)


@router.get("/models", response_model=ModelsResponse, tags=["models"], dependencies=[API_KEY])
async def list_models(registry: RegistryDep) -> ModelsResponse:
    """The loaded models (version, input size, threshold, card metrics) and the ensemble: its
    pinned member versions, members whose production has moved on, and the models it leaves out."""
    models = [
        ModelInfo(name=name, version=served.version, input_size=served.input_size, threshold=served.threshold,
                  init=served.card.init, metrics=served.card.metrics, backend=served.predictor.backend,
                  onnx_max_abs_difference=served.predictor.max_abs_difference,
                  onnx_fallback_reason=served.predictor.fallback_reason, loaded_at=served.loaded_at,
                  reload_error=registry.errors.get(name), preprocessing=served.preprocessing,
                  calibration=served.calibration.method if served.calibration.method != "identity" else None,
                  indeterminate_band=served.band, input_gate=served.gate is not None)
        for name, served in registry.models.items()]
    ensemble, served = registry.ensemble, registry.models
    return ModelsResponse(
        models=models,
        ensemble=None if ensemble is None else EnsembleModelInfo(
            members=ensemble.members, threshold=ensemble.threshold, threshold_source=ensemble.threshold_source,
            indeterminate_band=ensemble.band, calibrated_at=ensemble.calibrated_at,
            calibration=ensemble.calibration.method if ensemble.calibration.method != "identity" else None,
            awaiting_recalibration={n: served[n].version for n, v in ensemble.members.items()
                                    if n in served and served[n].version != v},
            members_rule=ensemble.members_rule, excluded=ensemble.excluded),
        ensemble_error=registry.ensemble_error if ensemble is None else None,
        missing=registry.missing(),
        errors=dict(registry.errors),
    )


# Public inside the cluster: k8s keeps /metrics off the ingress (k8s/networkpolicy.yaml, ingress.yaml).
@router.get("/metrics", tags=["operations"], response_class=Response, dependencies=[PUBLIC])
async def metrics(metrics: MetricsDep) -> Response:
    """Prometheus metrics: requests and latency by model and status, batch sizes, versions."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@contextmanager
def prediction_errors() -> Iterator[None]:
    """What predicting a slice or a study may raise, as the API's errors (both routes)."""
    try:
        yield
    except ModelNotServedError as exc:
        raise APIError(400, "unknown_model", str(exc)) from None
    except EnsembleUnavailableError as exc:  # before its base class: retrying does not help
        raise APIError(503, "ensemble_unavailable", str(exc)) from None
    except ModelNotReadyError as exc:
        raise APIError(503, "not_ready", str(exc)) from None
    except UnrecognisedFileError as exc:
        raise APIError(415, "unsupported_media_type", str(exc)) from None
    except StudyError as exc:
        raise APIError(422, "invalid_study", str(exc)) from None
    except ArchiveError as exc:
        raise APIError(422, "invalid_archive", str(exc)) from None
    except SliceError as exc:  # the status of its cause, the message naming the slice
        cause = image_error(exc.cause)
        raise APIError(cause.status_code, cause.code, str(exc)) from None
    except ImageError as exc:
        raise image_error(exc) from None
    except DecodeQueueFullError as exc:
        raise APIError(503, "busy", str(exc), headers={"Retry-After": str(exc.retry_after_s)}) from None


async def _read_limited(upload: UploadFile, limit: int) -> bytes:
    chunks, total = [], 0
    while chunk := await upload.read(_READ_CHUNK):
        total += len(chunk)
        if total > limit:
            raise APIError(413, "upload_too_large", f"the upload exceeds the {limit} byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


@router.post("/predict", response_model=Prediction, responses=ERRORS, tags=["predict"],
             dependencies=[API_KEY, Depends(UploadLimit("max_upload_bytes"))])
async def predict(
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description=f"A CT slice: {describe_formats()}")],
    model: Annotated[str | None, Query(description=" | ".join([*architecture_names(), ENSEMBLE]))] = None,
    explain: Annotated[bool | None, Query(description="Add a Grad-CAM heatmap")] = None,
    model_form: Annotated[str | None, Form(alias="model")] = None,
    explain_form: Annotated[bool | None, Form(alias="explain")] = None,
) -> Prediction:
    """Classify one chest-CT slice as COVID or non-COVID (decision support, not a diagnosis)."""
    model_name = model or model_form or ENSEMBLE
    want_heatmap = bool(explain if explain is not None else explain_form)
    request_id = request.state.request_id
    request.state.model = model_name if model_name in registry.servable_names() else "invalid"
    data = await _read_limited(file, settings.max_upload_bytes)
    request.state.upload_sha256 = upload_digest([data])
    with prediction_errors():
        answer = await predict_upload(registry=registry, data=data, model=model_name,
                                      explain=want_heatmap, request_id=request_id)
    request.state.outcome, request.state.model_version = answer.outcome, answer.model_version
    return answer


@router.post("/predict/study", response_model=StudyPrediction, responses=ERRORS, tags=["predict"],
             dependencies=[API_KEY, Depends(UploadLimit("max_study_bytes"))])
async def predict_study_route(
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
    file: Annotated[list[UploadFile], File(description="The slices of one series (several `file` parts, "
                                                       "DICOM/PNG/JPEG), or one ZIP of the series")],
    model: Annotated[str | None, Query(description=" | ".join([*architecture_names(), ENSEMBLE]))] = None,
    explain: Annotated[bool | None, Query(description="Grad-CAM heatmaps of the most suspicious slices")] = None,
    model_form: Annotated[str | None, Form(alias="model")] = None,
    explain_form: Annotated[bool | None, Form(alias="explain")] = None,
) -> StudyPrediction:
    """Classify a whole study: every slice (ordered along the body; slices without lungs are
    skipped with the reason) and one verdict for the study (decision support, not a diagnosis)."""
    model_name = model or model_form or ENSEMBLE
    explain_value = explain if explain is not None else explain_form
    want_heatmaps = True if explain_value is None else bool(explain_value)
    request.state.model = model_name if model_name in registry.servable_names() else "invalid"
    parts, remaining = [], settings.max_study_bytes
    for upload in file:
        try:
            data = await _read_limited(upload, remaining)
        except APIError:
            raise APIError(413, "upload_too_large", f"the study's files exceed the {settings.max_study_bytes} byte "
                                                    "limit (INFERENCE_MAX_STUDY_BYTES)") from None
        remaining -= len(data)
        parts.append(data)
    request.state.upload_sha256 = upload_digest(parts)
    limits = StudyLimits(max_slices=settings.max_study_slices, max_total_bytes=settings.max_study_bytes,
                         max_ratio=settings.max_zip_ratio)
    with prediction_errors():
        blobs = await run_in_threadpool(study_blobs, parts, limits)  # unpacking a ZIP: off the event loop
        answer = await predict_study(registry=registry, blobs=blobs, model=model_name, explain=want_heatmaps,
                                     request_id=request.state.request_id, limits=limits)
    request.state.outcome, request.state.model_version = answer.outcome, answer.model_version
    return answer
