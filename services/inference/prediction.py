"""One prediction: decode an upload, run the model (or the ensemble), optionally explain it.

Plain domain code with keyword-only arguments; the routes turn its exceptions into HTTP
errors. Nothing from a DICOM header is read beyond pixel-related tags, and nothing of the
upload is logged or kept.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import time
from typing import cast

import numpy as np
from PIL import Image
from starlette.concurrency import run_in_threadpool

from ctscan import DISCLAIMER, DISPLAY_LABELS, NEGATIVE_LABEL, POSITIVE_LABEL
from ctscan.formats import InputFormat, describe_formats, sniff
from ctscan.gradcam import overlay_png
from ctscan.imaging import DecodedImage, resize_for_model
from ctscan.models import ENSEMBLE
from ctscan.schemas import Label, MemberPrediction, Prediction, Timings
from services.inference.registry import ModelRegistry, ServedModel

HEATMAP_GRID = 224  # members' heatmaps are averaged on a common grid before the overlay


class UnrecognisedFileError(ValueError):
    """The bytes are no input format at all (HTTP 415, unlike a broken image: 422)."""


def sniff_format(data: bytes) -> InputFormat:
    """Recognise the container from its magic bytes, before any decoding."""
    found = sniff(data)
    if found is None:
        raise UnrecognisedFileError(f"the file is not a {describe_formats()} image")
    return found


def _label(probability_covid: float, threshold: float) -> Label:
    return cast(Label, DISPLAY_LABELS[POSITIVE_LABEL if probability_covid >= threshold else NEGATIVE_LABEL])


def _confidence(probability_covid: float, threshold: float) -> float:
    return probability_covid if probability_covid >= threshold else 1.0 - probability_covid


def _on_grid(heatmap: np.ndarray) -> np.ndarray:
    image = Image.fromarray(heatmap.astype(np.float32), mode="F")
    return np.asarray(image.resize((HEATMAP_GRID, HEATMAP_GRID), Image.Resampling.BILINEAR))


def _explain(entries: list[ServedModel], decoded: DecodedImage, inputs: list[np.ndarray]) -> str:
    heatmaps = [_on_grid(entry.gradcam(pixels)) for entry, pixels in zip(entries, inputs, strict=True)]
    mean = np.mean(heatmaps, axis=0)
    return base64.b64encode(overlay_png(decoded.pixels, mean)).decode("ascii")


def _decode_for(input_format: InputFormat, data: bytes, sizes: list[int], *, max_pixels: int, max_side: int
                ) -> tuple[DecodedImage, list[np.ndarray]]:
    """Decode once and resize for each model (one thread-pool hop per request)."""
    decoded = input_format.decode(data, max_pixels=max_pixels, max_side=max_side)
    return decoded, [resize_for_model(decoded.grey, size) for size in sizes]


async def predict_upload(
    *, registry: ModelRegistry, data: bytes, model: str, explain: bool, request_id: str
) -> Prediction:
    """Decode `data`, predict with `model` (a name or "ensemble") and build the API answer."""
    started = time.perf_counter()
    registry.check_model(model)  # a wrong model name is reported before anything about the file
    input_format = sniff_format(data)
    settings = registry.settings
    with registry.acquire(model) as (entries, ensemble), contextlib.ExitStack() as arrivals:
        # Announced before decoding, so batches under load wait for this request's pixels.
        on_the_way = [arrivals.enter_context(entry.batcher.expect()) for entry in entries]
        decoded, inputs = await asyncio.get_running_loop().run_in_executor(
            registry.decode_pool, functools.partial(
                _decode_for, input_format, data, [entry.input_size for entry in entries],
                max_pixels=settings.max_pixels, max_side=settings.max_side))
        decoded_at = time.perf_counter()
        probabilities = await asyncio.gather(
            *(arrival.predict(pixels) for arrival, pixels in zip(on_the_way, inputs, strict=True)))
        inferred_at = time.perf_counter()
        heatmap = await run_in_threadpool(_explain, entries, decoded, inputs) if explain else None
        explained_at = time.perf_counter()

    members: dict[str, MemberPrediction] | None = None
    disagreement: bool | None = None
    if model == ENSEMBLE and ensemble is not None:
        probability_covid = float(np.mean(probabilities))
        threshold = ensemble.threshold
        members = {
            entry.name: MemberPrediction(probability_covid=probability, label=_label(probability, entry.threshold),
                                         version=entry.version, threshold=entry.threshold)
            for entry, probability in zip(entries, probabilities, strict=True)}
        disagreement = len({member.label for member in members.values()}) > 1
        model_version = ",".join(f"{name}={version}" for name, version in ensemble.members.items())
    else:
        probability_covid = float(probabilities[0])
        threshold = entries[0].threshold
        model_version = entries[0].version
    return Prediction(
        label=_label(probability_covid, threshold),
        probability_covid=probability_covid,
        confidence=_confidence(probability_covid, threshold),
        threshold=threshold,
        model=model,
        model_version=model_version,
        members=members,
        disagreement=disagreement,
        heatmap_png_base64=heatmap,
        request_id=request_id,
        timings_ms=Timings(
            decode=(decoded_at - started) * 1000,
            inference=(inferred_at - decoded_at) * 1000,
            gradcam=(explained_at - inferred_at) * 1000 if explain else None,
            total=(time.perf_counter() - started) * 1000,
        ),
        source_format=decoded.source_format,
        disclaimer=DISCLAIMER,
    )
