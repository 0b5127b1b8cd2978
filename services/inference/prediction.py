"""One prediction: decode an upload, screen it, run the model (or the ensemble), decide.

Plain domain code with keyword-only arguments; the routes turn its exceptions into HTTP
errors. The rules (lung screening, input gate, calibration, indeterminate band, ensemble
agreement) are the core's (`ctscan.serving.predictor`, `ctscan.decision`), shared with
`ctscan predict`; here they run on the service's batched, ONNX outputs. Nothing from a
DICOM header is read beyond what the answer needs, and nothing of the upload is logged or
kept.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import time
from dataclasses import dataclass

import numpy as np
from starlette.concurrency import run_in_threadpool

from ctscan.calibration import Calibration
from ctscan.decision import Decision
from ctscan.gradcam import Explanation
from ctscan.imaging.decoding import DecodedImage, announced_pixels
from ctscan.imaging.formats import InputFormat, describe_formats, sniff
from ctscan.imaging.preprocessing import LUNG_V1, PreparedSlice, get_preprocessor, prepare
from ctscan.models import ENSEMBLE
from ctscan.schemas import Prediction, Timings
from ctscan.serving.answers import ensemble_version, is_calibrated, slice_prediction
from ctscan.serving.predictor import EnsembleRule, MemberOutput, explain_members, input_refusal, slice_decision
from services.inference.decoding import SINGLE
from services.inference.registry import EnsembleInfo, ModelRegistry, ServedModel


class UnrecognisedFileError(ValueError):
    """The bytes are no input format at all (HTTP 415, unlike a broken image: 422)."""


def sniff_format(data: bytes) -> InputFormat:
    """Recognise the container from its magic bytes, before any decoding."""
    found = sniff(data)
    if found is None:
        raise UnrecognisedFileError(f"the file is not a {describe_formats()} image")
    return found


@dataclass
class Screened:
    """A decoded slice, screened, and prepared as each model expects it."""

    decoded: DecodedImage
    screen: PreparedSlice  # lung-v1: the lung signals whatever the models' preprocessing
    refusal: Decision | None
    prepared: list[PreparedSlice]  # per model (empty when refused)
    inputs: list[np.ndarray]


def screen_slice(decoded: DecodedImage, entries: list[ServedModel]) -> Screened:
    """Screen for lungs and modality, then preprocess once per preprocessing the models use."""
    screen = prepare(decoded, LUNG_V1)
    refusal = input_refusal(decoded, screen)
    if refusal is not None:
        return Screened(decoded, screen, refusal, [], [])
    by_name: dict[str, PreparedSlice] = {LUNG_V1: screen}
    prepared = []
    for entry in entries:
        if entry.preprocessing not in by_name:
            by_name[entry.preprocessing] = get_preprocessor(entry.preprocessing)(decoded)
        prepared.append(by_name[entry.preprocessing])
    inputs = [item.model_input(entry.input_size) for item, entry in zip(prepared, entries, strict=True)]
    return Screened(decoded, screen, None, prepared, inputs)


def _decode_and_screen(input_format: InputFormat, data: bytes, entries: list[ServedModel], *, max_pixels: int,
                       max_side: int) -> Screened:
    """Decode once, screen and preprocess for each model (one thread-pool hop per request)."""
    return screen_slice(input_format.decode(data, max_pixels=max_pixels, max_side=max_side), entries)


def member_output(entry: ServedModel, row: float | tuple[float, ...]) -> MemberOutput:
    """The batcher's row (raw probability, gate distance) as the core's MemberOutput."""
    raw, distance = (row, math.nan) if isinstance(row, float) else (row[0], row[1])
    probability = float(entry.calibration.apply(raw))
    gated = entry.gate is not None and not math.isnan(distance)
    return MemberOutput(entry.name, entry.version, probability, entry.threshold,
                        float(distance) if gated else None, entry.gate.threshold if gated and entry.gate else None,
                        entry.band)


def ensemble_rule(ensemble: EnsembleInfo | None) -> EnsembleRule | None:
    if ensemble is None:
        return None
    return EnsembleRule(members=ensemble.members, threshold=ensemble.threshold, calibration=ensemble.calibration,
                        band=ensemble.band)


def heatmap_for(entries: list[ServedModel], screened: Screened) -> Explanation:
    """The served heatmap (the core's one rule, `ctscan.serving.predictor.explain_members`)."""
    return explain_members(screened.decoded, screened.screen, [
        (entry.name, entry.gradcam(pixels), seen)
        for entry, pixels, seen in zip(entries, screened.inputs, screened.prepared, strict=True)])


def build_answer(*, decision: Decision, outputs: list[MemberOutput], model: str, model_version: str,
                 screened: Screened, entries: list[ServedModel], heatmap: Explanation | None, request_id: str,
                 timings: Timings, band: float | None, calibration: Calibration | None = None) -> Prediction:
    """`calibration`: the ensemble's own (its probability is calibrated again on val), else None."""
    return slice_prediction(
        decision=decision, outputs=outputs, ensemble=model == ENSEMBLE, model=model, model_version=model_version,
        findings=screened.screen.findings, source_format=screened.decoded.source_format,
        heatmap_png_base64=base64.b64encode(heatmap.png).decode() if heatmap is not None else None,
        heatmap_members=heatmap.members if heatmap is not None else None,
        request_id=request_id, timings=timings, band=band,
        calibrated=is_calibrated(calibration, [entry.calibration for entry in entries]))


async def predict_upload(
    *, registry: ModelRegistry, data: bytes, model: str, explain: bool, request_id: str
) -> Prediction:
    """Decode `data`, screen it, predict with `model` (a name or "ensemble"), build the answer."""
    started = time.perf_counter()
    registry.check_model(model)  # a wrong model name is reported before anything about the file
    input_format = sniff_format(data)
    settings = registry.settings
    # From the header: too many pixels is refused here, before the upload waits for a thread.
    pixels = announced_pixels(data, max_pixels=settings.max_pixels, max_side=settings.max_side)
    with registry.acquire(model) as (entries, ensemble), contextlib.ExitStack() as arrivals:
        # Announced before decoding, so batches under load wait for this request's pixels.
        on_the_way = [arrivals.enter_context(entry.batcher.expect()) for entry in entries]
        screened = await registry.decoder.run(
            _decode_and_screen, input_format, data, entries, pixels=pixels, priority=SINGLE,
            max_pixels=settings.max_pixels, max_side=settings.max_side)
        decoded_at = time.perf_counter()
        rule = ensemble_rule(ensemble) if model == ENSEMBLE else None
        outputs: list[MemberOutput] = []
        if screened.refusal is not None:
            decision = screened.refusal  # nothing is classified; the arrivals withdraw on exit
        else:
            rows = await asyncio.gather(
                *(arrival.predict(pixels) for arrival, pixels in zip(on_the_way, screened.inputs, strict=True)))
            outputs = [member_output(entry, row) for entry, row in zip(entries, rows, strict=True)]
            decision = slice_decision(outputs, ensemble=rule)
        inferred_at = time.perf_counter()
        heatmap = None
        if explain and decision.classified:
            heatmap = await run_in_threadpool(heatmap_for, entries, screened)
        explained_at = time.perf_counter()

    if model == ENSEMBLE and ensemble is not None:
        model_version = ensemble_version(ensemble.members)
        band = ensemble.band
    else:
        model_version, band = entries[0].version, entries[0].band
    timings = Timings(
        decode=(decoded_at - started) * 1000,
        inference=(inferred_at - decoded_at) * 1000,
        gradcam=(explained_at - inferred_at) * 1000 if explain else None,
        total=(time.perf_counter() - started) * 1000,
    )
    return build_answer(decision=decision, outputs=outputs, model=model, model_version=model_version,
                        screened=screened, entries=entries, heatmap=heatmap, request_id=request_id,
                        timings=timings, band=band,
                        calibration=ensemble.calibration if model == ENSEMBLE and ensemble is not None else None)
