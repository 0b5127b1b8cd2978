"""Published dataset versions: `<datasets url>/<name>/<version>/...` on any object store.

A version holds the images listed in `split.csv`, `split.csv`, `SHA256SUMS` and, written
last, `MANIFEST.json` (`ctscan.storage.records.DatasetManifest`: fingerprint, counts, every file
with its size): a version without a manifest is an unfinished upload and is never used.
Once written, a version is never overwritten.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from ctscan.data.dataset import CHECKSUM_FILE, SPLIT_FILE, CTDataset
from ctscan.errors import ChecksumError, DataError, VersionExistsError
from ctscan.storage.objects import ObjectStore, open_objects
from ctscan.storage.records import DatasetManifest
from ctscan.storage.store import parse_record

MANIFEST_FILE = "MANIFEST.json"


def _check_name(kind: str, value: str) -> str:
    if not value or "/" in value or value.startswith(".") or not value.isprintable():
        raise DataError(f"{kind} {value!r} is not a valid name (no '/', no leading '.')")
    return value


def _default_version(dataset: CTDataset) -> str:
    # Date plus the content fingerprint: uploading the same data twice names the same version.
    return datetime.now(UTC).strftime("%Y%m%d") + "-" + dataset.fingerprint()[:12]


def _check_images_decode(dataset: CTDataset) -> None:
    """Decode every image with the decoder training uses: a file that matches its checksum
    but is not an image (truncated before the sums were made, wrong format) is refused here,
    not an epoch into a training job."""
    from ctscan.imaging.decoding import decode_image

    broken: list[str] = []
    for sample in dataset.samples:
        try:
            decode_image(sample.path.read_bytes())
        except Exception as exc:  # PIL and pydicom raise many kinds
            broken.append(f"{sample.relative_path} ({type(exc).__name__}: {exc})")
    if broken:
        shown = "; ".join(broken[:5]) + (f"; and {len(broken) - 5} more" if len(broken) > 5 else "")
        raise DataError(f"{len(broken)} image(s) in {dataset.root} do not decode, nothing was published: {shown}")


class DatasetVersions:
    """The versions of one dataset, below its own folder of an object store."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects
        self.url = objects.url

    def publish(self, directory: Path, *, version: str | None = None) -> DatasetManifest:
        """Verify a dataset folder against its SHA256SUMS and publish it as a new version."""
        dataset = CTDataset(directory)
        if not (dataset.root / CHECKSUM_FILE).is_file():
            raise DataError(f"{dataset.root} has no {CHECKSUM_FILE}; uploads are verified against it "
                            "(create it with: sha256sum <images> > SHA256SUMS)")
        checked = dataset.verify_checksums()
        _check_images_decode(dataset)
        version = _check_name("dataset version", version or _default_version(dataset))
        relative_paths = [SPLIT_FILE, CHECKSUM_FILE, *sorted({s.relative_path for s in dataset.samples})]
        sources: dict[str, bytes | Path] = {rel: dataset.root / rel for rel in relative_paths}
        manifest = DatasetManifest(
            url=self.objects.child(version).url, version=version, fingerprint=dataset.fingerprint(),
            counts=dataset.counts(), images_verified=checked,
            files={rel: (dataset.root / rel).stat().st_size for rel in relative_paths},
            created_at=datetime.now(UTC).isoformat())
        sources[MANIFEST_FILE] = manifest.to_json()
        try:
            self.objects.put_folder_new(version, sources, marker=MANIFEST_FILE)
        except VersionExistsError:
            raise VersionExistsError(f"dataset version {manifest.url} already exists (complete or unfinished); "
                                     "versions are never overwritten - choose another --version") from None
        return manifest

    def versions(self) -> list[str]:
        """Complete (manifest present) versions."""
        return [v for v in self.objects.names() if self.objects.exists(f"{v}/{MANIFEST_FILE}")]

    def manifest(self, version: str) -> DatasetManifest | None:
        data = self.objects.get(f"{_check_name('dataset version', version)}/{MANIFEST_FILE}")
        return parse_record(DatasetManifest, data, f"{self.url}/{version}/{MANIFEST_FILE}") if data else None

    def fetch(self, version: str, *, cache_dir: Path) -> Path:
        """A local, verified folder holding `version`.

        A version on a local folder is used in place (after checking its checksums); others
        are downloaded once into `cache_dir/<version>` and checked before the folder is
        published there."""
        _check_name("dataset version", version)
        manifest = self.manifest(version)
        if manifest is None:
            raise DataError(f"dataset {self.url} has no published version {version}")
        in_place = self.objects.local_path(version)
        if in_place is not None:
            CTDataset(in_place).verify_checksums()
            return in_place
        target = Path(cache_dir) / version
        if (target / MANIFEST_FILE).is_file():
            return target  # verified when it was cached; the version never changes
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=target.parent))
        staging.chmod(0o755)  # readable by the trainer's own user in a container
        try:
            for relative in manifest.files:
                self.objects.download_file(f"{version}/{relative}", staging / relative)
            dataset = CTDataset(staging)
            dataset.verify_checksums()
            if dataset.fingerprint() != manifest.fingerprint:
                raise ChecksumError(f"dataset {self.url}/{version}: split.csv or SHA256SUMS differ from its manifest")
            (staging / MANIFEST_FILE).write_bytes(manifest.to_json())
            try:
                os.rename(staging, target)
            except OSError:
                if not (target / MANIFEST_FILE).is_file():  # not a concurrent fetch of the same version
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target


def open_dataset(datasets_url: str, name: str) -> DatasetVersions:
    """The versions of dataset `name` under a datasets URL (folder or s3://.../datasets)."""
    return DatasetVersions(open_objects(datasets_url).child(_check_name("dataset", name)))


def upload_dataset(directory: Path, url: str, *, version: str | None = None) -> DatasetManifest:
    """Publish a dataset folder as `<url>/<version>`; `url` names the dataset
    (`s3://bucket/prefix/datasets/<name>` or a local folder). Returns the manifest."""
    return DatasetVersions(open_objects(url)).publish(Path(directory), version=version)


def list_dataset_versions(datasets_url: str, name: str) -> list[str]:
    return open_dataset(datasets_url, name).versions()


def fetch_dataset(datasets_url: str, name: str, version: str, *, cache_dir: Path) -> Path:
    return open_dataset(datasets_url, name).fetch(version, cache_dir=Path(cache_dir) / name)


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
    return str(manifest.version), True
