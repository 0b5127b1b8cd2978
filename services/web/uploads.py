"""Checks on an uploaded CT image and the preview shown back to the clinician.

Uploads live only in memory for the length of one request: nothing is written to disk, the
original file name (which may carry a patient's name) is neither shown, logged nor sent on.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

from ctscan.errors import ImageError, UnsupportedImageError
from ctscan.imaging import decode_image, is_dicom

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
ACCEPTED_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
# Neutral names sent to the inference service instead of the user's file name.
_NEUTRAL_NAMES = {"PNG": "upload.png", "JPEG": "upload.jpg", "DICOM": "upload.dcm"}
UNSUPPORTED_MESSAGE = ("This file type is not supported. Please upload a single CT slice as a "
                       "PNG, JPEG or DICOM (.dcm) file.")


@dataclass(frozen=True)
class Upload:
    data: bytes
    source_format: str  # "PNG", "JPEG" or "DICOM"

    @property
    def neutral_filename(self) -> str:
        return _NEUTRAL_NAMES[self.source_format]


def sniff_format(data: bytes) -> str | None:
    """The format the bytes really are (never trusting the name or the browser's MIME type)."""
    if data.startswith(_PNG_MAGIC):
        return "PNG"
    if data.startswith(_JPEG_MAGIC):
        return "JPEG"
    if is_dicom(data):
        return "DICOM"
    return None


def check_upload(*, data: bytes) -> Upload:
    """Raise UnsupportedImageError (with a message for people) unless `data` is PNG/JPEG/DICOM."""
    if not data:
        raise UnsupportedImageError("The file is empty. Please choose a CT image to upload.")
    source_format = sniff_format(data)
    if source_format is None:
        raise UnsupportedImageError(UNSUPPORTED_MESSAGE)
    return Upload(data=data, source_format=source_format)


def preview_data_url(upload: Upload) -> str | None:
    """A data: URL to show the upload beside its heatmap, without storing it anywhere.

    PNG and JPEG are shown as sent. Browsers cannot draw DICOM, so its pixels are rendered
    (lung window, no header tags) to a PNG; None when even that fails.
    """
    if upload.source_format in ("PNG", "JPEG"):
        mime = "image/png" if upload.source_format == "PNG" else "image/jpeg"
        return f"data:{mime};base64,{base64.b64encode(upload.data).decode('ascii')}"
    try:
        from PIL import Image

        decoded = decode_image(upload.data)
        buffer = io.BytesIO()
        Image.fromarray(decoded.pixels).save(buffer, format="PNG")
    except (ImageError, OSError, ValueError):
        return None
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def png_data_url(base64_png: str | None) -> str | None:
    """The inference service's base64 heatmap as a data: URL, if it looks like a PNG."""
    if not base64_png:
        return None
    try:
        head = base64.b64decode(base64_png[:16] + "=" * (-len(base64_png[:16]) % 4), validate=False)
    except ValueError:
        return None
    if not head.startswith(_PNG_MAGIC[:4]):
        return None
    return f"data:image/png;base64,{base64_png}"
