"""Decoding: one colour mode whatever the file, DICOM windowing, hostile images refused."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctscan.errors import ImageTooLargeError, UnsupportedImageError
from ctscan.imaging.decoding import decode_image, resize_for_model


def encode(image: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_rgba_rgb_and_greyscale_versions_of_one_slice_decode_identically() -> None:
    grey = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1)), mode="L")
    decoded = [decode_image(encode(grey.convert(mode))).pixels for mode in ("L", "RGB", "RGBA")]
    for pixels in decoded:
        assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
        np.testing.assert_array_equal(pixels, decoded[0])
    # greyscale repeated in every channel
    np.testing.assert_array_equal(decoded[0][..., 0], decoded[0][..., 2])


def test_transparent_pixels_become_black_not_white() -> None:
    rgba = Image.new("RGBA", (16, 16), (255, 255, 255, 0))
    assert decode_image(encode(rgba)).pixels.max() == 0


def test_sixteen_bit_png_is_stretched_to_eight_bits() -> None:
    array = np.linspace(0, 4000, 32 * 32, dtype=np.uint16).reshape(32, 32)
    pixels = decode_image(encode(Image.fromarray(array))).pixels
    assert pixels.min() == 0 and pixels.max() == 255


def test_cmyk_jpeg_decodes() -> None:
    data = encode(Image.new("CMYK", (32, 32), (0, 0, 0, 128)), "JPEG")
    decoded = decode_image(data)
    assert decoded.source_format == "JPEG" and decoded.pixels.shape == (32, 32, 3)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", UnsupportedImageError),
        (b"not an image at all", UnsupportedImageError),
        (encode(Image.new("RGB", (64, 64)))[:60], UnsupportedImageError),  # truncated PNG
        (encode(Image.new("RGB", (64, 64)), "GIF"), UnsupportedImageError),
        (encode(Image.new("RGB", (4, 4))), UnsupportedImageError),  # too small to be a slice
    ],
)
def test_bad_bytes_raise_clear_errors(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error) as raised:
        decode_image(data)
    assert str(raised.value)


def test_animated_png_is_refused() -> None:
    frames = [Image.new("L", (32, 32), value) for value in (0, 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:])
    with pytest.raises(UnsupportedImageError, match="animated"):
        decode_image(buffer.getvalue())


def test_absurd_dimensions_are_refused_before_decoding() -> None:
    data = encode(Image.new("1", (12000, 12000)))  # tiny file, 144 megapixels
    with pytest.raises(ImageTooLargeError):
        decode_image(data)


def _dicom_bytes(hounsfield: np.ndarray, *, with_pixels: bool = True) -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset("slice.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.PatientName = "Test^Patient"
    dataset.Modality = "CT"
    dataset.Rows, dataset.Columns = hounsfield.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated = 16
    dataset.BitsStored = 16
    dataset.HighBit = 15
    dataset.PixelRepresentation = 0
    dataset.RescaleSlope = 1
    dataset.RescaleIntercept = -2048
    if with_pixels:
        dataset.PixelData = (hounsfield + 2048).astype(np.uint16).tobytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_dicom_is_rescaled_to_hounsfield_and_lung_windowed() -> None:
    hounsfield = np.full((32, 32), -1350, dtype=np.int32)  # window floor
    hounsfield[:, 16:] = 150  # window ceiling
    hounsfield[0, 0] = -600  # window centre
    decoded = decode_image(_dicom_bytes(hounsfield))
    assert decoded.source_format == "DICOM"
    assert decoded.pixels[5, 0, 0] == 0 and decoded.pixels[5, 20, 0] == 255
    assert decoded.pixels[0, 0, 0] == 128


def test_dicom_without_pixel_data_is_refused() -> None:
    with pytest.raises(UnsupportedImageError, match="no pixel data"):
        decode_image(_dicom_bytes(np.zeros((32, 32), np.int32), with_pixels=False))


def test_resize_for_model_gives_float_pixels_in_range() -> None:
    pixels = np.full((100, 50, 3), 200, np.uint8)
    resized = resize_for_model(pixels, 64)
    assert resized.shape == (64, 64, 3) and resized.dtype == np.float32
    assert float(resized.max()) == pytest.approx(200.0)


def test_resizing_the_greyscale_gives_the_same_model_input_as_resizing_three_channels(
        real_ct_images: dict[str, Path]) -> None:
    # The service resizes the greyscale once (a third of the work); the numbers must not move.
    for path in real_ct_images.values():
        decoded = decode_image(path.read_bytes())
        assert decoded.grey.ndim == 2 and decoded.pixels.shape == (*decoded.grey.shape, 3)
        for size in (128, 160, 224, 299):
            np.testing.assert_array_equal(resize_for_model(decoded.grey, size),
                                          resize_for_model(decoded.pixels, size))
