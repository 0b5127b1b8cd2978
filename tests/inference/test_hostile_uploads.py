"""Malformed and hostile uploads: every one gets a 4xx JSON error and the service keeps answering."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inference.conftest import RunningService
from inference.test_api import _dicom_bytes

GOOD_SHAPE = (64, 64)


def _png(mode: str = "L", size: tuple[int, int] = GOOD_SHAPE, **save: object) -> bytes:
    if mode in ("I;16", "I"):
        image = Image.fromarray((np.arange(size[0] * size[1]) % 4096).reshape(size[1], size[0]).astype(np.uint16))
    else:
        image = Image.new(mode, size, 128 if mode in ("L", "P", "1") else (10, 20, 30, 40)[:len(mode)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save)
    return buffer.getvalue()


def _encode(image: Image.Image, image_format: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **save)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_header_only(width: int, height: int, bit_depth: int = 8, colour: int = 0) -> bytes:
    """A PNG that announces `width` x `height` with a tiny compressed body (a bomb's shape)."""
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0))
    body = _png_chunk(b"IDAT", zlib.compress(b"\0" * 1024, 9))
    return b"\x89PNG\r\n\x1a\n" + header + body + _png_chunk(b"IEND", b"")


def _decompression_bomb() -> bytes:
    # 20000 x 20000 zeros deflate to about 400 kB: under the upload limit, 400 MB once decoded.
    row = b"\0" + b"\0" * 20_000
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(20_000)) + compressor.flush()
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 20_000, 20_000, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def _animated(image_format: str) -> bytes:
    frames = [Image.new("L", GOOD_SHAPE, shade) for shade in (0, 128, 255)]
    return _encode(frames[0], image_format, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _jpeg(mode: str = "L", size: tuple[int, int] = GOOD_SHAPE) -> bytes:
    return _encode(Image.new(mode, size, 100 if mode == "L" else (100,) * len(mode)), "JPEG")


def _truncated(data: bytes, keep: float) -> bytes:
    return data[: max(1, int(len(data) * keep))]


def _real_png() -> bytes:
    return _encode(Image.fromarray(np.random.default_rng(1).integers(0, 255, (96, 96), dtype=np.uint8)), "PNG")


def _dicom_variant(**tags: object) -> bytes:
    import pydicom

    dataset = pydicom.dcmread(io.BytesIO(_dicom_bytes()))
    for name, value in tags.items():
        setattr(dataset, name, value)
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    return buffer.getvalue()


def _dicom_bad_pixels() -> bytes:
    import pydicom

    dataset = pydicom.dcmread(io.BytesIO(_dicom_bytes()))
    dataset.PixelData = dataset.PixelData[:100]  # far fewer bytes than Rows x Columns
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    return buffer.getvalue()


def _flipped_bytes(data: bytes, start: int) -> bytes:
    corrupted = bytearray(data)
    for index in range(start, len(corrupted), 7):
        corrupted[index] ^= 0xFF
    return bytes(corrupted)


# name -> (builder, accepted statuses)
CASES: dict[str, tuple[Callable[[], bytes], tuple[int, ...]]] = {
    "empty": (lambda: b"", (415, 422)),
    "one_byte": (lambda: b"\x89", (415,)),
    "png_magic_only": (lambda: b"\x89PNG\r\n\x1a\n", (422,)),
    "jpeg_magic_only": (lambda: b"\xff\xd8\xff", (422,)),
    "text": (lambda: b"hello, this is not an image\n" * 10, (415,)),
    "html": (lambda: b"<html><script>alert(1)</script></html>", (415,)),
    "json": (lambda: b'{"label": "COVID"}', (415,)),
    "pdf": (lambda: b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", (415,)),
    "zip": (lambda: b"PK\x03\x04" + b"\0" * 200, (415,)),
    "zlib_stream": (lambda: zlib.compress(b"\0" * 100000), (415,)),
    "elf": (lambda: b"\x7fELF" + b"\0" * 200, (415,)),
    "random_bytes": (lambda: np.random.default_rng(0).bytes(5000), (415,)),
    "null_bytes": (lambda: b"\0" * 4096, (415,)),
    "gif": (lambda: _encode(Image.new("L", GOOD_SHAPE, 50), "GIF"), (415,)),
    "animated_gif": (lambda: _animated("GIF"), (415,)),
    "animated_png_apng": (lambda: _animated("PNG"), (422,)),
    "bmp": (lambda: _encode(Image.new("RGB", GOOD_SHAPE), "BMP"), (415,)),
    "tiff": (lambda: _encode(Image.new("L", GOOD_SHAPE), "TIFF"), (415,)),
    "webp": (lambda: _encode(Image.new("RGB", GOOD_SHAPE), "WEBP"), (415,)),
    "ico": (lambda: _encode(Image.new("RGB", (32, 32)), "ICO"), (415,)),
    "svg": (lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="99999" height="99999"/>', (415,)),
    "truncated_png_half": (lambda: _truncated(_real_png(), 0.5), (422,)),
    "truncated_png_header": (lambda: _truncated(_real_png(), 0.05), (422,)),
    "truncated_jpeg_half": (lambda: _truncated(_jpeg(size=(128, 128)), 0.5), (200, 422)),
    "truncated_jpeg_header": (lambda: _jpeg()[:20], (422,)),
    "corrupt_png_body": (lambda: _flipped_bytes(_real_png(), 60), (422,)),
    "corrupt_jpeg_body": (lambda: _flipped_bytes(_jpeg(size=(128, 128)), 40), (200, 422)),
    "png_bad_crc": (lambda: _real_png()[:29] + b"\0\0\0\0" + _real_png()[33:], (422,)),
    "png_huge_dimensions_header": (lambda: _png_header_only(100_000, 100_000), (413,)),
    "png_max_dimensions_header": (lambda: _png_header_only(2**31 - 1, 2**31 - 1), (413, 422)),
    "png_wide_strip": (lambda: _png_header_only(60_000, 8), (413,)),
    "png_tall_strip": (lambda: _png_header_only(8, 60_000), (413,)),
    "png_zero_width": (lambda: _png_header_only(0, 64), (422,)),
    "png_decompression_bomb": (_decompression_bomb, (413,)),
    "png_too_small_1x1": (lambda: _png("L", (1, 1)), (422,)),
    "png_too_small_4x200": (lambda: _png("L", (4, 200)), (422,)),
    "png_16bit_header_lie": (lambda: _png_header_only(64, 64, bit_depth=16, colour=0)[:-12], (422,)),
    "png_invalid_bit_depth": (lambda: _png_header_only(64, 64, bit_depth=7), (422,)),
    "png_invalid_colour_type": (lambda: _png_header_only(64, 64, colour=5), (422,)),
    "jpeg_huge_dimensions": (lambda: _jpeg_with_size(60_000, 60_000), (413,)),
    "jpeg_cmyk_huge": (lambda: _jpeg_with_size(12_000, 12_000, mode="CMYK"), (413,)),
    "dicom_without_pixels": (lambda: _dicom_bytes(with_pixels=False), (422,)),
    "dicom_truncated": (lambda: _truncated(_dicom_bytes(), 0.3), (422,)),
    "dicom_magic_only": (lambda: b"\0" * 128 + b"DICM", (422,)),
    "dicom_short_pixels": (_dicom_bad_pixels, (422,)),
    "dicom_huge_dimensions": (lambda: _dicom_variant(Rows=60_000, Columns=60_000), (413,)),
    "dicom_tiny_dimensions": (lambda: _dicom_bytes(rows=2, columns=2), (422,)),
    "dicom_multiframe": (lambda: _dicom_variant(NumberOfFrames=3), (422,)),
    "dicom_garbage_after_magic": (lambda: b"\0" * 128 + b"DICM" + np.random.default_rng(2).bytes(3000), (422,)),
    "jpeg2000": (lambda: b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\0" * 200, (415,)),
    "photoshop_psd": (lambda: b"8BPS\x00\x01" + b"\0" * 200, (415,)),
    "utf16_text": (lambda: "not an image".encode("utf-16"), (415,)),
    "png_magic_then_jpeg": (lambda: b"\x89PNG\r\n\x1a\n" + _jpeg(), (422,)),
    "jpeg_magic_then_png": (lambda: b"\xff\xd8\xff" + _real_png(), (422,)),
    "png_then_garbage_type": (lambda: b"\x89PNG\r\n\x1a\n" + b"<?php system($_GET['c']); ?>", (422,)),
}


def _jpeg_with_size(width: int, height: int, mode: str = "L") -> bytes:
    """A small JPEG whose SOF marker claims `width` x `height`."""
    data = bytearray(_jpeg(mode))
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        index = data.find(marker)
        if index >= 0:
            data[index + 5:index + 9] = struct.pack(">HH", height, width)
            return bytes(data)
    raise AssertionError("no SOF marker")


# Well-formed but unusual images that must be *accepted* (converted as in training).
ACCEPTED: dict[str, Callable[[], bytes]] = {
    "png_16bit_greyscale": lambda: _png("I;16"),
    "png_rgba": lambda: _png("RGBA"),
    "png_la": lambda: _png("LA"),
    "png_palette": lambda: _png("P"),
    "png_1bit": lambda: _png("1"),
    "jpeg_cmyk": lambda: _jpeg("CMYK"),
    "jpeg_progressive": lambda: _encode(Image.new("L", GOOD_SHAPE, 90), "JPEG", progressive=True),
}


def test_there_are_at_least_fifty_hostile_cases() -> None:
    assert sum(1 for _, statuses in CASES.values() if 200 not in statuses) >= 50


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_upload_gets_4xx_json(inference_service: RunningService, case: str) -> None:
    builder, statuses = CASES[case]
    response = inference_service.predict(builder(), filename=f"{case}.bin", params={"model": "mobilenetv2"})
    assert response.status_code in statuses, (response.status_code, response.text[:300])
    if response.status_code != 200:
        body = response.json()
        assert set(body) == {"error"} and body["error"]["code"] and body["error"]["message"]
    assert inference_service.get("/healthz").status_code == 200


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_unusual_but_valid_images_are_converted(inference_service: RunningService, case: str) -> None:
    response = inference_service.predict(ACCEPTED[case](), params={"model": "mobilenetv2"})
    assert response.status_code == 200, response.text[:300]
    body = response.json()
    # Decoded as in training, then judged: these flat test patterns are no CT slices (a few
    # grey levels) or show no lungs, and are reported as such, never classified.
    assert body["outcome"] in ("not_chest_ct", "no_lungs_visible") and body["probability_covid"] is None
    assert any(words in body["reasons"][0] for words in ("grey levels", "colour image", "no lungs visible"))


def test_wrong_content_type_and_filename_do_not_matter(inference_service: RunningService,
                                                       real_ct_images: dict[str, Path]) -> None:
    path = next(iter(sorted(real_ct_images.values())))
    response = inference_service.predict(path.read_bytes(), filename="notes.txt", content_type="text/plain",
                                         params={"model": "mobilenetv2"})
    assert response.status_code == 200


@pytest.mark.parametrize("explain", ["maybe", "2", ""])
def test_bad_explain_flag_is_422(inference_service: RunningService, explain: str) -> None:
    response = inference_service.predict(_png(), params={"model": "mobilenetv2", "explain": explain})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"


def test_raw_body_and_broken_multipart_are_4xx(inference_service: RunningService) -> None:
    import requests

    url = inference_service.url + "/predict"
    key = inference_service.headers
    raw = requests.post(url, data=_png(), headers={"Content-Type": "image/png", **key}, timeout=30)
    assert raw.status_code == 422 and "error" in raw.json()
    broken = requests.post(url, data=b"--xyz\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc",
                           headers={"Content-Type": "multipart/form-data; boundary=xyz", **key}, timeout=30)
    assert 400 <= broken.status_code < 500 and "error" in broken.json()
    no_boundary = requests.post(url, data=b"abc", headers={"Content-Type": "multipart/form-data", **key},
                                timeout=30)
    assert 400 <= no_boundary.status_code < 500 and "error" in no_boundary.json()


def test_service_still_predicts_after_the_barrage(inference_service: RunningService,
                                                  real_ct_images: dict[str, Path]) -> None:
    path = next(iter(sorted(real_ct_images.values())))
    response = inference_service.predict(path.read_bytes(), params={"model": "ensemble"})
    assert response.status_code == 200 and response.json()["label"] in ("COVID", "non-COVID")
    assert "Traceback" not in inference_service.log()


def test_oversized_slices_and_studies_are_refused_from_their_headers_while_others_are_served(
        inference_service: RunningService, real_ct_images: dict[str, Path]) -> None:
    """Issue 24's attacks: a 7000 x 7000 PNG (86 kB), a ZIP of six 7000 x 7000 deflated DICOM
    slices (1 MB) and a ZIP of 250 MiB of zeros (over the 64 MiB study budget here) each get 413 without being decoded,
    while an ordinary slice sent alongside is answered."""
    from concurrent.futures import ThreadPoolExecutor

    from bench.hostile import big_png, deflated_dicom, zip_of, zip_of_zeros

    ordinary = next(iter(sorted(real_ct_images.values()))).read_bytes()
    with ThreadPoolExecutor(4) as pool:
        png = pool.submit(inference_service.predict, big_png(7000), params={"model": "mobilenetv2"})
        dicoms = pool.submit(inference_service.predict_study, [zip_of([deflated_dicom(7000)] * 6)],
                             params={"model": "mobilenetv2"})
        zeros = pool.submit(inference_service.predict_study, [zip_of_zeros(250)], params={"model": "mobilenetv2"})
        answer = pool.submit(inference_service.predict, ordinary, params={"model": "mobilenetv2"})
        refused = [png.result(), dicoms.result(), zeros.result()]
        assert answer.result().status_code == 200
    for response in refused:
        assert response.status_code == 413, response.text[:300]
        assert response.json()["error"]["code"] == "image_too_large"
    assert "7000x7000" in refused[0].text and "slice 1 of the upload" in refused[1].text
    assert "expands to more than" in refused[2].text
