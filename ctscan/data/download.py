"""`ctscan data download DEST`: fetch UCSD COVID-CT from its public source and write the
project's dataset layout (class folders, `split.csv`, `SHA256SUMS`).

Source: the UCSD-AI4H/COVID-CT repository (Yang et al. 2020): the processed image archives
`Images-processed/CT_COVID.zip` and `CT_NonCOVID.zip`, and the authors' patient-level split
lists under `Data-split/`. `base_url` may also be a local folder mirroring that layout.
"""

from __future__ import annotations

import csv
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from ctscan.data.dataset import CHECKSUM_FILE, SPLIT_FILE, CTDataset, sha256_file
from ctscan.errors import DataError

DEFAULT_BASE_URL = "https://github.com/UCSD-AI4H/COVID-CT/raw/master"
CLASSES = {"covid": ("CT_COVID", "COVID"), "non_covid": ("CT_NonCOVID", "NonCOVID")}
SPLITS = ("train", "val", "test")
TIMEOUT_SECONDS = 60


def _fetch(base: str, relative: str, target: Path) -> None:
    """Copy `base/relative` (URL or local folder) to `target`, with a clear error."""
    if "://" not in base:
        source = Path(base) / relative
        if not source.is_file():
            raise DataError(f"{source} not found in the local mirror")
        shutil.copyfile(source, target)
        return
    url = f"{base.rstrip('/')}/{relative}"
    if not url.startswith(("https://", "http://")):
        raise DataError(f"unsupported download URL {url!r}; use http(s) or a local folder")
    try:
        # the scheme is checked above
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response, target.open("wb") as out:  # noqa: S310
            shutil.copyfileobj(response, out)
    except urllib.error.HTTPError as exc:
        raise DataError(f"download of {url} failed: HTTP {exc.code}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(
            f"cannot download {url}: {reason}. Check the network, or pass --base-url with a "
            "mirror (URL or local folder) of the UCSD-AI4H/COVID-CT repository"
        ) from None


def _unpack(archive: Path, class_folder: str, dest: Path) -> int:
    """Extract image files of one class archive into dest/class_folder (flat), refusing
    paths that leave the folder."""
    target = dest / class_folder
    target.mkdir(parents=True, exist_ok=True)
    count = 0
    try:
        with zipfile.ZipFile(archive) as bundle:
            for member in bundle.infolist():
                if member.is_dir():
                    continue
                name = PurePosixPath(member.filename).name
                if name.startswith(".") or "__MACOSX" in member.filename:
                    continue
                if not name.lower().endswith((".png", ".jpg", ".jpeg")):
                    continue
                with bundle.open(member) as source, (target / name).open("wb") as out:
                    shutil.copyfileobj(source, out)
                count += 1
    except zipfile.BadZipFile:
        raise DataError(f"{archive.name} is not a valid zip archive") from None
    return count


def _read_list(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]


def download_dataset(dest: Path, *, base_url: str | None = None) -> dict[str, Any]:
    base = base_url or DEFAULT_BASE_URL
    dest = dest.expanduser()
    if (dest / SPLIT_FILE).exists():
        raise DataError(f"{dest} already holds a dataset ({SPLIT_FILE}); choose an empty folder")
    dest.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="ctscan-download-") as work:
        work_dir = Path(work)
        for label, (folder, split_folder) in CLASSES.items():
            archive = work_dir / f"{folder}.zip"
            _fetch(base, f"Images-processed/{folder}.zip", archive)
            if _unpack(archive, folder, dest) == 0:
                raise DataError(f"{folder}.zip holds no PNG or JPEG images")
            for split in SPLITS:
                listing = work_dir / f"{split}{folder}.txt"
                _fetch(base, f"Data-split/{split_folder}/{split}{folder}.txt", listing)
                for name in _read_list(listing):
                    if not (dest / folder / name).is_file():
                        raise DataError(f"split list {split}{folder}.txt names {name}, "
                                        f"which is not in {folder}.zip")
                    rows.append((f"{folder}/{name}", label, split))
    with (dest / SPLIT_FILE).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    with (dest / CHECKSUM_FILE).open("w", encoding="utf-8") as handle:
        for relative, _, _ in rows:
            handle.write(f"{sha256_file(dest / relative)}  {relative}\n")
    dataset = CTDataset(dest)  # validates what was written
    return {"path": str(dataset.root), "images": len(dataset.samples), "counts": dataset.counts(),
            "fingerprint": dataset.fingerprint(), "source": base}
