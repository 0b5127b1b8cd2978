"""Lung-focused preprocessing on real slices: what the models see, the same in training and serving."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ctscan.data.dataset import CTDataset
from ctscan.errors import ModelError
from ctscan.imaging.decoding import decode_image
from ctscan.imaging.preprocessing import (
    AIR_LEVEL,
    LEGACY,
    LUNG_V1,
    LUNGMASK_V1,
    card_preprocessing,
    get_preprocessor,
    lung_region_mask,
    prepare,
)


@pytest.fixture(scope="module")
def ucsd_slices(data_dir: Path) -> list:
    dataset = CTDataset(data_dir)
    chosen = dataset.split("test")[::10]  # 21 slices of both classes, PNG and JPEG, many sizes
    return [decode_image(s.path.read_bytes()) for s in chosen]


def _ctmd(ctmd_dir: Path, row: dict[str, str]):
    return decode_image((ctmd_dir / row["path"]).read_bytes())


def test_real_chest_slices_are_cropped_to_their_lungs(ucsd_slices: list) -> None:
    for decoded in ucsd_slices:
        prepared = prepare(decoded, LUNG_V1)
        assert prepared.lungs_visible, prepared.reason
        height, width = prepared.grey.shape
        assert height == width and prepared.grey.dtype == np.uint8
        assert prepared.lung_mask is not None and prepared.lung_mask.shape == prepared.grey.shape
        lungs = prepared.grey[prepared.lung_mask]
        # Lung air lands near the same standardised level whatever the source's window was.
        assert abs(np.percentile(lungs, 10) / 255.0 - AIR_LEVEL) < 0.08
        assert 0.15 < prepared.lung_mask.mean() < 0.9
        assert prepared.model_input(128).shape == (128, 128, 3)


def test_window_and_brightness_of_the_source_stop_mattering(ucsd_slices: list) -> None:
    for decoded in ucsd_slices[:8]:
        changed_grey = np.clip(decoded.grey.astype(np.float32) * 0.8 + 30, 0, 255).astype(np.uint8)
        before = prepare(decoded, LUNG_V1).model_input(128)
        after = prepare(replace(decoded, grey=changed_grey), LUNG_V1).model_input(128)
        raw_change = np.abs(decoded.grey.astype(np.float32) - changed_grey).mean()
        assert np.abs(before - after).mean() < 0.35 * raw_change


def test_text_outside_the_body_is_blanked(ctmd_dir: Path, ctmd_slices: dict) -> None:
    row = ctmd_slices["normal001"][len(ctmd_slices["normal001"]) // 3]  # mid chest: air all around
    decoded = _ctmd(ctmd_dir, row)
    # A screenshot of the slice (lung window, no Hounsfield units) with a white label in a corner.
    image = Image.fromarray(decoded.grey)
    ImageDraw.Draw(image).rectangle((8, 8, 120, 40), fill=255)
    raster = replace(decoded, grey=np.asarray(image), hounsfield=None, dicom=None)
    prepared = prepare(raster, LUNG_V1)
    assert prepared.lungs_visible
    top, left, _, _ = prepared.findings.crop_box
    # The label lies outside the crop or was blanked with the outside air.
    if top < 40 and left < 120:
        assert prepared.grey[: 40 - top, : 120 - left].max() == 0


def test_slices_without_lungs_are_reported_with_a_reason(ctmd_dir: Path, ctmd_slices: dict) -> None:
    for study in ("P001", "normal001"):
        abdomen, neck = ctmd_slices[study][0], ctmd_slices[study][-1]
        for row in (abdomen, neck):
            prepared = prepare(_ctmd(ctmd_dir, row), LUNG_V1)
            assert not prepared.lungs_visible
            assert prepared.reason is not None and "no lungs visible" in prepared.reason
        middle = ctmd_slices[study][len(ctmd_slices[study]) // 2]
        assert prepare(_ctmd(ctmd_dir, middle), LUNG_V1).lungs_visible


def test_dicom_starts_from_hounsfield_units_and_agrees_with_its_screenshot(ctmd_dir: Path, ctmd_slices: dict) -> None:
    row = ctmd_slices["P001"][len(ctmd_slices["P001"]) // 2]
    decoded = _ctmd(ctmd_dir, row)
    from_hounsfield = prepare(decoded, LUNG_V1)
    from_screenshot = prepare(replace(decoded, hounsfield=None, dicom=None), LUNG_V1)
    a, b = from_hounsfield.findings.crop_box, from_screenshot.findings.crop_box
    overlap = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - overlap
    assert overlap / union > 0.8


def test_lungmask_blanks_what_lies_away_from_the_lungs(ucsd_slices: list) -> None:
    for decoded in ucsd_slices[:6]:
        cropped, masked = prepare(decoded, LUNG_V1), prepare(decoded, LUNGMASK_V1)
        assert cropped.grey.shape == masked.grey.shape
        far = ~masked.lung_mask
        assert (masked.grey == 0).mean() >= (cropped.grey == 0).mean()
        assert masked.grey[masked.lung_mask].mean() == pytest.approx(cropped.grey[cropped.lung_mask].mean(), abs=1.0)
        assert (masked.grey[far] == 0).mean() > 0.5


def test_legacy_is_the_whole_slice_unchanged(ucsd_slices: list) -> None:
    decoded = ucsd_slices[0]
    prepared = get_preprocessor(LEGACY)(decoded)
    assert prepared.grey is decoded.grey and prepared.lungs_visible and prepared.lung_mask is None
    assert lung_region_mask(decoded).shape == decoded.grey.shape


def test_model_cards_name_their_preprocessing() -> None:
    assert card_preprocessing({}) == LEGACY  # cards of the first release
    assert card_preprocessing({"preprocessing": {"name": LUNG_V1}}) == LUNG_V1
    with pytest.raises(ModelError, match="unknown preprocessing"):
        card_preprocessing({"preprocessing": {"name": "lung-v99"}})


def test_blank_and_flat_images_do_not_crash() -> None:
    for grey in (np.zeros((64, 64), np.uint8), np.full((64, 64), 200, np.uint8),
                 np.random.default_rng(0).integers(0, 255, (80, 60)).astype(np.uint8)):
        from ctscan.imaging.decoding import DecodedImage

        prepared = prepare(DecodedImage(grey=grey, source_format="PNG"), LUNG_V1)
        assert prepared.grey.dtype == np.uint8 and prepared.grey.ndim == 2
        if not prepared.lungs_visible:
            assert prepared.reason
