"""Checks on an uploaded CT image and the preview shown back to the clinician.

Uploads are kept only for the length of one request; the original file name (which may carry
a patient's name) is neither shown, logged nor sent on. `UPLOAD_STORAGE_NOTE` is what the
pages say about it: one sentence, to change with the behaviour.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

from ctscan.errors import ImageError, UnsupportedImageError
from ctscan.imaging.formats import InputFormat, describe_formats, sniff

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# What the pages say about where uploads go, to change with the behaviour (services/web/app.py,
# main.py; services/inference/app.py): a slice's body and its parts stay in memory in both
# services; a study's body above a slice's limit is buffered by waitress in TMPDIR while the
# request lasts, which compose and Kubernetes mount as a memory-backed tmpfs.
UPLOAD_STORAGE_NOTE = "The image is analysed in memory, never written to disk, and not kept after the analysis."
STUDY_STORAGE_NOTE = ("The files are analysed in memory and not kept after the analysis; while a large study is "
                      "received it is buffered in the web server's temporary folder (memory-backed in the compose "
                      "and Kubernetes deployments).")
FOOTER_STORAGE_NOTE = "Uploads are not kept after the analysis; a single slice never touches the disk."


def unsupported_message() -> str:
    return ("This file type is not supported. Please upload a single CT slice as a "
            f"{describe_formats(for_people=True)} file.")


@dataclass(frozen=True)
class Upload:
    data: bytes
    input_format: InputFormat

    @property
    def source_format(self) -> str:
        return self.input_format.name

    @property
    def neutral_filename(self) -> str:
        # Sent to the inference service instead of the user's file name.
        return f"upload{self.input_format.extensions[0]}"


def check_upload(*, data: bytes) -> Upload:
    """Raise UnsupportedImageError (with a message for people) unless `data` is an accepted
    format, judged by its bytes (never by the name or the browser's MIME type)."""
    if not data:
        raise UnsupportedImageError("The file is empty. Please choose a CT image to upload.")
    input_format = sniff(data)
    if input_format is None:
        raise UnsupportedImageError(unsupported_message())
    return Upload(data=data, input_format=input_format)


def preview_data_url(upload: Upload) -> str | None:
    """A data: URL to show the upload beside its heatmap, without storing it anywhere.

    PNG and JPEG are shown as sent. Browsers cannot draw DICOM (and other formats), so its
    pixels are rendered (lung window, no header tags) to a PNG; None when even that fails.
    """
    if upload.input_format.browser_displayable:
        mime = upload.input_format.media_type
        return f"data:{mime};base64,{base64.b64encode(upload.data).decode('ascii')}"
    try:
        from PIL import Image

        decoded = upload.input_format.decode(upload.data)
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
