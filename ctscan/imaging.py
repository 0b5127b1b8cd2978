"""Decoding CT images into the one colour mode every model sees.

The UCSD data mixes RGBA, RGB and L files, and the mix differs by class, so a model could
learn the file format instead of the lungs. Everything is therefore reduced to 8-bit
greyscale (alpha composited on black) and repeated into three channels, both in training
and in serving. DICOM is windowed to the lung window; its header (patient data) is never
kept, logged or returned.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image, ImageOps

from ctscan.errors import ImageTooLargeError, UnsupportedImageError

# Lung window in Hounsfield units (centre -600, width 1500): the usual chest-CT reading window.
LUNG_WINDOW_CENTER = -600.0
LUNG_WINDOW_WIDTH = 1500.0

DEFAULT_MAX_PIXELS = 50_000_000  # about 7000 x 7000; CT slices are 512 x 512
DEFAULT_MAX_SIDE = 10_000
MIN_SIDE = 8

_DICOM_MAGIC_OFFSET = 128


@dataclass(frozen=True)
class DecodedImage:
    """An image as the models see it: 8-bit greyscale, plus where it came from."""

    grey: np.ndarray  # (H, W) uint8
    source_format: str  # "PNG", "JPEG" or "DICOM"

    @cached_property
    def pixels(self) -> np.ndarray:
        """(H, W, 3) uint8: the greyscale repeated into the three channels the models take."""
        return np.repeat(self.grey[:, :, None], 3, axis=2)


def is_dicom(data: bytes) -> bool:
    return len(data) >= _DICOM_MAGIC_OFFSET + 4 and data[128:132] == b"DICM"


def to_model_grey(image: Image.Image) -> np.ndarray:
    """Any PIL image -> (H, W) uint8 greyscale, the one colour mode every model sees."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit or float greyscale: stretch its own range to 0..255.
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = np.zeros_like(array) if high <= low else (array - low) / (high - low) * 255.0
        grey = scaled.round().astype(np.uint8)
    else:
        if image.mode == "CMYK":
            image = image.convert("RGB")
        grey = np.asarray(image if image.mode == "L" else image.convert("L"), dtype=np.uint8)
    return grey


def _check_dimensions(width: int, height: int, *, max_pixels: int, max_side: int) -> None:
    if width < MIN_SIDE or height < MIN_SIDE:
        raise UnsupportedImageError(
            f"image is {width}x{height} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed"
        )
    if width > max_side or height > max_side or width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} pixels; the limit is {max_side} per side and "
            f"{max_pixels} pixels in all"
        )


def decode_raster(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int = DEFAULT_MAX_SIDE
) -> DecodedImage:
    """PNG or JPEG bytes -> DecodedImage; dimensions are checked before pixels are decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data))
            image_format = image.format or ""
            if image_format not in ("PNG", "JPEG"):
                raise UnsupportedImageError(
                    f"unsupported image type {image_format or 'unknown'}; send PNG, JPEG or DICOM"
                )
            _check_dimensions(*image.size, max_pixels=max_pixels, max_side=max_side)
            if getattr(image, "n_frames", 1) > 1:
                raise UnsupportedImageError(
                    "animated or multi-frame images are not supported; send one CT slice"
                )
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # in place: no copy per request
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image refused as a decompression bomb: {exc}") from None
    except UnsupportedImageError:
        raise
    except ImageTooLargeError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UnsupportedImageError(f"cannot decode image: {exc}") from None
    return DecodedImage(grey=to_model_grey(image), source_format=image_format)


def decode_dicom(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int = DEFAULT_MAX_SIDE
) -> DecodedImage:
    """DICOM bytes -> lung-windowed DecodedImage. Only pixel-related tags are read."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(io.BytesIO(data), force=False)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise UnsupportedImageError(f"cannot read DICOM file: {type(exc).__name__}") from None
    if "PixelData" not in dataset:
        raise UnsupportedImageError("DICOM file has no pixel data")
    rows, columns = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
    _check_dimensions(columns, rows, max_pixels=max_pixels, max_side=max_side)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise UnsupportedImageError("multi-frame DICOM is not supported; send one CT slice")
    try:
        raw = dataset.pixel_array.astype(np.float64)
    except Exception as exc:  # pydicom raises many types for broken pixel data
        raise UnsupportedImageError(f"cannot decode DICOM pixel data: {type(exc).__name__}") from None
    if raw.ndim == 3 and raw.shape[-1] in (3, 4):
        raw = raw[..., :3].mean(axis=-1)
    if raw.ndim != 2:
        raise UnsupportedImageError(f"DICOM pixel array has unsupported shape {raw.shape}")
    slope = float(dataset.get("RescaleSlope", 1) or 1)
    intercept = float(dataset.get("RescaleIntercept", 0) or 0)
    hounsfield = raw * slope + intercept
    low = LUNG_WINDOW_CENTER - LUNG_WINDOW_WIDTH / 2
    windowed = np.clip((hounsfield - low) / LUNG_WINDOW_WIDTH, 0.0, 1.0) * 255.0
    grey = windowed.round().astype(np.uint8)
    return DecodedImage(grey=grey, source_format="DICOM")


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int = DEFAULT_MAX_SIDE
) -> DecodedImage:
    """PNG, JPEG or DICOM bytes -> DecodedImage, raising ImageError subclasses on bad input."""
    if not data:
        raise UnsupportedImageError("the file is empty")
    if is_dicom(data):
        return decode_dicom(data, max_pixels=max_pixels, max_side=max_side)
    return decode_raster(data, max_pixels=max_pixels, max_side=max_side)


def resize_for_model(pixels: np.ndarray, size: int) -> np.ndarray:
    """(H, W) greyscale or (H, W, 3) uint8 -> (size, size, 3) float32 0..255, bilinear.

    Greyscale is resized once and then repeated: the same numbers as resizing the three
    identical channels, at a third of the work (this runs for every request).
    """
    resized = np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR))
    if resized.ndim == 2:
        resized = np.repeat(resized[:, :, None], 3, axis=2)
    return resized.astype(np.float32)
