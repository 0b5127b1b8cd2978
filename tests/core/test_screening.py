"""Is it a CT slice at all? Colour, a handful of grey levels or pixel noise say no, before any
model runs; real slices from two hospitals pass."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from ctscan.data.dataset import CTDataset
from ctscan.evaluation.safety import generated_patterns, skimage_samples
from ctscan.gate import OUTCOME_NOT_CHEST_CT
from ctscan.imaging.decoding import DecodedImage, decode_image
from ctscan.imaging.preprocessing import LUNG_V1, prepare
from ctscan.imaging.screening import MAX_ROUGHNESS, appearance_refusal, roughness
from ctscan.serving.predictor import input_refusal


@pytest.fixture(scope="module")
def foreign() -> dict[str, DecodedImage]:
    """Photos, drawings and noise, made once (about a second and a half)."""
    return dict([*skimage_samples(), *generated_patterns()])


@pytest.mark.slow
def test_real_slices_of_both_hospitals_pass(data_dir: Path, ctmd_dir: Path) -> None:
    dataset = CTDataset(data_dir)
    paths = [s.path for split in ("train", "val", "test") for s in dataset.split(split)[::3]]
    with (ctmd_dir / "split.csv").open(newline="") as handle:
        paths += [ctmd_dir / row["path"] for row in list(csv.DictReader(handle))[::3]]
    refused = {p.name: reason for p in paths if (reason := appearance_refusal(decode_image(p.read_bytes())))}
    assert refused == {}


@pytest.mark.parametrize(("name", "words"), [
    ("skimage:astronaut", "colour image"), ("skimage:immunohistochemistry", "colour image"),
    ("skimage:logo", "colour image"), ("pattern:colour-noise", "colour image"),
    ("skimage:horse", "grey levels"), ("skimage:checkerboard", "grey levels"),
    ("pattern:disc-with-two-holes", "grey levels"),
    ("pattern:uniform-noise", "noise"), ("pattern:gaussian-noise", "noise"), ("skimage:grass", "noise"),
])
def test_photos_drawings_and_noise_are_not_chest_ct(foreign: dict[str, DecodedImage], name: str, words: str) -> None:
    decoded = foreign[name]
    reason = appearance_refusal(decoded)
    assert reason is not None and words in reason
    decision = input_refusal(decoded, prepare(decoded, LUNG_V1))
    assert decision is not None and decision.outcome == OUTCOME_NOT_CHEST_CT and decision.reasons == [reason]


def test_roughness_separates_smooth_images_from_noise(foreign: dict[str, DecodedImage]) -> None:
    patterns = foreign
    assert roughness(patterns["pattern:radial-gradient"].grey) < 0.01
    assert roughness(patterns["pattern:uniform-noise"].grey) > 2 * MAX_ROUGHNESS
