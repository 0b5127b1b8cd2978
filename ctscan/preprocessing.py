"""What a model sees of a CT slice: one function per preprocessing version, shared by
training, evaluation and serving (no train/serve skew).

`lung-v1` finds the body and the lungs with classical image processing (thresholds,
connected components, morphology), blanks what lies outside the body (text, rulers, the
table), standardises intensity from the lungs' air and the body's soft tissue (so window,
brightness and contrast settings stop carrying information) and crops to the lungs with a
margin, padded to a square. DICOM starts from Hounsfield units, with fixed physical
thresholds; PNG/JPEG (unknown window) use Otsu's threshold. A slice without lungs
(abdomen, neck, not a CT) is flagged with the reason instead of being cropped.

`legacy` is the whole image in greyscale, as the first release was trained: model cards
name their preprocessing, and a served model always gets the one it was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image

from ctscan.errors import ModelError
from ctscan.imaging import DecodedImage, resize_for_model

LEGACY = "legacy"
LUNG_V1 = "lung-v1"
LUNGMASK_V1 = "lungmask-v1"  # lung-v1, and blank beyond LUNGMASK_MARGIN of the lungs
DEFAULT_PREPROCESSING = LUNG_V1

# Segmentation runs on a copy whose longest side is at most this (fast, and plenty for masks).
WORK_SIDE = 256
# A slice shows lungs when the dark regions enclosed by the body cover at least this share
# of the body (UCSD chest slices: 10-60 %; lung bases above the liver and the apices drop
# below it).
MIN_LUNG_FRACTION = 0.06
# Dark regions smaller than this share of the body are gas, vessels or noise, not lung.
MIN_COMPONENT_FRACTION = 0.008
# A dark region in a frame corner smaller than this share of the body is a crop's outside air.
CORNER_AIR_FRACTION = 0.04
CROP_MARGIN = 0.08  # of the lung box's longer side, on every side
LUNGMASK_MARGIN = 0.04  # of the crop's side: the lungs' edge and the pleura stay visible
# Standardised intensities: lung air and soft tissue land here whatever the window was.
AIR_LEVEL = 0.08
TISSUE_LEVEL = 1.0  # denser than soft tissue (bone, contrast agent) says nothing here: saturate
# DICOM: fixed physical thresholds and the window the standardisation starts from.
HU_TISSUE = -400.0  # denser than this is body (soft tissue, bone, consolidation)
HU_WINDOW = (-1100.0, 300.0)


@dataclass(frozen=True)
class LungFindings:
    """What segmentation found: the gate's signals and where the crop came from."""

    body_fraction: float  # body area / image area
    lung_fraction: float  # lung area / body area
    lung_components: int
    largest_lung_fraction: float  # largest lung region / body area
    lung_balance: float  # smaller / larger of the left and right halves' lung area (0..1)
    posterior_fraction: float  # lung area in the body's lower (posterior) half / body area
    crop_box: tuple[int, int, int, int]  # top, left, bottom, right in the decoded image
    contrast: float  # standardisation: soft-tissue anchor minus air anchor (0..1 scale)

    def as_dict(self) -> dict[str, Any]:
        return {
            "body_fraction": round(self.body_fraction, 4),
            "lung_fraction": round(self.lung_fraction, 4),
            "lung_components": self.lung_components,
            "largest_lung_fraction": round(self.largest_lung_fraction, 4),
            "lung_balance": round(self.lung_balance, 4),
            "posterior_fraction": round(self.posterior_fraction, 4),
            "contrast": round(self.contrast, 4),
        }


@dataclass(frozen=True)
class PreparedSlice:
    """A slice ready for the models: `grey` (square crop, uint8) and what was found."""

    grey: np.ndarray
    lungs_visible: bool
    reason: str | None  # why lungs_visible is False
    findings: LungFindings | None  # None for `legacy`
    lung_mask: np.ndarray | None  # bool, at `grey`'s resolution (None for `legacy`)
    # bool, the body on the whole decoded slice at working resolution (None for `legacy`):
    # where a heatmap may be drawn
    body_mask: np.ndarray | None = None

    @property
    def view(self) -> tuple[int, int, int, int] | None:
        """Where `grey` lies on the decoded slice (top, left, bottom, right); None: the whole
        slice, resized (`legacy`)."""
        return self.findings.crop_box if self.findings is not None else None

    def model_input(self, size: int) -> np.ndarray:
        """(size, size, 3) float32 0..255, what `keras`/ONNX take."""
        return resize_for_model(self.grey, size)

    def lung_mask_at(self, size: int) -> np.ndarray | None:
        if self.lung_mask is None:
            return None
        image = Image.fromarray(self.lung_mask.astype(np.uint8) * 255)
        return np.asarray(image.resize((size, size), Image.Resampling.NEAREST)) > 127


class Preprocessor(Protocol):
    name: str

    def __call__(self, decoded: DecodedImage) -> PreparedSlice: ...


class LegacyPreprocessor:
    """The whole image, greyscale, unchanged (release 1)."""

    name = LEGACY

    def __call__(self, decoded: DecodedImage) -> PreparedSlice:
        return PreparedSlice(grey=decoded.grey, lungs_visible=True, reason=None, findings=None,
                             lung_mask=None)


def _downscale(array: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    height, width = array.shape
    scale = min(1.0, side / max(height, width))
    if scale >= 1.0:
        return array.astype(np.float32), 1.0
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = Image.fromarray(array.astype(np.float32), mode="F")
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR)), scale


def _convex_hull(mask: np.ndarray) -> np.ndarray:
    """The filled convex hull of a mask (hull of the pixel corners, drawn with PIL: about
    ten times faster than skimage's point-in-polygon test on every pixel)."""
    from PIL import ImageDraw
    from scipy import ndimage
    from scipy.spatial import ConvexHull, QhullError

    outline = mask & ~ndimage.binary_erosion(mask)
    rows, columns = np.nonzero(outline)
    if rows.size < 3:
        return mask.copy()
    points = np.concatenate([np.stack([columns + dx, rows + dy], axis=1)
                             for dx in (-0.5, 0.5) for dy in (-0.5, 0.5)])
    try:
        hull = ConvexHull(points)
    except QhullError:  # all points on a line
        return mask.copy()
    image = Image.new("1", (mask.shape[1], mask.shape[0]), 0)
    ImageDraw.Draw(image).polygon([tuple(p) for p in points[hull.vertices]], fill=1, outline=1)
    return np.asarray(image, dtype=bool) | mask


def _segment(intensity: np.ndarray, tissue: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(body, lungs, lung component sizes) at working resolution.

    body: convex hull of the largest piece of tissue and of the big pieces the image frame
    cuts, without specks and thin lines (opened away). Many slices are tight crops that
    cut through the chest wall, so the tissue is in pieces; their common hull still
    encloses the lungs. Labels and markers floating in the outside air are left out. lungs: dark regions
    inside the body that are big enough and do not open onto the outside air: air that
    reaches into the hull (between arms, under the back, above the table) touches the
    hull's edge inside the image, and small dark pieces in a frame corner are the outside
    air of a crop. Dark regions may touch the frame itself: crops cut through the lungs.
    """
    from scipy import ndimage
    from skimage.morphology import disk

    height, width = tissue.shape
    border = np.zeros_like(tissue)
    border[:3, :], border[-3:, :], border[:, :3], border[:, -3:] = True, True, True, True
    # Padding: a perfectly flat region at the image's minimum that reaches the border (a
    # slice pasted, shifted or rotated onto a blank canvas). It is no anatomy, and where the
    # image content ends the frame ends: the edge of the padding counts as the frame.
    flat = intensity <= float(intensity.min()) + 1e-6
    labels, count = ndimage.label(flat)
    touching = np.unique(labels[border & flat])
    padding = np.isin(labels, touching[touching > 0]) if count else np.zeros_like(flat)
    frame = border | ndimage.binary_dilation(padding, iterations=3)
    tissue = tissue & ~padding
    opened = ndimage.binary_opening(tissue, structure=disk(2))
    labels, count = ndimage.label(opened)
    if count:
        areas = np.bincount(labels.ravel(), minlength=count + 1)
        areas[0] = 0
        # The largest piece, and big pieces the frame cuts (a tight crop's chest wall);
        # labels and markers floating in the outside air are neither.
        cut = np.bincount(labels[frame].ravel(), minlength=count + 1) > 0
        keep = (areas >= max(0.01 * areas.sum(), 4)) & cut
        keep[int(np.argmax(areas))] = True
        keep[0] = False
        solid = keep[labels]
    else:
        solid = tissue
    body = _convex_hull(solid if solid.any() else tissue)
    body_area = int(body.sum())
    if body_area == 0:
        return body, np.zeros_like(body), []
    inner = ndimage.binary_erosion(body, structure=disk(2))
    edge = body & ~inner
    corners = np.zeros_like(body)
    corner = max(3, min(height, width) // 20)
    for rows in (slice(0, corner), slice(height - corner, height)):
        for columns in (slice(0, corner), slice(width - corner, width)):
            corners[rows, columns] = True
    dark = ndimage.binary_opening(~tissue & ~padding & body, structure=disk(1))
    labels, count = ndimage.label(dark)
    lungs = np.zeros_like(body)
    sizes: list[int] = []
    if count:
        areas = np.bincount(labels.ravel(), minlength=count + 1)
        open_edge = np.bincount(labels[edge & ~frame].ravel(), minlength=count + 1)
        at_corner = np.bincount(labels[corners].ravel(), minlength=count + 1)
        for index in range(1, count + 1):
            area = int(areas[index])
            if area < MIN_COMPONENT_FRACTION * body_area:
                continue
            if open_edge[index] > max(3, 0.01 * area):
                continue
            if at_corner[index] > 0 and area < CORNER_AIR_FRACTION * body_area:
                continue
            lungs |= labels == index
            sizes.append(area)
    lungs = ndimage.binary_fill_holes(lungs)  # vessels and nodules inside the lungs
    return body, lungs, sorted(sizes, reverse=True)


def _lung_region(lungs: np.ndarray) -> np.ndarray:
    """Each lung's convex hull: takes in dense lesions on the lung's edge, which the
    threshold left out (consolidation looks like soft tissue)."""
    from scipy import ndimage

    labels, count = ndimage.label(lungs)
    region = np.zeros_like(lungs)
    for index in range(1, count + 1):
        region |= _convex_hull(labels == index)
    return region


def _square_box(box: tuple[int, int, int, int], margin: float) -> tuple[int, int, int, int]:
    top, left, bottom, right = box
    side = max(bottom - top, right - left)
    side = round(side * (1 + 2 * margin))
    centre_y, centre_x = (top + bottom) / 2, (left + right) / 2
    top = round(centre_y - side / 2)
    left = round(centre_x - side / 2)
    return top, left, top + side, left + side


def _crop_padded(array: np.ndarray, box: tuple[int, int, int, int], fill: float) -> np.ndarray:
    """array[top:bottom, left:right], padded with `fill` where the box leaves the image."""
    top, left, bottom, right = box
    height, width = array.shape
    out = np.full((bottom - top, right - left), fill, dtype=array.dtype)
    source = array[max(top, 0):min(bottom, height), max(left, 0):min(right, width)]
    out[max(-top, 0):max(-top, 0) + source.shape[0], max(-left, 0):max(-left, 0) + source.shape[1]] = source
    return out


def _upscale_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if mask.shape == shape:
        return mask
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(image.resize((shape[1], shape[0]), Image.Resampling.NEAREST)) > 127


@dataclass(frozen=True)
class _Analysis:
    """Segmentation of one slice at working resolution, and its intensity image."""

    intensity: np.ndarray  # full resolution, 0..1, denser = brighter
    work: np.ndarray  # working resolution copy
    scale: float  # working / full resolution
    body: np.ndarray
    lungs: np.ndarray
    lung_region: np.ndarray  # each lung's convex hull
    sizes: list[int]


def _analyse(decoded: DecodedImage) -> _Analysis:
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    if decoded.hounsfield is not None:
        low, high = HU_WINDOW
        intensity = np.clip((decoded.hounsfield - low) / (high - low), 0.0, 1.0).astype(np.float32)
        work_hu, scale = _downscale(decoded.hounsfield, WORK_SIDE)
        tissue = work_hu > HU_TISSUE
        work = np.clip((work_hu - low) / (high - low), 0.0, 1.0)
    else:
        intensity = decoded.grey.astype(np.float32) / 255.0
        work, scale = _downscale(intensity, WORK_SIDE)
        smooth = ndimage.gaussian_filter(work, 1.0)
        threshold = float(threshold_otsu(smooth)) if smooth.max() > smooth.min() else 0.5
        tissue = smooth > threshold
    body, lungs, sizes = _segment(work, tissue)
    lung_region = _lung_region(lungs) if lungs.any() else lungs
    return _Analysis(intensity=intensity, work=work, scale=scale, body=body, lungs=lungs,
                     lung_region=lung_region, sizes=sizes)


def lung_region_mask(decoded: DecodedImage) -> np.ndarray:
    """Where the lungs are in the decoded image (full resolution): for measuring where a
    model looks, also for models whose preprocessing does not crop (`legacy`)."""
    analysis = _analyse(decoded)
    return _upscale_mask(analysis.lung_region, analysis.intensity.shape)


class LungPreprocessor:
    """lung-v1: body mask, lung mask, intensity standardisation, square crop to the lungs.

    `mask_margin` (lungmask-v1) also blanks everything farther than this share of the
    crop's side from the lungs: heart, mediastinum and chest wall say nothing about
    COVID-19 and differ between hospitals."""

    def __init__(self, name: str = LUNG_V1, *, mask_margin: float | None = None) -> None:
        self.name, self.mask_margin = name, mask_margin

    def __call__(self, decoded: DecodedImage) -> PreparedSlice:
        from scipy import ndimage

        analysis = _analyse(decoded)
        intensity, work, scale = analysis.intensity, analysis.work, analysis.scale
        body, lungs, lung_region, sizes = analysis.body, analysis.lungs, analysis.lung_region, analysis.sizes
        body_area = max(int(body.sum()), 1)
        lung_area = int(lungs.sum())
        half = lungs.shape[1] // 2
        left_area, right_area = int(lungs[:, :half].sum()), int(lungs[:, half:].sum())
        balance = min(left_area, right_area) / max(left_area, right_area, 1)
        # How much lies in the body's lower (posterior) half: a signal for the input gate, not
        # a rule here (consolidated lungs of severe COVID-19 keep their air in front).
        body_rows = np.nonzero(body.any(axis=1))[0]
        middle = int((body_rows.min() + body_rows.max() + 1) // 2) if body_rows.size else lungs.shape[0] // 2
        posterior_fraction = int(lungs[middle:].sum()) / body_area

        # Anchors: lung air (a low percentile: ground glass must not shift it) and soft tissue
        # (median of the body outside the lungs).
        outside_lungs = body & ~ndimage.binary_dilation(lung_region, iterations=2)
        if lung_area >= 20 and outside_lungs.sum() >= 20:
            air = float(np.percentile(work[lungs], 10))
            soft = float(np.median(work[outside_lungs]))
        else:
            air, soft = (float(v) for v in np.percentile(work[body] if body.any() else work, (2, 98)))
        contrast = soft - air
        if contrast < 0.05:  # flat image: stretch what there is rather than divide by ~0
            air, soft = float(work.min()), float(max(work.max(), work.min() + 1e-3))
        keep = ndimage.binary_dilation(body, iterations=2)  # outside the body: air, whatever was drawn there

        lung_fraction = lung_area / body_area
        visible = lung_fraction >= MIN_LUNG_FRACTION
        reason = None
        if not visible:
            reason = (f"no lungs visible: lung-like regions cover {lung_fraction:.0%} of the body "
                      f"(at least {MIN_LUNG_FRACTION:.0%} needed); not an axial chest slice?")
        if visible:
            rows, columns = np.nonzero(lung_region)
            work_box = (int(rows.min()), int(columns.min()), int(rows.max()) + 1, int(columns.max()) + 1)
            box = tuple(round(v / scale) for v in work_box)
            if self.mask_margin is not None:
                reach = self.mask_margin * max(work_box[2] - work_box[0], work_box[3] - work_box[1]) \
                    * (1 + 2 * CROP_MARGIN)
                keep &= ndimage.distance_transform_edt(~lung_region) <= reach
        else:
            box = (0, 0, *intensity.shape)
        square = _square_box(box, CROP_MARGIN if visible else 0.0)  # type: ignore[arg-type]
        standardised = AIR_LEVEL + (intensity - air) * (TISSUE_LEVEL - AIR_LEVEL) / (soft - air)
        standardised = np.where(_upscale_mask(keep, intensity.shape), np.clip(standardised, 0.0, 1.0), 0.0)
        if visible:
            # Only the lung box and its margin: squaring the crop adds the same black either
            # way, whether the source went on (a whole scan: the body) or ended (a tight crop).
            top, left, bottom, right = box
            reach = round(CROP_MARGIN * max(bottom - top, right - left))
            inside = np.zeros(intensity.shape, dtype=bool)
            inside[max(top - reach, 0):bottom + reach, max(left - reach, 0):right + reach] = True
            standardised = np.where(inside, standardised, 0.0)
        grey = (_crop_padded(standardised, square, 0.0) * 255.0).round().astype(np.uint8)
        mask = _crop_padded(_upscale_mask(lung_region, intensity.shape), square, False)
        findings = LungFindings(
            body_fraction=float(body.sum() / body.size), lung_fraction=float(lung_fraction),
            lung_components=len(sizes), largest_lung_fraction=(sizes[0] / body_area) if sizes else 0.0,
            lung_balance=float(balance), posterior_fraction=float(posterior_fraction), crop_box=square,
            contrast=float(contrast))
        return PreparedSlice(grey=grey, lungs_visible=visible, reason=reason, findings=findings,
                             lung_mask=mask, body_mask=body)


PREPROCESSORS: dict[str, Preprocessor] = {
    LEGACY: LegacyPreprocessor(),
    LUNG_V1: LungPreprocessor(),
    LUNGMASK_V1: LungPreprocessor(LUNGMASK_V1, mask_margin=LUNGMASK_MARGIN),
}


def get_preprocessor(name: str | None) -> Preprocessor:
    """The preprocessing a model card names; cards without one predate it (`legacy`)."""
    try:
        return PREPROCESSORS[name or LEGACY]
    except KeyError:
        raise ModelError(f"unknown preprocessing {name!r}; this version knows "
                         f"{', '.join(PREPROCESSORS)} (a newer ctscan may be needed)") from None


def card_preprocessing(card: Any) -> str:
    """The preprocessing a model card (a ModelCard or its dict) was trained with (`legacy` for
    cards that predate it)."""
    named = card.get("preprocessing")
    name = named.get("name") if isinstance(named, dict) else named
    get_preprocessor(name)
    return str(name or LEGACY)


def prepare(decoded: DecodedImage, name: str | None = DEFAULT_PREPROCESSING) -> PreparedSlice:
    return get_preprocessor(name)(decoded)
