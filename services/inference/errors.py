"""JSON errors of the inference API: {"error": {"code", "message"}} with the right status."""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ctscan.errors import ImageTooLargeError, UnsupportedImageError, UnsupportedTransferSyntaxError

logger = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status_code: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.headers = headers


def error_response(status_code: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status_code,
                        headers=headers)


def image_error(exc: Exception) -> APIError:
    """Decoding failures -> 413 (too many pixels), 415 (a DICOM compression that cannot be
    decoded here) or 422 (broken / unsupported content)."""
    if isinstance(exc, ImageTooLargeError):
        return APIError(413, "image_too_large", str(exc))
    if isinstance(exc, UnsupportedTransferSyntaxError):
        return APIError(415, "unsupported_transfer_syntax", str(exc))
    if isinstance(exc, UnsupportedImageError):
        return APIError(422, "undecodable_image", str(exc))
    return APIError(422, "undecodable_image", "the image cannot be decoded")


def _validation_message(exc: RequestValidationError) -> str:
    # Only locations and messages: inputs may be (parts of) the upload.
    parts = []
    for error in exc.errors()[:5]:
        location = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        parts.append(f"{location or 'request'}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        request.state.error_code = exc.code  # for the audit trail
        return error_response(exc.status_code, exc.code, exc.message, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        request.state.error_code = "invalid_request"
        return error_response(422, "invalid_request", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        try:
            code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
        except ValueError:
            code = "http_error"
        if exc.status_code == 413:  # a streamed upload past its limit (app.UploadTooLarge)
            code = "upload_too_large"
        request.state.error_code = code
        return error_response(exc.status_code, code, str(exc.detail),
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", "-")
        logger.exception("request %s failed", request_id)
        return error_response(500, "internal_error",
                              f"unexpected server error (request {request_id}); it has been logged")
