"""Input formats the services accept, recognised by their bytes (never by name or MIME type).

Each format says how to recognise it (`matches`: magic bytes), how to decode it into the one
colour mode every model sees (`decode` -> `ctscan.imaging.decoding.DecodedImage`) and whether a
browser can show it as it is. The inference API and the web page ask this registry, so a new
format is one `register_format` call (see docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ctscan.errors import UnsupportedImageError
from ctscan.imaging.decoding import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SIDE,
    DecodedImage,
    decode_dicom,
    decode_raster,
    is_dicom,
)

Decoder = Callable[..., DecodedImage]  # (data, *, max_pixels, max_side) -> DecodedImage


@dataclass(frozen=True)
class InputFormat:
    name: str  # reported back as `source_format`
    media_type: str
    extensions: tuple[str, ...]
    matches: Callable[[bytes], bool]
    decoder: Decoder
    browser_displayable: bool = False  # shown as uploaded on the result page; else rendered to PNG
    label: str = ""  # how the page names it, when not just `name` ("DICOM (.dcm)")

    def decode(self, data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_side: int = DEFAULT_MAX_SIDE) -> DecodedImage:
        return self.decoder(data, max_pixels=max_pixels, max_side=max_side)


_FORMATS: dict[str, InputFormat] = {}


def register_format(input_format: InputFormat) -> None:
    _FORMATS[input_format.name] = input_format


def unregister_format(name: str) -> None:
    _FORMATS.pop(name, None)


def format_names() -> tuple[str, ...]:
    return tuple(_FORMATS)


def accepted_extensions() -> tuple[str, ...]:
    return tuple(extension for fmt in _FORMATS.values() for extension in fmt.extensions)


def sniff(data: bytes) -> InputFormat | None:
    """The registered format these bytes are, or None."""
    return next((fmt for fmt in _FORMATS.values() if fmt.matches(data)), None)


def describe_formats(*, for_people: bool = False) -> str:
    """"PNG, JPEG or DICOM" (with `for_people`, each format's label)."""
    names = [(fmt.label or fmt.name) if for_people else fmt.name for fmt in _FORMATS.values()]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def accept_attribute() -> str:
    """The upload field's `accept`: every extension, then every media type."""
    return ",".join([*accepted_extensions(), *(fmt.media_type for fmt in _FORMATS.values())])


def decode(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int = DEFAULT_MAX_SIDE) -> DecodedImage:
    """Bytes of any registered format -> DecodedImage, raising ImageError subclasses on bad input."""
    if not data:
        raise UnsupportedImageError("the file is empty")
    fmt = sniff(data)
    if fmt is None:
        raise UnsupportedImageError(f"the file is not a {describe_formats()} image")
    return fmt.decode(data, max_pixels=max_pixels, max_side=max_side)


register_format(InputFormat("PNG", "image/png", (".png",), lambda data: data.startswith(b"\x89PNG\r\n\x1a\n"),
                            decode_raster, browser_displayable=True))
register_format(InputFormat("JPEG", "image/jpeg", (".jpg", ".jpeg"), lambda data: data.startswith(b"\xff\xd8\xff"),
                            decode_raster, browser_displayable=True))
register_format(InputFormat("DICOM", "application/dicom", (".dcm", ".dicom"), is_dicom, decode_dicom,
                            label="DICOM (.dcm)"))
