"""Decoding costs what a CT slice costs: larger images are refused from their header, and a
deflated DICOM is never inflated beyond what the pixel limit allows (issue 24's attacks)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.hostile import big_png, deflated_dicom
from ctscan.errors import ImageTooLargeError
from ctscan.imaging.decoding import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SIDE,
    announced_pixels,
    decode_image,
    image_dimensions,
)


def test_the_limits_fit_ct() -> None:
    assert DEFAULT_MAX_SIDE == 2048 and DEFAULT_MAX_PIXELS == 2048 * 2048


def test_a_7000_px_png_is_refused_from_its_header() -> None:
    data = big_png(7000)
    assert len(data) < 200_000
    assert image_dimensions(data) == (7000, 7000)
    with pytest.raises(ImageTooLargeError, match="7000x7000"):
        announced_pixels(data)
    with pytest.raises(ImageTooLargeError):
        decode_image(data)


def test_larger_images_decode_when_configured() -> None:
    buffer = io.BytesIO()
    Image.new("L", (2500, 2100), 40).save(buffer, format="PNG")
    with pytest.raises(ImageTooLargeError):
        decode_image(buffer.getvalue())
    assert decode_image(buffer.getvalue(), max_pixels=10**7, max_side=4000).grey.shape == (2100, 2500)


def test_a_deflated_dicom_bomb_is_refused_before_it_is_inflated() -> None:
    bomb = deflated_dicom(7000)  # 98 MB of pixels in about 100 kB
    assert len(bomb) < 200_000
    assert image_dimensions(bomb) == (7000, 7000)
    with pytest.raises(ImageTooLargeError, match="7000x7000"):
        decode_image(bomb)


def test_a_deflated_dicom_that_lies_about_its_size_is_refused() -> None:
    import pydicom

    dataset = pydicom.dcmread(io.BytesIO(deflated_dicom(64)))
    dataset.PixelData = bytes(6000 * 6000 * 2)  # the header still says 64 x 64
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    assert image_dimensions(buffer.getvalue()) == (64, 64)
    with pytest.raises(ImageTooLargeError, match="deflated DICOM"):
        decode_image(buffer.getvalue())


def test_an_honest_deflated_dicom_still_decodes() -> None:
    decoded = decode_image(deflated_dicom(64))
    assert decoded.source_format == "DICOM" and decoded.grey.shape == (64, 64)
    assert decoded.hounsfield is not None and float(decoded.hounsfield.max()) == -1024.0


def test_headers_announce_what_decoding_finds_on_real_slices(data_dir: Path, ctmd_dir: Path) -> None:
    paths = sorted(p for p in data_dir.rglob("*") if p.suffix.lower() in (".png", ".jpg"))[::25]
    with (ctmd_dir / "labels.csv").open(newline="") as handle:
        paths += [ctmd_dir / row["path"] for row in list(csv.DictReader(handle))[::40]]
    assert any(p.suffix == ".jpg" for p in paths) and any(p.suffix == ".dcm" for p in paths)
    for path in paths:
        data = path.read_bytes()
        grey = decode_image(data).grey
        assert image_dimensions(data) == (grey.shape[1], grey.shape[0]), path.name
        assert announced_pixels(data) == grey.size


def test_unknown_headers_say_nothing() -> None:
    assert image_dimensions(b"not an image") is None
    assert image_dimensions(b"\x89PNG\r\n\x1a\n") is None
    assert image_dimensions(b"\xff\xd8\xff\xe0\x00\x10JFIF") is None
    assert announced_pixels(np.zeros(10, np.uint8).tobytes()) is None
