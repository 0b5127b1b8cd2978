"""Whole-study prediction: unpack, screen and classify every slice, order them along the
body, and aggregate one verdict (`ctscan.study`, `ctscan.serving.predictor.study_decision`).

Slices are decoded on the decode pool and go to the same dynamic batchers as single-slice
requests, so a study's slices fill batches. Only small copies of each slice are kept (the
model inputs as 8-bit greyscale): a 500-slice study does not hold 500 decoded scans in
memory; the few top slices are decoded again for their heatmaps (the one heatmap rule,
`ctscan.serving.predictor.explain_members`, draws on the original slice). Nothing from the DICOM headers is kept
beyond the slice positions and one-way digests that check the series.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import time
from dataclasses import dataclass

import numpy as np

from ctscan.decision import Decision
from ctscan.errors import ImageError
from ctscan.gradcam import Explanation
from ctscan.imaging.decoding import DicomSliceInfo
from ctscan.imaging.formats import InputFormat, describe_formats, sniff
from ctscan.models import ENSEMBLE
from ctscan.schemas import StudyPrediction, StudyTimings
from ctscan.serving.answers import ensemble_version, study_prediction, top_slices
from ctscan.serving.predictor import SliceResult, slice_decision, study_decision
from ctscan.study import StudyLimits, check_pixel_budget, is_zip, order_series, unpack_zip
from services.inference.decoding import STUDY
from services.inference.prediction import (
    UnrecognisedFileError,
    _decode_and_screen,
    ensemble_rule,
    heatmap_for,
    member_output,
)
from services.inference.registry import ModelRegistry, ServedModel


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
    # Every slice's header, before any is decoded: a study over its pixel budget costs nothing.
    announced = await asyncio.to_thread(check_pixel_budget, blobs, max_total_pixels=settings.max_study_pixels,
                                        max_pixels=settings.max_pixels, max_side=settings.max_side)
    # A few slices at a time on the decode threads (a study's slices queue behind single
    # uploads): enough to keep every core busy, too few to crowd the queue.
    in_flight = asyncio.Semaphore(2 * registry.decoder.workers)
    with registry.acquire(model) as (entries, ensemble):
        async def one(index: int) -> _Slice:
            async with in_flight:
                item = await registry.decoder.run(
                    _screen, formats[index], blobs[index], entries, index, pixels=announced[index], priority=STUDY,
                    max_pixels=settings.max_pixels, max_side=settings.max_side)
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
        heatmaps: dict[int, str | None] = {}
        heatmap_members: dict[int, tuple[str, ...]] = {}
        for position in top_slices(results) if explain else []:
            upload_index = ordered[position].upload_index
            explanation = await loop.run_in_executor(None, functools.partial(
                _explain, formats[upload_index], blobs[upload_index], entries,
                max_pixels=settings.max_pixels, max_side=settings.max_side))
            heatmaps[position] = base64.b64encode(explanation.png).decode()
            heatmap_members[position] = explanation.members
        explained_at = time.perf_counter()

    return study_prediction(
        decision=decision, k=k, results=results, positions_mm=[entry.position_mm for entry in ordered],
        upload_order=[entry.upload_index for entry in ordered], heatmaps=heatmaps,
        heatmap_members=heatmap_members, model=model,
        model_version=ensemble_version(ensemble.members) if model == ENSEMBLE and ensemble is not None
        else entries[0].version,
        band=band, request_id=request_id,
        timings=StudyTimings(slices=(inferred_at - started) * 1000,
                             gradcam=(explained_at - inferred_at) * 1000 if explain else None,
                             total=(time.perf_counter() - started) * 1000),
        source_formats=[item.source_format for item in items])
