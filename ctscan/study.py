"""Whole studies: unpacking an upload safely, one series in slice order, and one verdict.

An upload is several files or one ZIP of a series. ZIPs are read within limits (entries,
total and per-entry expanded size, expansion ratio), and entries that could escape or
nest (absolute or `..` names, links, archives inside the archive) are refused. The slices
must come from one patient and one series (compared by digest, see
`ctscan.imaging.decoding.DicomSliceInfo`); they are ordered along the body axis by Image Position
Patient, else Slice Location, else Instance Number, else as uploaded.

The study's probability is the mean of its `k` most suspicious slices' calibrated
probabilities, k = max(MIN_TOP_K, TOP_K_SHARE of the slices that show lungs). COVID-19
pneumonia is patchy: a rule on the single worst slice lets one noisy slice decide a
study, a mean over all slices dilutes a lobe's worth of disease among normal apices and
bases. No data set with study labels is available for choosing k (UCSD has single
slices; CT-MD is a test set), so the rule is fixed a priori, documented, and reported on
CT-MD's three studies as a check, not tuned there.
"""

from __future__ import annotations

import io
import math
import stat
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ctscan.errors import CTScanError, ImageError, ImageTooLargeError
from ctscan.imaging.decoding import DicomSliceInfo

MIN_TOP_K = 3
TOP_K_SHARE = 0.10
AGGREGATION_RULE = "top_k_mean"

DEFAULT_MAX_SLICES = 1000
DEFAULT_MAX_TOTAL_BYTES = 1 << 30  # 1 GiB expanded: 500 uncompressed 512x512 slices take 260 MB
DEFAULT_MAX_RATIO = 100  # DICOM compresses 2-5x; far more is a bomb
DEFAULT_MAX_TOTAL_PIXELS = DEFAULT_MAX_SLICES * 512 * 512  # decoding cost: 1000 slices of 512 x 512
_ARCHIVE_SUFFIXES = (".zip", ".gz", ".tgz", ".tar", ".7z", ".rar", ".bz2", ".xz")


class StudyError(CTScanError):
    """The upload is not one usable series (mixed, empty, unordered): HTTP 422."""


class ArchiveError(ImageError):
    """A ZIP that is refused as hostile or unreadable: HTTP 422 (413 for size limits)."""


@dataclass(frozen=True)
class StudyLimits:
    max_slices: int = DEFAULT_MAX_SLICES
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES
    max_ratio: int = DEFAULT_MAX_RATIO


def is_zip(data: bytes) -> bool:
    return data[:4] in (b"PK\x03\x04", b"PK\x05\x06")


def unpack_zip(data: bytes, limits: StudyLimits) -> list[bytes]:
    """The files of a ZIP of one series, read within `limits`. Folders and the DICOMDIR
    index are skipped; everything else must be a plain file. Entry names are never echoed
    (they can carry patient names): errors say "entry N"."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as exc:
        raise ArchiveError(f"cannot read the ZIP archive: {type(exc).__name__}") from None
    files: list[bytes] = []
    with archive:
        entries = archive.infolist()
        if len(entries) > limits.max_slices + 16:  # a few index and readme files besides the slices
            raise ImageTooLargeError(f"the ZIP holds {len(entries)} entries; at most {limits.max_slices} slices "
                                     "per study are accepted")
        # The budget from the central directory, before a single byte is inflated (a lying
        # entry is caught below: no entry is read beyond the size it announced).
        total = sum(entry.file_size for entry in entries if not entry.is_dir())
        if total > limits.max_total_bytes:
            raise ImageTooLargeError(f"the ZIP expands to more than {limits.max_total_bytes} bytes ({total}); "
                                     "refused")
        for number, entry in enumerate(entries, 1):
            name = entry.filename.replace("\\", "/")
            if entry.is_dir():
                continue
            if name.startswith("/") or ".." in name.split("/") or (len(name) > 1 and name[1] == ":"):
                raise ArchiveError(f"ZIP entry {number} has a path that leaves the archive; refused")
            if stat.S_ISLNK(entry.external_attr >> 16):
                raise ArchiveError(f"ZIP entry {number} is a symbolic link; refused")
            if name.lower().endswith(_ARCHIVE_SUFFIXES):
                raise ArchiveError(f"ZIP entry {number} is an archive inside the archive; send one ZIP of DICOM files")
            if name.rsplit("/", 1)[-1].upper() == "DICOMDIR":
                continue
            if entry.flag_bits & 0x1:
                raise ArchiveError(f"ZIP entry {number} is encrypted; send an unencrypted ZIP")
            if entry.file_size > limits.max_ratio * max(entry.compress_size, 1) and entry.file_size > 1 << 20:
                ratio = entry.file_size / max(entry.compress_size, 1)
                raise ImageTooLargeError(f"ZIP entry {number} expands {ratio:.0f} times (limit {limits.max_ratio}); "
                                         "refused as a ZIP bomb")
            try:
                with archive.open(entry) as handle:
                    # Read at most what the header announced (+1 byte to catch a lying header).
                    content = handle.read(entry.file_size + 1)
            except (zipfile.BadZipFile, OSError, ValueError, RuntimeError, EOFError) as exc:
                raise ArchiveError(f"ZIP entry {number} cannot be read: {type(exc).__name__}") from None
            if len(content) > entry.file_size:
                raise ArchiveError(f"ZIP entry {number} is larger than its header says; refused")
            files.append(content)
    if not files:
        raise StudyError("the ZIP holds no files")
    return files


def check_pixel_budget(blobs: Sequence[bytes], *, max_total_pixels: int, max_pixels: int,
                       max_side: int) -> list[int | None]:
    """Refuse a study whose slices announce (in their headers: PNG IHDR, JPEG SOF, DICOM Rows
    x Columns) more pixels than one slice or the whole study may have, before any is decoded.
    Returns each slice's announced pixels (None where the header does not say)."""
    from ctscan.imaging.decoding import announced_pixels

    announced: list[int | None] = []
    total = 0
    for number, data in enumerate(blobs, 1):
        try:
            pixels = announced_pixels(data, max_pixels=max_pixels, max_side=max_side)
        except ImageTooLargeError as exc:
            raise ImageTooLargeError(f"slice {number} of the upload: {exc}") from None
        announced.append(pixels)
        total += pixels or 0
        if total > max_total_pixels:
            raise ImageTooLargeError(f"the study's slices hold more than {max_total_pixels} pixels in all "
                                     f"(as many as {max_total_pixels // (512 * 512)} slices of 512x512); refused")
    return announced


@dataclass(frozen=True)
class OrderedSlice:
    upload_index: int  # position in the upload (after unpacking)
    position_mm: float | None  # along the body axis, relative to the first slice


def order_series(infos: Sequence[DicomSliceInfo | None]) -> list[OrderedSlice]:
    """Check that the slices (their DICOM facts; None for a PNG/JPEG) are one series of one
    patient, and order them along the body axis."""
    if not infos:
        raise StudyError("the study holds no slices")
    dicom = [info is not None for info in infos]
    if any(dicom) and not all(dicom):
        raise StudyError("the study mixes DICOM slices with PNG/JPEG images; send one kind")
    if not all(dicom):  # screenshots: no header, the upload's order is the only order there is
        return [OrderedSlice(index, None) for index in range(len(infos))]
    dicom_infos = [info for info in infos if info is not None]
    patients = {info.patient_digest for info in dicom_infos}
    if len(patients) > 1:
        raise StudyError(f"the slices belong to {len(patients)} different patients; send one patient's series")
    series = {info.series_digest for info in dicom_infos}
    if len(series) > 1:
        raise StudyError(f"the slices belong to {len(series)} different series; send one series")
    for key in ("position", "slice_location", "instance_number"):
        values = [getattr(info, key) for info in dicom_infos]
        if all(v is not None for v in values):
            order = sorted(range(len(infos)), key=lambda i: (values[i], i))
            break
    else:
        order = list(range(len(infos)))
    positions = [dicom_infos[i].position if dicom_infos[i].position is not None
                 else dicom_infos[i].slice_location for i in order]
    origin = positions[0]
    return [OrderedSlice(index, None if origin is None or p is None else round(float(p) - float(origin), 2))
            for index, p in zip(order, positions, strict=True)]


def top_k(count: int) -> int:
    return min(count, max(MIN_TOP_K, math.ceil(TOP_K_SHARE * count)))


def aggregate(probabilities: Sequence[float]) -> tuple[float, int]:
    """The study's probability (mean of the k highest) and k."""
    values = np.sort(np.asarray(probabilities, dtype=np.float64))[::-1]
    if values.size == 0:
        raise StudyError("no slice of the study shows lungs; nothing to classify")
    k = top_k(values.size)
    return float(values[:k].mean()), k

