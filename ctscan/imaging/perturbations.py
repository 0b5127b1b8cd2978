"""Benign changes to a decoded slice: what a slice goes through between hospitals, scanners
and exports, and nothing that says anything about the lungs.

`PERTURBATIONS` are one change each (brightness, contrast, gamma, window level and width, JPEG
re-compression, rescaling 0.5x and 2x, a small rotation and shift, noise), applied by `perturb`
before a model's own preprocessing, exactly as an upload would arrive; evaluation measures a
model under them (`ctscan.evaluation.robustness`). `change_slice` applies several at once:
training's source variants (`ctscan.data.dataset`). DICOM slices are changed in Hounsfield
units where the change exists there (offset, contrast, noise, geometry); display-only changes
(gamma, window, JPEG) are skipped for them. Numpy and Pillow only, like the rest of imaging.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from ctscan.imaging.decoding import DecodedImage, lung_window


@dataclass(frozen=True)
class Perturbation:
    name: str
    raster: Callable[[np.ndarray], np.ndarray] | None  # grey uint8 -> grey uint8
    hounsfield: Callable[[np.ndarray], np.ndarray] | None  # HU float32 -> HU float32


def _clip8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.round(values), 0, 255).astype(np.uint8)


def _geometric(array: np.ndarray, transform: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    mode = "F" if array.dtype != np.uint8 else "L"
    image = Image.fromarray(array.astype(np.float32) if mode == "F" else array, mode=mode)
    return np.asarray(transform(image)).astype(array.dtype)


def _rescale(factor: float) -> Callable[[np.ndarray], np.ndarray]:
    def apply(array: np.ndarray) -> np.ndarray:
        height, width = array.shape
        size = (max(8, round(width * factor)), max(8, round(height * factor)))
        return _geometric(array, lambda image: image.resize(size, Image.Resampling.BILINEAR))

    return apply


def _rotate(degrees: float, fill: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda array: _geometric(array, lambda image: image.rotate(
        degrees, resample=Image.Resampling.BILINEAR, fillcolor=fill))


def _shift(share: float, fill: float) -> Callable[[np.ndarray], np.ndarray]:
    def apply(array: np.ndarray) -> np.ndarray:
        dx, dy = round(array.shape[1] * share), round(array.shape[0] * share)
        return _geometric(array, lambda image: image.transform(
            image.size, Image.Transform.AFFINE, (1, 0, -dx, 0, 1, -dy), fillcolor=fill))

    return apply


def _jpeg(quality: int) -> Callable[[np.ndarray], np.ndarray]:
    def apply(grey: np.ndarray) -> np.ndarray:
        buffer = io.BytesIO()
        Image.fromarray(grey).save(buffer, format="JPEG", quality=quality)
        return np.asarray(Image.open(buffer).convert("L"))

    return apply


def _noise(sigma: float, seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    def apply(array: np.ndarray) -> np.ndarray:
        noisy = array.astype(np.float32) + np.random.default_rng(seed).normal(0, sigma, array.shape)
        return _clip8(noisy) if array.dtype == np.uint8 else noisy.astype(np.float32)

    return apply


AIR_HU = -1024.0
PERTURBATIONS: tuple[Perturbation, ...] = (
    Perturbation("brightness +20", lambda g: _clip8(g.astype(np.float32) + 20), lambda h: h + 50),
    Perturbation("brightness -20", lambda g: _clip8(g.astype(np.float32) - 20), lambda h: h - 50),
    Perturbation("contrast x1.25", lambda g: _clip8((g - g.mean()) * 1.25 + g.mean()),
                 lambda h: (h + 600) * 1.25 - 600),
    Perturbation("contrast x0.8", lambda g: _clip8((g - g.mean()) * 0.8 + g.mean()),
                 lambda h: (h + 600) * 0.8 - 600),
    Perturbation("gamma 0.8", lambda g: _clip8(255 * (g / 255.0) ** 0.8), None),
    Perturbation("gamma 1.25", lambda g: _clip8(255 * (g / 255.0) ** 1.25), None),
    Perturbation("window narrower (x1.3)", lambda g: _clip8((g.astype(np.float32) - 128) * 1.3 + 128), None),
    Perturbation("window level +10%", lambda g: _clip8((g.astype(np.float32) - 25) * 1.1), None),
    Perturbation("jpeg q75", _jpeg(75), None),
    Perturbation("rescale 0.5x", _rescale(0.5), _rescale(0.5)),
    Perturbation("rescale 2x", _rescale(2.0), _rescale(2.0)),
    Perturbation("rotate 5 deg", _rotate(5.0, 0), _rotate(5.0, AIR_HU)),
    Perturbation("shift 5%", _shift(0.05, 0), _shift(0.05, AIR_HU)),
    Perturbation("noise", _noise(5.0), _noise(20.0)),
)


def perturb(decoded: DecodedImage, perturbation: Perturbation) -> DecodedImage | None:
    """The slice after one benign change; None when the change does not apply to it."""
    if decoded.hounsfield is not None:
        if perturbation.hounsfield is None:
            return None
        hounsfield = perturbation.hounsfield(decoded.hounsfield).astype(np.float32)
        return replace(decoded, hounsfield=hounsfield, grey=lung_window(hounsfield))
    if perturbation.raster is None:
        return None
    return replace(decoded, grey=perturbation.raster(decoded.grey))


def change_slice(decoded: DecodedImage, *, shift: tuple[float, float] = (0.0, 0.0), degrees: float = 0.0,
                 scale: float = 1.0, contrast: float = 1.0, brightness: float = 0.0, gamma: float = 1.0,
                 jpeg_quality: int | None = None) -> DecodedImage:
    """Several benign changes at once (training's source variants). DICOM slices change in
    Hounsfield units (brightness x2.5 HU per grey level, contrast about -600 HU); gamma and
    JPEG apply to screenshots only."""
    hounsfield = decoded.hounsfield is not None
    array: np.ndarray = decoded.hounsfield if decoded.hounsfield is not None else decoded.grey
    fill = AIR_HU if hounsfield else 0
    if scale != 1.0:
        array = _rescale(scale)(array)
    if degrees:
        array = _rotate(degrees, fill)(array)
    if shift != (0.0, 0.0):
        dx, dy = round(array.shape[1] * shift[0]), round(array.shape[0] * shift[1])
        array = _geometric(array, lambda image: image.transform(
            image.size, Image.Transform.AFFINE, (1, 0, -dx, 0, 1, -dy), fillcolor=fill))
    if hounsfield:
        changed = ((array.astype(np.float32) + 600) * contrast - 600 + 2.5 * brightness).astype(np.float32)
        return replace(decoded, hounsfield=changed, grey=lung_window(changed))
    values = array.astype(np.float32)
    values = (values - values.mean()) * contrast + values.mean() + brightness
    grey = _clip8(255 * (np.clip(values, 0, 255) / 255.0) ** gamma)
    if jpeg_quality is not None:
        grey = _jpeg(jpeg_quality)(grey)
    return replace(decoded, grey=grey)
