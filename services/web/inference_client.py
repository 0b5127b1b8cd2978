"""HTTP client for the inference service (contract: GET /healthz, /readyz, /models; POST /predict).

Answers are parsed with the service's own response models (`ctscan.schemas`). Every failure
becomes an `InferenceError` subclass whose message is fit to show a clinician; routes never
see a `requests` exception or a traceback. The page calls with its own API key (X-API-Key)
and its own id of each request (X-Request-ID; the service keeps it as the client's id beside
its own, which comes back in the answer), and names the signed-in person (X-CTScan-User): the
service believes that from the page's key only, and limits and audits each person apart.
"""

from __future__ import annotations

import hashlib
from typing import Any

import requests
from pydantic import ValidationError
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from ctscan.access.keys_and_accounts import check_name
from ctscan.errors import CTScanError
from ctscan.models import ENSEMBLE, architecture_names
from ctscan.schemas import ModelsResponse, Prediction, StudyPrediction

KEY_HEADER = "X-API-Key"
REQUEST_ID_HEADER = "X-Request-ID"
USER_HEADER = "X-CTScan-User"


class InferenceError(CTScanError):
    """The analysis could not be done; `status` is the HTTP status the web page answers with,
    `outcome` what the audit trail records."""

    status = 502
    outcome = "error"


class InferenceUnavailableError(InferenceError):
    status = 503
    outcome = "unavailable"


class EnsembleUnavailableError(InferenceUnavailableError):
    """The ensemble is not served (no calibration, or a version it pins cannot be loaded);
    the single models answer."""


ENSEMBLE_UNAVAILABLE_MESSAGE = (
    "The combined analysis of all models (the ensemble) is switched off for now: it has not "
    "been checked on validation data for the models it would combine, or one of them cannot be "
    "loaded. Trying again will not help until an administrator fixes it. Please choose a single "
    "model and analyse the image again.")


class InferenceTimeoutError(InferenceError):
    status = 504
    outcome = "timeout"


class InferenceCredentialsError(InferenceError):
    """The service refused the page's API key (missing, unknown, revoked or expired)."""

    outcome = "unauthorised"


class InferenceBusyError(InferenceError):
    """The service rate-limits this person (or the page's key): too many requests a minute."""

    status = 429
    outcome = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InferenceRejectedError(InferenceError):
    """The service refused the image or the request (4xx, or 503 while models load)."""

    def __init__(self, message: str, *, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.outcome = code


class InferenceClient:
    def __init__(self, base_url: str, *, connect_timeout_s: float = 3.0, read_timeout_s: float = 60.0,
                 retries: int = 2, study_timeout_s: float = 600.0, api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = (connect_timeout_s, read_timeout_s)
        self.study_timeout = (connect_timeout_s, study_timeout_s)
        # Retry only what is safe and likely to pass on a second try: refused connections
        # and a service that says it is still loading (502/503/504). A slow read is not
        # retried: the clinician would wait twice the timeout for the same answer.
        # POST /predict is retried too because it is a pure function of the image.
        retry = Retry(
            total=retries, connect=retries, read=False, status=retries, other=0,
            backoff_factor=0.3, status_forcelist=(502, 503, 504),
            allowed_methods=frozenset({"GET", "POST"}), raise_on_status=False,
            respect_retry_after_header=False,
        )
        self.session = requests.Session()
        adapter = HTTPAdapter(max_retries=retry)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        if api_key:
            self.session.headers[KEY_HEADER] = api_key

    # --- low level --------------------------------------------------------------------
    def _request(self, method: str, path: str, *, timeout: tuple[float, float] | None = None,
                 **kwargs: Any) -> requests.Response:
        try:
            return self.session.request(method, f"{self.base_url}{path}", timeout=timeout or self.timeout,
                                        **kwargs)
        except requests.Timeout:
            raise InferenceTimeoutError(
                "The analysis service is taking too long to answer. Please try again in a "
                "moment; if this keeps happening, tell the service desk.") from None
        except (requests.ConnectionError, requests.exceptions.RetryError):
            raise InferenceUnavailableError(
                "The analysis service cannot be reached right now. Please try again in a few "
                "minutes; if this keeps happening, tell the service desk.") from None
        except requests.RequestException:
            raise InferenceError("The analysis service could not be contacted.") from None

    @staticmethod
    def _error_from(response: requests.Response, *, study: bool = False) -> InferenceError:
        code, message = "error", ""
        try:
            body = response.json()
            code = str(body["error"].get("code", code))
            message = str(body["error"].get("message", ""))
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
        status = response.status_code
        if status == 401:
            # The page's key is missing, unknown or revoked: nothing a clinician can fix.
            return InferenceCredentialsError(
                "The analysis service refused this page's credentials; tell the service desk.")
        if status == 429:
            wait = _retry_after(response)
            return InferenceBusyError(f"Too many requests: please wait {wait} s before you try again.",
                                      retry_after_s=wait)
        if study and status in (413, 415, 422):  # the service names the slice or entry at fault
            return InferenceRejectedError(f"This study could not be analysed: {message or code}.",
                                          status=status, code=code)
        if status == 413:
            return InferenceRejectedError(
                "This file is too large for the analysis service. Please send a single CT slice.",
                status=413, code=code)
        if status in (415, 422):
            detail = f" ({message})" if message else ""
            return InferenceRejectedError(
                "This file could not be read as a CT image. Please upload a PNG, JPEG or DICOM "
                f"slice{detail}.", status=415, code=code)
        if status == 400:
            return InferenceRejectedError(message or "The analysis service refused the request.",
                                          status=400, code=code)
        if status == 503 and code == "ensemble_unavailable":
            return EnsembleUnavailableError(ENSEMBLE_UNAVAILABLE_MESSAGE)
        if status == 503:
            return InferenceUnavailableError(
                "The analysis service is starting up or not ready. Please try again in a minute.")
        return InferenceError("The analysis service had a problem with this request. Please try again.")

    # --- contract ---------------------------------------------------------------------
    def predict(self, *, data: bytes, filename: str, model: str = ENSEMBLE, explain: bool = True,
                request_id: str | None = None, user: str | None = None) -> Prediction:
        if model != ENSEMBLE and model not in architecture_names():
            raise InferenceRejectedError(f"Unknown model {model!r}.", status=400, code="unknown_model")
        response = self._request(
            "POST", "/predict", params={"model": model, "explain": "true" if explain else "false"},
            files={"file": (filename, data, "application/octet-stream")}, headers=_named(request_id, user),
        )
        if response.status_code != 200:
            raise self._error_from(response)
        try:
            result = response.json()
        except ValueError:
            raise InferenceError("The analysis service sent an answer that could not be read.") from None
        try:
            return Prediction.model_validate(result)
        except ValidationError:
            raise InferenceError("The analysis service sent an incomplete answer.") from None

    def predict_study(self, *, files: list[bytes], model: str = ENSEMBLE, explain: bool = True,
                      request_id: str | None = None, user: str | None = None) -> StudyPrediction:
        """A whole study: several slices, or one ZIP of a series (file names are not sent)."""
        if model != ENSEMBLE and model not in architecture_names():
            raise InferenceRejectedError(f"Unknown model {model!r}.", status=400, code="unknown_model")
        response = self._request(
            "POST", "/predict/study", timeout=self.study_timeout,
            params={"model": model, "explain": "true" if explain else "false"},
            files=[("file", (f"part{index}", data, "application/octet-stream")) for index, data in enumerate(files)],
            headers=_named(request_id, user),
        )
        if response.status_code != 200:
            raise self._error_from(response, study=True)
        try:
            return StudyPrediction.model_validate(response.json())
        except (ValueError, ValidationError):
            raise InferenceError("The analysis service sent an answer that could not be read.") from None

    def models(self) -> ModelsResponse:
        response = self._request("GET", "/models", timeout=(self.timeout[0], 10.0))
        if response.status_code != 200:
            raise self._error_from(response)
        try:
            return ModelsResponse.model_validate(response.json())
        except (ValueError, ValidationError):
            raise InferenceError("The analysis service sent an answer that could not be read.") from None

    def ready(self) -> bool:
        """True when /readyz answers 200; never raises (used for status badges and probes)."""
        try:
            # No retries here: a status badge must answer at once.
            response = requests.get(f"{self.base_url}/readyz", timeout=(1.0, 2.0))
        except requests.RequestException:
            return False
        return response.status_code == 200


def _named(request_id: str | None, user: str | None = None) -> dict[str, str]:
    headers = {REQUEST_ID_HEADER: request_id} if request_id else {}
    if user:
        headers[USER_HEADER] = api_user_name(user)
    return headers


def api_user_name(user: str) -> str:
    """The person's name as the service accepts it; a name a proxy gave that is not a valid
    account name (spaces, ...) goes as a stable digest of it (the web's audit has the name)."""
    try:
        return check_name("user", user)
    except CTScanError:
        return "u-" + hashlib.sha256(user.encode()).hexdigest()[:24]


def _retry_after(response: requests.Response) -> int:
    """Seconds from the Retry-After header (the service sends whole seconds); 60 without one."""
    value = response.headers.get("Retry-After", "").strip()
    return max(1, min(int(value), 3600)) if value.isdigit() else 60
