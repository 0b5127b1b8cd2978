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

import functools
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image

from ctscan.errors import ModelError
from ctscan.imaging.decoding import DecodedImage, resize_for_model

LEGACY = "legacy"
LUNG_V1 = "lung-v1"
LUNGMASK_V1 = "lungmask-v1"  # lung-v1, and blank beyond LUNGMASK_MARGIN of the lungs
LUNG_V2 = "lung-v2"  # lung-v1, and blank everything outside the lungs' own hulls
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
# lung-v2: only the lungs (bays closed, which takes in dense lesions at the lung's edge) and a
# rim of this share of the crop's side. Heart, chest wall and body outline differ
# with the slice's height in the chest and between hospitals, never with the lesions.
LUNG_V2_MARGIN = 0.01
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
    image = Image.fromarray(array.astype(np.float32, copy=False), mode="F")
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR)), scale


# grey / 255 in float32, as a lookup table: PIL applies it in C, several times faster than numpy's
# conversion and division of a full-resolution image, and bit for bit the same numbers.
_GREY_TO_INTENSITY = (np.arange(256, dtype=np.float32) / np.float32(255.0)).tolist()


def _downscale_grey(grey: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    """`_downscale(grey / 255)`, without a full-resolution float copy."""
    height, width = grey.shape
    scale = min(1.0, side / max(height, width))
    intensity = Image.fromarray(grey).point(_GREY_TO_INTENSITY, "F")
    if scale >= 1.0:
        return np.asarray(intensity), 1.0
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(intensity.resize(size, Image.Resampling.BILINEAR)), scale


# Binary morphology with the 4-neighbour cross, on shifted views: scipy's binary_erosion and
# binary_dilation (border value 0) give the same masks, but one call costs more than the whole
# shifted version at working size. Repeating the cross k times is the diamond of radius k:
# skimage's disk(1) and disk(2) are the diamonds of radius 1 and 2.
def _dilate(mask: np.ndarray, times: int = 1) -> np.ndarray:
    grown = mask
    for _ in range(times):
        before, grown = grown, grown.copy()
        grown[1:] |= before[:-1]
        grown[:-1] |= before[1:]
        grown[:, 1:] |= before[:, :-1]
        grown[:, :-1] |= before[:, 1:]
    return grown.copy() if grown is mask else grown


def _erode(mask: np.ndarray, times: int = 1) -> np.ndarray:
    shrunk = mask
    for _ in range(times):
        before, shrunk = shrunk, shrunk.copy()
        shrunk[1:] &= before[:-1]
        shrunk[:-1] &= before[1:]
        shrunk[:, 1:] &= before[:, :-1]
        shrunk[:, :-1] &= before[:, 1:]
        shrunk[0], shrunk[-1], shrunk[:, 0], shrunk[:, -1] = False, False, False, False  # outside is not mask
    return shrunk.copy() if shrunk is mask else shrunk


def _open(mask: np.ndarray, radius: int) -> np.ndarray:
    """binary_opening with disk(radius), radius 1 or 2."""
    return _dilate(_erode(mask, radius), radius)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """binary_fill_holes: background not 4-connected to the image's edge becomes mask."""
    from scipy import ndimage

    background, count = ndimage.label(~mask)
    if count == 0:
        return mask.copy()
    reaches_edge = np.zeros(count + 1, dtype=bool)
    for edge in (background[0], background[-1], background[:, 0], background[:, -1]):
        reaches_edge[edge] = True
    reaches_edge[0] = True  # label 0 is the mask itself
    filled: np.ndarray = ~reaches_edge[background]
    return filled | mask


def _hull_of(mask: np.ndarray) -> np.ndarray:
    """The filled convex hull of the pixels of `mask` (their corners), drawn with PIL. Each
    row's first and last pixel span the same hull as all pixels: a few hundred points for
    Qhull instead of the whole outline."""
    from PIL import ImageDraw
    from scipy.spatial import ConvexHull, QhullError

    rows = np.flatnonzero(mask.any(axis=1))
    if np.count_nonzero(mask[rows]) < 3:
        return mask.copy()
    occupied = mask[rows]
    first = occupied.argmax(axis=1)
    last = mask.shape[1] - 1 - occupied[:, ::-1].argmax(axis=1)
    ends = np.concatenate([np.stack([first, rows], axis=1), np.stack([last, rows], axis=1)]).astype(np.float64)
    points = np.concatenate([ends + np.array([dx, dy]) for dx in (-0.5, 0.5) for dy in (-0.5, 0.5)])
    try:
        hull = ConvexHull(points)
    except QhullError:  # all points on a line
        return mask.copy()
    image = Image.new("1", (mask.shape[1], mask.shape[0]), 0)
    ImageDraw.Draw(image).polygon([tuple(p) for p in points[hull.vertices]], fill=1, outline=1)
    return np.asarray(image, dtype=bool) | mask


_HULL_PAD = 2  # the drawn hull reaches at most a pixel beyond the mask's box


def _convex_hull(mask: np.ndarray) -> np.ndarray:
    """The filled convex hull of a mask, drawn only in the mask's bounding box."""
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return mask.copy()
    height, width = mask.shape
    box_rows = slice(max(int(rows[0]) - _HULL_PAD, 0), min(int(rows[-1]) + 1 + _HULL_PAD, height))
    box_columns = slice(max(int(columns[0]) - _HULL_PAD, 0), min(int(columns[-1]) + 1 + _HULL_PAD, width))
    region = mask.copy()
    region[box_rows, box_columns] = _hull_of(mask[box_rows, box_columns])
    return region


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

    height, width = tissue.shape
    border = np.zeros_like(tissue)
    border[:3, :], border[-3:, :], border[:, :3], border[:, -3:] = True, True, True, True
    # Padding: a perfectly flat region at the image's minimum that reaches the border (a
    # slice pasted, shifted or rotated onto a blank canvas). It is no anatomy, and where the
    # image content ends the frame ends: the edge of the padding counts as the frame.
    flat = intensity <= float(intensity.min()) + 1e-6
    labels, count = ndimage.label(flat)
    if count:
        touching = np.zeros(count + 1, dtype=bool)
        touching[labels[border & flat]] = True
        touching[0] = False
        padding = touching[labels]
    else:
        padding = np.zeros_like(flat)
    frame = border | _dilate(padding, 3)
    tissue = tissue & ~padding
    opened = _open(tissue, 2)
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
    body_area = int(np.count_nonzero(body))
    if body_area == 0:
        return body, np.zeros_like(body), []
    edge = body & ~_erode(body, 2)
    corners = np.zeros_like(body)
    corner = max(3, min(height, width) // 20)
    for rows in (slice(0, corner), slice(height - corner, height)):
        for columns in (slice(0, corner), slice(width - corner, width)):
            corners[rows, columns] = True
    dark = _open(~tissue & ~padding & body, 1)
    labels, count = ndimage.label(dark)
    lungs = np.zeros_like(body)
    sizes: list[int] = []
    if count:
        areas = np.bincount(labels.ravel(), minlength=count + 1)
        open_edge = np.bincount(labels[edge & ~frame].ravel(), minlength=count + 1)
        at_corner = np.bincount(labels[corners].ravel(), minlength=count + 1)
        lung = ((areas >= MIN_COMPONENT_FRACTION * body_area)  # big enough to be lung
                & (open_edge <= np.maximum(3, 0.01 * areas))  # not the outside air reaching in
                & ~((at_corner > 0) & (areas < CORNER_AIR_FRACTION * body_area)))  # nor a crop's corner
        lung[0] = False
        lungs = lung[labels]
        sizes = sorted((int(a) for a in areas[lung]), reverse=True)
    lungs = _fill_holes(lungs)  # vessels and nodules inside the lungs
    return body, lungs, sizes


def _lung_region(lungs: np.ndarray) -> np.ndarray:
    """Each lung's convex hull: takes in dense lesions on the lung's edge, which the
    threshold left out (consolidation looks like soft tissue). Each hull is drawn in its
    lung's own box."""
    from scipy import ndimage

    labels, _ = ndimage.label(lungs)
    height, width = lungs.shape
    region = lungs.copy()
    for index, box in enumerate(ndimage.find_objects(labels), 1):
        if box is None:
            continue
        rows = slice(max(box[0].start - _HULL_PAD, 0), min(box[0].stop + _HULL_PAD, height))
        columns = slice(max(box[1].start - _HULL_PAD, 0), min(box[1].stop + _HULL_PAD, width))
        region[rows, columns] |= _hull_of(labels[rows, columns] == index)
    return region


def _closed_lungs(lungs: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The lungs with their bays closed (a disk of 4 % of the lung box): takes in dense lesions
    at the lung's edge without the convex hull's wedge of heart and mediastinum, whose size
    follows the slice's height in the chest."""
    from scipy import ndimage
    from skimage.morphology import disk

    radius = max(2, round(0.04 * max(box[2] - box[0], box[3] - box[1])))
    padded = np.pad(lungs, radius)
    closed = ndimage.binary_closing(padded, structure=disk(radius))[radius:-radius, radius:-radius]
    return ndimage.binary_fill_holes(closed | lungs)


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


@functools.lru_cache(maxsize=256)
def _nearest_sources(work: int, full: int) -> np.ndarray:
    """For each of `full` pixels along one axis, the working pixel PIL's NEAREST resize takes
    (`_upscale_mask`): asked of PIL itself on one row, so a part of the mask can be upscaled
    alone with exactly the same pixels."""
    if work == full:
        return np.arange(full)
    row = Image.fromarray(np.arange(work, dtype=np.int32)[None, :])
    return np.asarray(row.resize((full, 1), Image.Resampling.NEAREST))[0].astype(np.intp)


def _upscale_part(mask: np.ndarray, shape: tuple[int, int], rows: slice, columns: slice) -> np.ndarray:
    """`_upscale_mask(mask, shape)[rows, columns]`, computing only that part."""
    row_sources = _nearest_sources(mask.shape[0], shape[0])[rows]
    column_sources = _nearest_sources(mask.shape[1], shape[1])[columns]
    # Gathering bytes (uint8) is several times faster than gathering numpy bools.
    part: np.ndarray = mask.view(np.uint8)[row_sources].take(column_sources, axis=1).view(bool)
    return part


@dataclass(frozen=True)
class _Analysis:
    """Segmentation of one slice at working resolution, and its intensity image."""

    source: DecodedImage = field(repr=False, compare=False)
    work: np.ndarray  # working resolution copy of `intensity`
    scale: float  # working / full resolution
    body: np.ndarray
    lungs: np.ndarray
    lung_region: np.ndarray  # each lung's convex hull
    sizes: list[int]

    @property
    def shape(self) -> tuple[int, int]:
        """The decoded image's (height, width)."""
        height, width = self.source.grey.shape
        return height, width

    def intensity_part(self, rows: slice, columns: slice) -> np.ndarray:
        """`intensity[rows, columns]`, computed for that part only."""
        if self.source.hounsfield is not None:
            low, high = HU_WINDOW
            part = self.source.hounsfield[rows, columns]
            return np.clip((part - low) / (high - low), 0.0, 1.0).astype(np.float32)
        return self.source.grey[rows, columns].astype(np.float32) / 255.0

    @functools.cached_property
    def intensity(self) -> np.ndarray:
        """Full resolution, 0..1, denser = brighter (computed when asked: serving needs only the crop)."""
        return self.intensity_part(slice(None), slice(None))


_ANALYSIS = "_lung_analysis"  # where a decoded image keeps its analysis


def _analyse(decoded: DecodedImage) -> _Analysis:
    """The slice's segmentation, computed once per decoded image: the screening's lung-v1, a
    model's own preprocessing and Grad-CAM's lung region share it."""
    cached = decoded.__dict__.get(_ANALYSIS)
    if cached is None:
        cached = _analyse_slice(decoded)
        decoded.__dict__[_ANALYSIS] = cached  # like functools.cached_property on a frozen dataclass
    return cached  # type: ignore[no-any-return]


def _analyse_slice(decoded: DecodedImage) -> _Analysis:
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    if decoded.hounsfield is not None:
        low, high = HU_WINDOW
        work_hu, scale = _downscale(decoded.hounsfield, WORK_SIDE)
        tissue = work_hu > HU_TISSUE
        work = np.clip((work_hu - low) / (high - low), 0.0, 1.0)
    else:
        work, scale = _downscale_grey(decoded.grey, WORK_SIDE)
        smooth = ndimage.gaussian_filter(work, 1.0)
        threshold = float(threshold_otsu(smooth)) if smooth.max() > smooth.min() else 0.5
        tissue = smooth > threshold
    body, lungs, sizes = _segment(work, tissue)
    lung_region = _lung_region(lungs) if lungs.any() else lungs
    return _Analysis(source=decoded, work=work, scale=scale, body=body, lungs=lungs,
                     lung_region=lung_region, sizes=sizes)


def lung_region_mask(decoded: DecodedImage) -> np.ndarray:
    """Where the lungs are in the decoded image (full resolution): for measuring where a
    model looks, also for models whose preprocessing does not crop (`legacy`)."""
    analysis = _analyse(decoded)
    return _upscale_mask(analysis.lung_region, analysis.shape)


def _standardised_grey(intensity: np.ndarray, air: float, soft: float, kept: np.ndarray | None = None) -> np.ndarray:
    """Intensity (0..1, float32) -> standardised 8-bit grey: lung air at AIR_LEVEL, soft tissue
    at TISSUE_LEVEL; black where `kept` is False (outside the body)."""
    standardised = AIR_LEVEL + (intensity - air) * (TISSUE_LEVEL - AIR_LEVEL) / (soft - air)
    standardised = np.clip(standardised, 0.0, 1.0)
    if kept is not None:
        standardised = np.where(kept, standardised, 0.0)
    grey: np.ndarray = (standardised * 255.0).round().astype(np.uint8)
    return grey


def lung_masks(decoded: DecodedImage) -> dict[str, np.ndarray]:
    """The lung masks segmentation finds, at full resolution: `lungs` (dark regions, holes
    filled), `closed` (what lung-v2 shows) and `hull` (each lung's convex hull: lung-v1's lung
    region). For scoring the segmentation against radiologists' masks."""
    analysis = _analyse(decoded)
    shape = analysis.intensity.shape
    lungs = analysis.lungs
    if lungs.any():
        rows, columns = np.nonzero(analysis.lung_region)
        box = (int(rows.min()), int(columns.min()), int(rows.max()) + 1, int(columns.max()) + 1)
        closed = _closed_lungs(lungs, box)
    else:
        closed = lungs
    return {"lungs": _upscale_mask(lungs, shape), "closed": _upscale_mask(closed, shape),
            "hull": _upscale_mask(analysis.lung_region, shape)}


class LungPreprocessor:
    """lung-v1: body mask, lung mask, intensity standardisation, square crop to the lungs.

    `mask_margin` (lungmask-v1) also blanks everything farther than this share of the
    crop's side from the lungs: heart, mediastinum and chest wall say nothing about
    COVID-19 and differ between hospitals."""

    def __init__(self, name: str = LUNG_V1, *, mask_margin: float | None = None,
                 closed_lungs: bool = False) -> None:
        self.name, self.mask_margin, self.closed_lungs = name, mask_margin, closed_lungs

    def __call__(self, decoded: DecodedImage) -> PreparedSlice:
        from scipy import ndimage

        analysis = _analyse(decoded)
        work, scale, shape = analysis.work, analysis.scale, analysis.shape
        body, lungs, lung_region, sizes = analysis.body, analysis.lungs, analysis.lung_region, analysis.sizes
        body_area = max(int(np.count_nonzero(body)), 1)
        lung_area = int(np.count_nonzero(lungs))
        half = lungs.shape[1] // 2
        left_area, right_area = int(np.count_nonzero(lungs[:, :half])), int(np.count_nonzero(lungs[:, half:]))
        balance = min(left_area, right_area) / max(left_area, right_area, 1)
        # How much lies in the body's lower (posterior) half: a signal for the input gate, not
        # a rule here (consolidated lungs of severe COVID-19 keep their air in front).
        body_rows = np.nonzero(body.any(axis=1))[0]
        middle = int((body_rows.min() + body_rows.max() + 1) // 2) if body_rows.size else lungs.shape[0] // 2
        posterior_fraction = int(np.count_nonzero(lungs[middle:])) / body_area

        # Anchors: lung air (a low percentile: ground glass must not shift it) and soft tissue
        # (median of the body outside the lungs).
        outside_lungs = body & ~_dilate(lung_region, 2)
        if lung_area >= 20 and np.count_nonzero(outside_lungs) >= 20:
            air = float(np.percentile(work[lungs], 10))
            soft = float(np.median(work[outside_lungs]))
        else:
            air, soft = (float(v) for v in np.percentile(work[body] if body.any() else work, (2, 98)))
        contrast = soft - air
        if contrast < 0.05:  # flat image: stretch what there is rather than divide by ~0
            air, soft = float(work.min()), float(max(work.max(), work.min() + 1e-3))
        keep = _dilate(body, 2)  # outside the body: air, whatever was drawn there

        lung_fraction = lung_area / body_area
        visible = lung_fraction >= MIN_LUNG_FRACTION
        reason = None
        if not visible:
            reason = (f"no lungs visible: lung-like regions cover {lung_fraction:.0%} of the body "
                      f"(at least {MIN_LUNG_FRACTION:.0%} needed); not an axial chest slice?")
        height, width = shape
        # The part of the image the crop shows: the square, within the image ...
        if visible:
            rows, columns = np.nonzero(lung_region)
            work_box = (int(rows.min()), int(columns.min()), int(rows.max()) + 1, int(columns.max()) + 1)
            box = tuple(round(v / scale) for v in work_box)
            if self.mask_margin is not None:
                reach = self.mask_margin * max(work_box[2] - work_box[0], work_box[3] - work_box[1]) \
                    * (1 + 2 * CROP_MARGIN)
                kept_lungs = _closed_lungs(lungs, work_box) if self.closed_lungs else lung_region
                keep &= ndimage.distance_transform_edt(~kept_lungs) <= reach
        else:
            box = (0, 0, height, width)
        square = _square_box(box, CROP_MARGIN if visible else 0.0)  # type: ignore[arg-type]
        top, left, bottom, right = square
        in_image = (slice(max(top, 0), min(bottom, height)), slice(max(left, 0), min(right, width)))
        # ... and, with lungs, only the lung box and its margin: squaring the crop adds the same
        # black either way, whether the source went on (a whole scan: the body) or ended (a
        # tight crop).
        shown = in_image
        if visible:
            box_top, box_left, box_bottom, box_right = box
            reach = round(CROP_MARGIN * max(box_bottom - box_top, box_right - box_left))
            shown = (slice(max(in_image[0].start, box_top - reach), min(in_image[0].stop, box_bottom + reach)),
                     slice(max(in_image[1].start, box_left - reach), min(in_image[1].stop, box_right + reach)))
        # Standardised intensity, blanked outside the body, computed for the shown part only
        # (a 1024-px slice is cropped to a third of its pixels); the rest of the crop is black.
        grey = np.zeros((bottom - top, right - left), dtype=np.uint8)
        if shown[0].stop > shown[0].start and shown[1].stop > shown[1].start:
            kept = _upscale_part(keep, shape, *shown)
            if decoded.hounsfield is None:
                # 8-bit source: standardise the 256 grey levels once and look them up (the same
                # numbers as standardising every pixel).
                levels = np.asarray(_GREY_TO_INTENSITY, dtype=np.float32)
                table = _standardised_grey(levels, air, soft)
                part = np.where(kept, table[decoded.grey[shown]], np.uint8(0))
            else:
                part = _standardised_grey(analysis.intensity_part(*shown), air, soft, kept)
            grey[shown[0].start - top:shown[0].stop - top, shown[1].start - left:shown[1].stop - left] = part
        mask = np.zeros(grey.shape, dtype=bool)
        if in_image[0].stop > in_image[0].start and in_image[1].stop > in_image[1].start:
            mask[in_image[0].start - top:in_image[0].stop - top, in_image[1].start - left:in_image[1].stop - left] = \
                _upscale_part(lung_region, shape, *in_image)
        findings = LungFindings(
            body_fraction=float(np.count_nonzero(body) / body.size), lung_fraction=float(lung_fraction),
            lung_components=len(sizes), largest_lung_fraction=(sizes[0] / body_area) if sizes else 0.0,
            lung_balance=float(balance), posterior_fraction=float(posterior_fraction), crop_box=square,
            contrast=float(contrast))
        return PreparedSlice(grey=grey, lungs_visible=visible, reason=reason, findings=findings,
                             lung_mask=mask, body_mask=body)


PREPROCESSORS: dict[str, Preprocessor] = {
    LEGACY: LegacyPreprocessor(),
    LUNG_V1: LungPreprocessor(),
    LUNGMASK_V1: LungPreprocessor(LUNGMASK_V1, mask_margin=LUNGMASK_MARGIN),
    LUNG_V2: LungPreprocessor(LUNG_V2, mask_margin=LUNG_V2_MARGIN, closed_lungs=True),
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
