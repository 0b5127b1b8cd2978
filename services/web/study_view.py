"""The study page's plot of per-slice probabilities along the body, as plain SVG geometry
(no script, no inline style: the page's Content-Security-Policy allows neither)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ctscan.decision import REFUSALS
from ctscan.schemas import StudySlice

WIDTH, HEIGHT, MARGIN = 600.0, 120.0, 6.0


def probability_strip(slices: Sequence[StudySlice], *, threshold: float | None) -> dict[str, Any]:
    """Bars (one per slice, body order, x by position when known) with their heights and
    classes, the threshold line's height, and the axis labels."""
    if not slices:
        return {"bars": [], "width": WIDTH, "height": HEIGHT, "threshold_y": None, "axis": ("", "")}
    positions = [s.position_mm for s in slices]
    use_positions = all(p is not None for p in positions) and len({p for p in positions}) > 1
    xs = [float(p) for p in positions] if use_positions else [float(i) for i in range(len(slices))]  # type: ignore[arg-type]
    low, high = min(xs), max(xs)
    span = (high - low) or 1.0
    bar = max(1.0, (WIDTH - 2 * MARGIN) / max(len(slices), 1) * 0.8)
    plot = HEIGHT - 2 * MARGIN
    bars = []
    for index, (item, x) in enumerate(zip(slices, xs, strict=True)):
        left = MARGIN + (x - low) / span * (WIDTH - 2 * MARGIN - bar)
        if item.probability_covid is None:
            height, kind = plot * 0.08, "skipped"
        else:
            height = max(1.0, plot * item.probability_covid)
            kind = "indeterminate" if item.outcome == "indeterminate" else (
                "covid" if item.outcome == "covid" else "non_covid")
        bars.append({"x": round(left, 2), "y": round(HEIGHT - MARGIN - height, 2), "width": round(bar, 2),
                     "height": round(height, 2), "kind": kind, "index": index,
                     "label": (f"slice {index + 1}: " + ("not classified" if item.outcome in REFUSALS
                               else f"{item.probability_covid:.0%}"))})
    threshold_y = None if threshold is None else round(HEIGHT - MARGIN - plot * threshold, 2)
    unit = "mm along the body" if use_positions else "slice"
    return {"bars": bars, "width": WIDTH, "height": HEIGHT, "threshold_y": threshold_y,
            "axis": (f"{low:g} {unit}", f"{high:g} {unit}")}
