"""Is this image a CT slice at all? Checks on the decoded image, before any model runs.

A CT slice is greyscale, has many grey levels and is smooth at the pixel scale (noise in a
reconstructed slice is small against the contrast between air and tissue). Photographs,
micrographs, drawings, binary masks and noise fail one of these, and a network trained from
scratch on a few hundred slices cannot be trusted to notice (its feature-space gate misses
many of them). The limits sit well outside every UCSD train slice: the largest train value
with a margin, never fitted to the foreign images they refuse.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

from ctscan.imaging.decoding import DecodedImage

# UCSD train (425 slices): colour share at most 0.18 (coloured arrows and labels in a few
# screenshots from papers), at least 171 grey levels, roughness at most 0.17.
MAX_COLOUR_SHARE = 0.25
MIN_GREY_LEVELS = 32
MAX_ROUGHNESS = 0.20
_WORK_SIDE = 256


def _sorted_value(cumulative: np.ndarray, rank: int) -> int:
    """The `rank`-th smallest value (from 0) of integers whose histogram's running sum this is."""
    return int(np.searchsorted(cumulative, rank, side="right"))


def _percentile(cumulative: np.ndarray, count: int, q: float) -> float:
    """np.percentile (linear) of the integers behind a running histogram, without sorting."""
    position = q / 100 * (count - 1)
    below = int(np.floor(position))
    fraction = position - below
    a, b = float(_sorted_value(cumulative, below)), float(_sorted_value(cumulative, min(below + 1, count - 1)))
    # numpy's own interpolation (exact at both ends)
    return b - (b - a) * (1 - fraction) if fraction >= 0.5 else a + (b - a) * fraction


def roughness(grey: np.ndarray) -> float:
    """Median absolute Laplacian at 256 px, relative to the image's 1-99 % intensity range:
    near 0 for smooth images, about 0.5 for pixel noise. The copy is 8-bit and its Laplacian
    integer, so percentiles and median come from histograms (the same numbers as sorting)."""
    small = np.asarray(Image.fromarray(grey).resize((_WORK_SIDE, _WORK_SIDE), Image.Resampling.BILINEAR))
    count = small.size
    levels = np.cumsum(np.bincount(small.ravel(), minlength=256))
    low, high = _percentile(levels, count, 1), _percentile(levels, count, 99)
    laplacian = np.abs(ndimage.laplace(small.astype(np.int16))).ravel()
    steps = np.cumsum(np.bincount(laplacian))
    if count % 2:
        median = float(_sorted_value(steps, count // 2))
    else:
        median = (_sorted_value(steps, count // 2 - 1) + _sorted_value(steps, count // 2)) / 2
    return float(median / max(high - low, 1.0))


def appearance_refusal(decoded: DecodedImage) -> str | None:
    """Why the image cannot be a CT slice, or None."""
    if decoded.colour_share > MAX_COLOUR_SHARE:
        return (f"a colour image ({decoded.colour_share:.0%} of the pixels are coloured); CT slices are "
                "greyscale")
    levels = int(np.count_nonzero(np.bincount(decoded.grey.ravel(), minlength=256)))
    if levels < MIN_GREY_LEVELS:
        return f"only {levels} grey levels: a drawing, mask or pattern, not a CT slice"
    rough = roughness(decoded.grey)
    if rough > MAX_ROUGHNESS:
        return f"pixel-scale noise or texture (roughness {rough:.2f} > {MAX_ROUGHNESS}); not a CT slice"
    return None
