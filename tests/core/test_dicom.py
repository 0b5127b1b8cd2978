"""DICOM as hospitals send it: compressed transfer syntaxes, Hounsfield units, no patient data kept."""

from __future__ import annotations

import io
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from ctscan.errors import UnsupportedImageError, UnsupportedTransferSyntaxError
from ctscan.imaging.decoding import SUPPORTED_TRANSFER_SYNTAXES, decode_image


def _slice(hounsfield: np.ndarray, **tags: object) -> object:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset("slice.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.PatientName, dataset.PatientID, dataset.PatientBirthDate = "Doe^Jane", "PID-12345", "19700101"
    dataset.InstitutionName, dataset.AccessionNumber = "St Example Hospital", "ACC-999"
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
    dataset.Modality = "CT"
    dataset.Rows, dataset.Columns = hounsfield.shape
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 12, 11, 0
    dataset.RescaleSlope, dataset.RescaleIntercept = 1, -1024
    dataset.ImagePositionPatient, dataset.ImageOrientationPatient = [0, 0, -120.5], [1, 0, 0, 0, 1, 0]
    dataset.PixelData = (hounsfield + 1024).astype(np.uint16).tobytes()
    for key, value in tags.items():
        setattr(dataset, key, value)
    return dataset


def _save(dataset: object) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)  # type: ignore[attr-defined]
    return buffer.getvalue()


def _phantom_hu() -> np.ndarray:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:64, 0:64]
    hounsfield = np.where(((x - 32) / 28) ** 2 + ((y - 32) / 22) ** 2 < 1, 40, -1000)
    hounsfield = np.where(((x - 20) / 8) ** 2 + ((y - 32) / 14) ** 2 < 1, -850, hounsfield)
    return (hounsfield + rng.integers(-20, 20, hounsfield.shape)).astype(np.int32)


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEGLSLossless", "JPEG2000Lossless"])
def test_lossless_compressed_dicom_decodes_to_the_same_hounsfield_units(syntax: str) -> None:
    import pydicom.uid

    hounsfield = _phantom_hu()
    dataset = _slice(hounsfield)
    dataset.compress(getattr(pydicom.uid, syntax))  # type: ignore[attr-defined]
    data = _save(dataset)
    assert str(getattr(pydicom.uid, syntax)) in SUPPORTED_TRANSFER_SYNTAXES
    decoded = decode_image(data)
    assert decoded.source_format == "DICOM" and decoded.hounsfield is not None
    np.testing.assert_array_equal(decoded.hounsfield, hounsfield.astype(np.float32))


def test_jpeg_baseline_dicom_decodes_close_to_the_original() -> None:
    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    hounsfield = _phantom_hu()
    stored = np.clip(hounsfield + 1024, 0, 255).astype(np.uint8)  # an 8-bit export, intercept -1024
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="JPEG", quality=95)
    dataset = _slice(hounsfield, BitsAllocated=8, BitsStored=8, HighBit=7)
    dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit  # type: ignore[attr-defined]
    dataset.PixelData = encapsulate([buffer.getvalue()])  # type: ignore[attr-defined]
    decoded = decode_image(_save(dataset))
    assert decoded.hounsfield is not None
    assert np.abs(decoded.hounsfield - (stored.astype(np.float32) - 1024)).mean() < 3.0


def test_every_ct_md_slice_decodes_through_the_jpeg_lossless_handler(ctmd_dir: Path) -> None:
    files = sorted(ctmd_dir.rglob("*.dcm"))
    assert len(files) == 235
    for path in files:
        decoded = decode_image(path.read_bytes())
        assert decoded.hounsfield is not None and decoded.hounsfield.shape == (512, 512)
        assert decoded.hounsfield.min() <= -900 and decoded.hounsfield.max() >= 100  # air and bone
        assert decoded.dicom is not None and decoded.dicom.modality == "CT"
        assert decoded.dicom.slice_location is not None and decoded.dicom.position is not None


def test_only_digests_of_identities_are_kept() -> None:
    decoded = decode_image(_save(_slice(_phantom_hu())))
    assert decoded.dicom is not None
    kept = repr(asdict(decoded.dicom)) + repr(decoded)
    for secret in ("Doe", "Jane", "PID-12345", "19700101", "St Example", "ACC-999"):
        assert secret not in kept
    assert decoded.dicom.position == pytest.approx(-120.5)
    other = decode_image(_save(_slice(_phantom_hu(), PatientID="PID-67890")))
    assert other.dicom is not None and other.dicom.patient_digest != decoded.dicom.patient_digest


def test_an_unsupported_transfer_syntax_is_named() -> None:
    from pydicom.encaps import encapsulate

    dataset = _slice(_phantom_hu())
    dataset.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # type: ignore[attr-defined]  # MPEG2
    dataset.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(64)])  # type: ignore[attr-defined]
    with pytest.raises(UnsupportedTransferSyntaxError, match=r"1\.2\.840\.10008\.1\.2\.4\.100"):
        decode_image(_save(dataset))


def test_multi_frame_dicom_is_refused_with_the_frame_count() -> None:
    frames = np.stack([_phantom_hu()] * 3)
    dataset = _slice(frames[0], NumberOfFrames=3)
    dataset.PixelData = (frames + 1024).astype(np.uint16).tobytes()  # type: ignore[attr-defined]
    with pytest.raises(UnsupportedImageError, match="3 frames"):
        decode_image(_save(dataset))


def test_broken_compressed_pixel_data_names_the_syntax() -> None:
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLosslessSV1

    dataset = _slice(_phantom_hu())
    dataset.file_meta.TransferSyntaxUID = JPEGLosslessSV1  # type: ignore[attr-defined]
    dataset.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + bytes(200)])  # type: ignore[attr-defined]
    with pytest.raises(UnsupportedImageError, match="JPEG Lossless"):
        decode_image(_save(dataset))
