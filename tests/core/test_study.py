"""Study uploads: ZIPs read within limits, one series of one patient, ordered along the body."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from ctscan.errors import ImageTooLargeError
from ctscan.imaging.decoding import decode_image
from ctscan.study import ArchiveError, StudyError, StudyLimits, aggregate, order_series, top_k, unpack_zip


def _zip(entries: dict[str, bytes], *, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_a_series_zip_unpacks_and_orders_from_abdomen_to_neck(ctmd_dir: Path, ctmd_slices: dict) -> None:
    rows = ctmd_slices["normal001"]
    shuffled = rows[1::2] + rows[::2]
    data = _zip({f"series/{i:03d}.dcm": (ctmd_dir / r["path"]).read_bytes() for i, r in enumerate(shuffled)}
                | {"DICOMDIR": b"index", "series/": b""})
    files = unpack_zip(data, StudyLimits())
    assert len(files) == len(rows)
    decoded = [decode_image(f) for f in files]
    ordered = order_series([d.dicom for d in decoded])
    locations = [decoded[s.upload_index].dicom.slice_location for s in ordered]
    assert locations == sorted(float(r["slice_location"]) for r in rows)
    assert ordered[0].position_mm == 0.0 and ordered[-1].position_mm > 100


def test_slices_of_two_patients_are_refused(ctmd_dir: Path, ctmd_slices: dict) -> None:
    slices = [decode_image((ctmd_dir / r["path"]).read_bytes())
              for r in (ctmd_slices["P001"][30], ctmd_slices["normal001"][30])]
    with pytest.raises(StudyError, match="different patients|different series"):
        order_series([s.dicom for s in slices])


@pytest.mark.parametrize("name", ["../evil.dcm", "/etc/passwd", "a/../../b.dcm", "C:/windows/x.dcm"])
def test_entries_that_leave_the_archive_are_refused(name: str) -> None:
    with pytest.raises(ArchiveError, match="leaves the archive"):
        unpack_zip(_zip({name: b"x"}), StudyLimits())


def test_nested_archives_and_bombs_are_refused() -> None:
    with pytest.raises(ArchiveError, match="archive inside"):
        unpack_zip(_zip({"inner.zip": _zip({"a.dcm": b"x"})}), StudyLimits())
    bomb = _zip({"slice.dcm": b"\0" * (20 << 20)})
    assert len(bomb) < 100_000
    with pytest.raises(ImageTooLargeError, match="ZIP bomb"):
        unpack_zip(bomb, StudyLimits())
    with pytest.raises(ImageTooLargeError, match="expands to more than"):
        unpack_zip(_zip({f"{i}.dcm": bytes(1000) for i in range(5)}, compression=zipfile.ZIP_STORED),
                   StudyLimits(max_total_bytes=3000))
    with pytest.raises(ImageTooLargeError, match="entries"):
        unpack_zip(_zip({f"{i}.dcm": b"x" for i in range(40)}), StudyLimits(max_slices=10))


def test_broken_and_empty_zips_get_clear_errors() -> None:
    with pytest.raises(ArchiveError, match="cannot read the ZIP"):
        unpack_zip(b"PK\x03\x04" + bytes(50), StudyLimits())
    with pytest.raises(StudyError, match="no files"):
        unpack_zip(_zip({"folder/": b""}), StudyLimits())


def test_the_study_probability_is_the_mean_of_its_most_suspicious_slices() -> None:
    assert top_k(5) == 3 and top_k(100) == 10 and top_k(2) == 2
    probability, k = aggregate([0.1] * 90 + [0.9] * 10)
    assert k == 10 and probability == pytest.approx(0.9)
    probability, k = aggregate([0.95] + [0.05] * 99)  # one noisy slice does not decide a study
    assert probability < 0.2
    with pytest.raises(StudyError, match="no slice"):
        aggregate([])


def test_a_zip_over_its_budget_is_refused_before_any_entry_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.hostile import zip_of_zeros

    archive = zip_of_zeros(600)  # 600 MiB of zeros in about 0.6 MB; the default budget is 512 MiB
    assert len(archive) < 1_000_000

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("an entry was read")

    monkeypatch.setattr(zipfile.ZipFile, "open", no_reading)
    with pytest.raises(ImageTooLargeError, match="expands to more than"):
        unpack_zip(archive, StudyLimits(max_total_bytes=512 << 20))


def test_a_study_over_its_pixel_budget_is_refused_from_the_headers(ctmd_dir: Path, ctmd_slices: dict) -> None:
    from bench.hostile import deflated_dicom
    from ctscan.study import check_pixel_budget

    with pytest.raises(ImageTooLargeError, match="slice 1 of the upload"):
        check_pixel_budget([deflated_dicom(7000)] * 6, max_total_pixels=10**9, max_pixels=2048**2, max_side=2048)
    slices = [(ctmd_dir / r["path"]).read_bytes() for r in ctmd_slices["P001"][:6]]
    assert check_pixel_budget(slices, max_total_pixels=6 * 512 * 512, max_pixels=2048**2,
                              max_side=2048) == [512 * 512] * 6
    with pytest.raises(ImageTooLargeError, match="pixels in all"):
        check_pixel_budget(slices, max_total_pixels=5 * 512 * 512, max_pixels=2048**2, max_side=2048)
