"""Whole-study prediction: unpack, screen and classify every slice, order them along the
body, and aggregate one verdict (`ctscan.study`, `ctscan.predictor.study_decision`).

Slices are decoded on the decode pool and go to the same dynamic batchers as single-slice
requests, so a study's slices fill batches. Only small copies of each slice are kept (the
model inputs as 8-bit greyscale): a 500-slice study does not hold 500 decoded scans in
memory; the few top slices are decoded again for their heatmaps (the one heatmap rule,
`ctscan.predictor.explain_members`, draws on the original slice). Nothing from the DICOM headers is kept
beyond the slice positions and one-way digests that check the series.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import time
from dataclasses import dataclass

import numpy as np

from ctscan import DISCLAIMER
from ctscan.decision import OUTCOME_TEXT, Decision
from ctscan.errors import ImageError
from ctscan.formats import InputFormat, describe_formats, sniff
from ctscan.gradcam import Explanation
from ctscan.imaging import DicomSliceInfo
from ctscan.models import ENSEMBLE
from ctscan.predictor import SliceResult, slice_decision, study_decision
from ctscan.schemas import Aggregation, StudyPrediction, StudySlice, StudyTimings, TopSlice
from ctscan.study import AGGREGATION_RULE, StudyLimits, is_zip, order_series, unpack_zip
from services.inference.prediction import (
    UnrecognisedFileError,
    _decode_and_screen,
    ensemble_rule,
    heatmap_for,
    member_output,
)
from services.inference.registry import ModelRegistry, ServedModel

TOP_SLICES = 3


class SliceError(ImageError):
    """One slice of a study cannot be decoded; the message names it by position."""

    def __init__(self, index: int, cause: ImageError) -> None:
        super().__init__(f"slice {index + 1} of the upload: {cause}")
        self.cause = cause


@dataclass
class _Slice:
    info: DicomSliceInfo | None
    source_format: str
    refusal: Decision | None
    inputs: list[np.ndarray]  # per model, (S, S) uint8 greyscale (expanded to 3 channels on use)
    rows: list[float | tuple[float, ...]] | None = None


def study_blobs(parts: list[bytes], limits: StudyLimits) -> list[bytes]:
    """The slices of an upload: several files, or one ZIP of a series."""
    if len(parts) == 1 and is_zip(parts[0]):
        return unpack_zip(parts[0], limits)
    if any(is_zip(part) for part in parts):
        raise UnrecognisedFileError("send either one ZIP of a series or several slice files, not ZIPs among slices")
    return parts


def _screen(input_format: InputFormat, data: bytes, entries: list[ServedModel], index: int, *,
            max_pixels: int, max_side: int) -> _Slice:
    try:
        screened = _decode_and_screen(input_format, data, entries, max_pixels=max_pixels, max_side=max_side)
    except ImageError as exc:
        raise SliceError(index, exc) from None
    inputs = [np.asarray(pixels[:, :, 0]).round().astype(np.uint8) for pixels in screened.inputs]
    return _Slice(screened.decoded.dicom, screened.decoded.source_format, screened.refusal, inputs)


def _explain(input_format: InputFormat, data: bytes, entries: list[ServedModel], *, max_pixels: int,
             max_side: int) -> Explanation:
    """A top slice's heatmap: decoded again (its copy was not kept), then the one rule."""
    return heatmap_for(entries, _decode_and_screen(input_format, data, entries, max_pixels=max_pixels,
                                                   max_side=max_side))


def _expand(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, None], 3, axis=2).astype(np.float32)


async def predict_study(*, registry: ModelRegistry, blobs: list[bytes], model: str, explain: bool,
                        request_id: str, limits: StudyLimits) -> StudyPrediction:
    started = time.perf_counter()
    registry.check_model(model)
    if len(blobs) > limits.max_slices:
        from ctscan.errors import ImageTooLargeError

        raise ImageTooLargeError(f"the study holds {len(blobs)} slices; at most {limits.max_slices} are accepted")
    formats = []
    for index, data in enumerate(blobs):
        found = sniff(data)
        if found is None:
            raise UnrecognisedFileError(f"file {index + 1} of the upload is not a {describe_formats()} image")
        formats.append(found)
    settings = registry.settings
    loop = asyncio.get_running_loop()
    with registry.acquire(model) as (entries, ensemble):
        async def one(index: int) -> _Slice:
            item = await loop.run_in_executor(registry.decode_pool, functools.partial(
                _screen, formats[index], blobs[index], entries, index,
                max_pixels=settings.max_pixels, max_side=settings.max_side))
            if item.refusal is None:
                futures = [asyncio.wrap_future(entry.batcher.submit(_expand(grey)))
                           for entry, grey in zip(entries, item.inputs, strict=True)]
                item.rows = list(await asyncio.gather(*futures))
            return item

        items = await asyncio.gather(*(one(i) for i in range(len(blobs))))
        inferred_at = time.perf_counter()
        ordered = order_series([item.info for item in items])
        rule = ensemble_rule(ensemble) if model == ENSEMBLE else None
        results: list[SliceResult] = []
        for entry in ordered:
            item = items[entry.upload_index]
            if item.refusal is not None or item.rows is None:
                results.append(SliceResult(item.refusal or Decision("no_lungs_visible", None, None, [])))
                continue
            outputs = [member_output(served, row) for served, row in zip(entries, item.rows, strict=True)]
            results.append(SliceResult(slice_decision(outputs, ensemble=rule), outputs))
        threshold = rule.threshold if rule else entries[0].threshold
        band = rule.band if rule else entries[0].band
        decision, k = study_decision(results, threshold=threshold, band=band)
        ranked = sorted((i for i, r in enumerate(results) if r.decision.classified),
                        key=lambda i: -(results[i].decision.probability_covid or 0.0))[:TOP_SLICES]
        top = []
        for position in ranked:
            upload_index = ordered[position].upload_index
            heatmap = None
            if explain:
                heatmap = await loop.run_in_executor(None, functools.partial(
                    _explain, formats[upload_index], blobs[upload_index], entries,
                    max_pixels=settings.max_pixels, max_side=settings.max_side))
            top.append(TopSlice(
                index=position, probability_covid=float(results[position].decision.probability_covid or 0.0),
                heatmap_png_base64=base64.b64encode(heatmap.png).decode() if heatmap is not None else None,
                heatmap_members=list(heatmap.members) if heatmap is not None else None))
        explained_at = time.perf_counter()

    slices = [StudySlice(index=position, upload_index=entry.upload_index, position_mm=entry.position_mm,
                         outcome=result.decision.outcome,  # type: ignore[arg-type]
                         probability_covid=result.decision.probability_covid,
                         reasons=[] if result.decision.classified else result.decision.reasons)
              for position, (entry, result) in enumerate(zip(ordered, results, strict=True))]
    skipped: dict[str, int] = {}
    for result in results:
        if not result.decision.classified:
            skipped[result.decision.outcome] = skipped.get(result.decision.outcome, 0) + 1
    if model == ENSEMBLE and ensemble is not None:
        model_version = ",".join(f"{name}={version}" for name, version in ensemble.members.items())
    else:
        model_version = entries[0].version
    formats_seen = sorted({item.source_format for item in items})
    return StudyPrediction(
        outcome=decision.outcome,  # type: ignore[arg-type]
        outcome_text=OUTCOME_TEXT[decision.outcome],
        probability_covid=decision.probability_covid,
        threshold=decision.threshold,
        indeterminate_band=band if decision.classified else None,
        reasons=decision.reasons,
        aggregation=Aggregation(rule=AGGREGATION_RULE, k=k, classified_slices=sum(r.decision.classified
                                                                                  for r in results)),
        slice_count=len(slices),
        skipped=skipped,
        slices=slices,
        top_slices=top,
        model=model,
        model_version=model_version,
        request_id=request_id,
        timings_ms=StudyTimings(slices=(inferred_at - started) * 1000,
                                gradcam=(explained_at - inferred_at) * 1000 if explain else None,
                                total=(time.perf_counter() - started) * 1000),
        source_format="+".join(formats_seen),
        disclaimer=DISCLAIMER,
    )
