"""What the served decision rule answers on real and foreign inputs: how often it refuses
chest-CT slices it should judge (false rejection), how often it refuses images that are not
chest CT (true rejection), and how often it calls a slice indeterminate.

Used by `ctscan safety-report` (README numbers) and by the release tests.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from ctscan.decision import INDETERMINATE, REFUSALS
from ctscan.imaging.decoding import DecodedImage, decode_image

# Real photographs and drawings that scikit-image ships (no download): none is a CT slice.
SKIMAGE_SAMPLES = ("astronaut", "camera", "coffee", "chelsea", "coins", "moon", "text", "page", "rocket",
                   "horse", "clock", "checkerboard", "hubble_deep_field", "immunohistochemistry", "retina",
                   "grass", "gravel", "brick", "colorwheel", "logo", "binary_blobs")


def _png(pixels: np.ndarray) -> bytes:
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    if pixels.dtype != np.uint8:
        pixels = np.clip(pixels * (255.0 if pixels.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def skimage_samples() -> Iterator[tuple[str, DecodedImage]]:
    import skimage.data

    for name in SKIMAGE_SAMPLES:
        yield f"skimage:{name}", decode_image(_png(np.asarray(getattr(skimage.data, name)())))


def generated_patterns(size: int = 512, seed: int = 0) -> Iterator[tuple[str, DecodedImage]]:
    """Synthetic inputs a careless upload could look like: noise, gradients, shapes, blanks."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    disc = ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.16).astype(np.float64)
    two_discs = (((x - 0.32) ** 2 + (y - 0.5) ** 2 < 0.03) | ((x - 0.68) ** 2 + (y - 0.5) ** 2 < 0.03))
    patterns = {
        "uniform-noise": rng.uniform(0, 1, (size, size)),
        "gaussian-noise": np.clip(rng.normal(0.5, 0.2, (size, size)), 0, 1),
        "horizontal-gradient": x,
        "radial-gradient": np.clip(1 - np.hypot(x - 0.5, y - 0.5) * 2, 0, 1),
        "stripes": (np.sin(x * 40) > 0).astype(np.float64),
        "white-disc": disc,
        # A bright body with two dark holes: the crude shape of a chest, without anatomy.
        "disc-with-two-holes": disc * (1 - two_discs),
        "black": np.zeros((size, size)),
        "white": np.ones((size, size)),
        "colour-noise": rng.uniform(0, 1, (size, size, 3)),
    }
    for name, pixels in patterns.items():
        yield f"pattern:{name}", decode_image(_png(pixels))


def outcome_counts(predictor: Any, decoded: Sequence[DecodedImage], *, model: str,
                   batch: int = 32) -> Counter[str]:
    counts: Counter[str] = Counter()
    for start in range(0, len(decoded), batch):
        for result in predictor.classify(list(decoded[start:start + batch]), model=model):
            counts[result.decision.outcome] += 1
    return counts


def summarise(counts: Counter[str]) -> dict[str, Any]:
    total = sum(counts.values())
    refused = sum(counts[o] for o in REFUSALS)
    return {"images": total, "outcomes": dict(sorted(counts.items())),
            "refused_share": refused / total if total else None,
            "indeterminate_share": counts[INDETERMINATE] / total if total else None}


def safety_report(*, store: Any, data_dirs: dict[str, tuple[str, str]], models: Sequence[str],
                  foreign: bool = True) -> dict[str, Any]:
    """Outcome shares of each served model (and the ensemble, when it can be served) on each
    named data set's split (`{"ucsd-test": (folder, "test")}`) and on non-CT inputs."""
    from ctscan.data.dataset import CTDataset
    from ctscan.errors import CTScanError
    from ctscan.evaluation.reports import decode_samples
    from ctscan.models import ENSEMBLE
    from ctscan.serving.predictor import Predictor

    predictor = Predictor.from_store(store, list(models))
    served = [*predictor.models, *([ENSEMBLE] if predictor.ensemble is not None else [])]
    inputs: dict[str, list[DecodedImage]] = {}
    for name, (folder, split) in data_dirs.items():
        inputs[name] = decode_samples(CTDataset(folder).split(split))
    if foreign:
        inputs["not-ct"] = [d for _, d in [*skimage_samples(), *generated_patterns()]]
    report: dict[str, Any] = {
        "models": {n: {"version": m.version, "preprocessing": m.preprocessing, "input_size": m.input_size,
                       "init": m.card.get("init"), "gate": m.gate is not None}
                   for n, m in predictor.models.items()},
        "data": {name: {"folder": folder, "split": split} for name, (folder, split) in data_dirs.items()},
        # The versions the ensemble combines (its record's, pinned; they may lag production).
        "ensemble_members": predictor.ensemble.members if predictor.ensemble is not None else None,
        "results": {},
    }
    for model in served:
        try:
            report["results"][model] = {name: summarise(outcome_counts(predictor, decoded, model=model))
                                        for name, decoded in inputs.items()}
        except CTScanError as exc:
            report["results"][model] = {"error": str(exc)}
    return report
