"""Published dataset versions: `<datasets url>/<name>/<version>/...`.

A version holds the images listed in `split.csv`, `split.csv`, `SHA256SUMS` and, written
last, `MANIFEST.json` (fingerprint, counts, every file with its size): a version without a
manifest is an unfinished upload and is never used. The datasets URL is
`s3://bucket/prefix/datasets` or a local folder with the same layout (runs without S3).
Once written, a version is never overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ctscan.data import CHECKSUM_FILE, SPLIT_FILE, CTDataset
from ctscan.errors import ChecksumError, DataError, StoreError, VersionExistsError

MANIFEST_FILE = "MANIFEST.json"


def _check_name(kind: str, value: str) -> str:
    if not value or "/" in value or value.startswith(".") or not value.isprintable():
        raise DataError(f"{kind} {value!r} is not a valid name (no '/', no leading '.')")
    return value


def _default_version(dataset: CTDataset) -> str:
    # Date plus the content fingerprint: uploading the same data twice names the same version.
    return datetime.now(UTC).strftime("%Y%m%d") + "-" + dataset.fingerprint()[:12]


def upload_dataset(directory: Path, url: str, *, version: str | None = None) -> dict[str, Any]:
    """Verify a dataset folder and publish it as `<url>/<version>`; url names the dataset
    (`s3://bucket/prefix/datasets/<name>` or a local folder). Returns the manifest."""
    dataset = CTDataset(directory)
    if not (dataset.root / CHECKSUM_FILE).is_file():
        raise DataError(f"{dataset.root} has no {CHECKSUM_FILE}; uploads are verified against it "
                        "(create it with: sha256sum <images> > SHA256SUMS)")
    checked = dataset.verify_checksums()
    version = _check_name("dataset version", version or _default_version(dataset))
    relative_paths = [SPLIT_FILE, CHECKSUM_FILE, *sorted({s.relative_path for s in dataset.samples})]
    files = {rel: (dataset.root / rel).stat().st_size for rel in relative_paths}
    manifest = {
        "url": f"{url.rstrip('/')}/{version}",
        "version": version,
        "fingerprint": dataset.fingerprint(),
        "counts": dataset.counts(),
        "images_verified": checked,
        "files": files,
        "created_at": datetime.now(UTC).isoformat(),
    }
    manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode()
    if url.startswith("s3://"):
        _upload_s3(dataset.root, url, version, files, manifest_bytes)
    else:
        _upload_local(dataset.root, Path(url), version, files, manifest_bytes)
    return manifest


def _upload_s3(root: Path, url: str, version: str, files: dict[str, int], manifest: bytes) -> None:
    from ctscan.s3store import S3Objects

    target = S3Objects.from_url(url).child(version)
    if target.walk():
        raise VersionExistsError(f"dataset version {target.url} already exists (complete or "
                                 "unfinished); versions are never overwritten - choose another --version")
    for relative in files:  # manifest last, so readers only ever see complete versions
        target.put_new(relative, (root / relative).read_bytes())
    stored = target.walk()
    wrong = [rel for rel, size in files.items() if stored.get(rel) != size]
    if wrong:
        raise StoreError(f"upload to {target.url} is incomplete: {len(wrong)} file(s) missing or "
                         f"truncated, e.g. {wrong[0]}")
    target.put_new(MANIFEST_FILE, manifest)


def _upload_local(root: Path, base: Path, version: str, files: dict[str, int], manifest: bytes) -> None:
    target = base / version
    if target.exists():
        raise VersionExistsError(f"dataset version {target} already exists; versions are never overwritten")
    base.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=base))
    try:
        for relative in files:
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / relative, staging / relative)
        (staging / MANIFEST_FILE).write_bytes(manifest)
        os.rename(staging, target)  # atomic; fails if the version appeared meanwhile
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise StoreError(f"cannot publish dataset version {target}: {exc}") from None


def list_dataset_versions(datasets_url: str, name: str) -> list[str]:
    """Complete (manifest present) versions of a dataset."""
    _check_name("dataset", name)
    if datasets_url.startswith("s3://"):
        from ctscan.s3store import S3Objects

        objects = S3Objects.from_url(datasets_url).child(name)
        return [v for v in objects.names() if objects.exists(f"{v}/{MANIFEST_FILE}")]
    base = Path(datasets_url) / name
    return sorted(p.name for p in base.iterdir() if (p / MANIFEST_FILE).is_file()) if base.is_dir() else []


def fetch_dataset(datasets_url: str, name: str, version: str, *, cache_dir: Path) -> Path:
    """A local, verified folder holding dataset `name` at `version`.

    S3 versions are downloaded once into `cache_dir/<name>/<version>` (checked against
    SHA256SUMS before the folder is published); local versions are used in place.
    """
    _check_name("dataset", name)
    _check_name("dataset version", version)
    if not datasets_url.startswith("s3://"):
        folder = Path(datasets_url) / name / version
        if not (folder / MANIFEST_FILE).is_file():
            raise DataError(f"dataset {name} has no published version {version} in {datasets_url}")
        CTDataset(folder).verify_checksums()
        return folder

    from ctscan.s3store import S3Objects

    target = Path(cache_dir) / name / version
    if (target / MANIFEST_FILE).is_file():
        return target  # verified when it was cached; the version never changes
    source = S3Objects.from_url(datasets_url).child(f"{name}/{version}")
    manifest_bytes = source.get(MANIFEST_FILE)
    if manifest_bytes is None:
        raise DataError(f"dataset {name} has no published version {version} in {datasets_url}")
    manifest = json.loads(manifest_bytes)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=target.parent))
    try:
        for relative in manifest["files"]:
            source.download_file(relative, staging / relative)
        dataset = CTDataset(staging)
        dataset.verify_checksums()
        if dataset.fingerprint() != manifest["fingerprint"]:
            raise ChecksumError(f"dataset {name}/{version}: split.csv or SHA256SUMS differ from its manifest")
        (staging / MANIFEST_FILE).write_bytes(manifest_bytes)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / MANIFEST_FILE).is_file():  # not a concurrent fetch of the same version
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def publish_once(directory: Path, datasets_url: str, name: str) -> tuple[str, bool]:
    """Publish a dataset folder as `<datasets_url>/<name>/<version>` unless the same data is
    already there; returns (version, published now). Versions keep the default naming (date,
    then the first 12 hex digits of the fingerprint), so the fingerprint in a name tells that
    the data is already published, whatever the day. For `make up` and the compose seed job."""
    fingerprint = CTDataset(directory).fingerprint()[:12]
    for version in sorted(list_dataset_versions(datasets_url, name), reverse=True):
        if version.endswith("-" + fingerprint):
            return version, False
    manifest = upload_dataset(directory, f"{datasets_url.rstrip('/')}/{name}")
    return str(manifest["version"]), True
