"""Object stores: the local folder's guarantees, and a new backend as a one-file change.

`MemoryObjectStore` below is a throwaway backend written for this test and registered for
`memory://` URLs: the model store, dataset versions and job records then work on it with no
other change, because nothing above `ctscan.storage.objects` looks at a URL.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import ClassVar

import pytest

from ctscan.errors import ChecksumError, StoreError, VersionExistsError
from ctscan.storage.objects import (
    FileSource,
    LocalObjectStore,
    ObjectStore,
    check_key,
    open_objects,
    read_source,
    register_backend,
    unregister_backend,
)


class MemoryObjectStore(ObjectStore):
    """Objects in a dict shared by every store opened on the same URL root."""

    spaces: ClassVar[dict[str, dict[str, bytes]]] = {}
    lock = threading.Lock()

    def __init__(self, space: str, prefix: str = "") -> None:
        self.space, self.prefix = space, prefix.strip("/")
        self.objects = self.spaces.setdefault(space, {})
        self.url = f"memory://{space}" + (f"/{self.prefix}" if self.prefix else "")

    @classmethod
    def from_url(cls, url: str) -> MemoryObjectStore:
        space, _, prefix = url.removeprefix("memory://").partition("/")
        return cls(space, prefix)

    def _key(self, key: str) -> str:
        key = check_key(key, self.url)
        return f"{self.prefix}/{key}".strip("/") if self.prefix else key

    def child(self, key_prefix: str) -> MemoryObjectStore:
        return MemoryObjectStore(self.space, self._key(key_prefix))

    def get(self, key: str) -> bytes | None:
        return self.objects.get(self._key(key))

    def exists(self, key: str) -> bool:
        return self._key(key) in self.objects

    def names(self, key_prefix: str = "") -> list[str]:
        base = self._key(key_prefix)
        start = f"{base}/" if base else ""
        return sorted({key[len(start):].split("/")[0] for key in self.objects if key.startswith(start)})

    def walk(self, key_prefix: str = "") -> dict[str, int]:
        base = self._key(key_prefix)
        start = f"{base}/" if base else ""
        return {key[len(start):]: len(data) for key, data in self.objects.items() if key.startswith(start)}

    def put(self, key: str, data: bytes) -> None:
        self.objects[self._key(key)] = bytes(data)

    def put_new(self, key: str, data: bytes) -> None:
        with self.lock:
            if self.exists(key):
                raise VersionExistsError(f"{self.url}/{key} already exists")
            self.put(key, data)

    def put_folder_new(self, key_prefix: str, files: Mapping[str, FileSource], *, marker: str) -> None:
        with self.lock:
            if self.walk(key_prefix):
                raise VersionExistsError(f"{self.url}/{key_prefix} already exists")
            for relative, source in files.items():  # one step under the lock: all or nothing
                self.put(f"{key_prefix}/{relative}", read_source(source))

    def download_file(self, key: str, path: Path) -> None:
        data = self.get(key)
        if data is None:
            raise StoreError(f"{self.url}/{key} does not exist")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self.objects.pop(self._key(key), None)


@pytest.fixture()
def memory_backend() -> Iterator[None]:
    register_backend("memory", MemoryObjectStore.from_url)
    yield
    unregister_backend("memory")
    MemoryObjectStore.spaces.clear()


CARD = {"architecture": "mobilenetv2", "input_size": 32, "threshold": 0.5, "metrics": {"val": {"auc": 0.7}}}


def test_a_registered_backend_serves_every_repository(memory_backend: None, tmp_path: Path,
                                                      data_dir: Path) -> None:
    from ctscan.data.versions import list_dataset_versions, upload_dataset
    from ctscan.storage.job_records import JobRecords, new_job_id, now
    from ctscan.storage.records import JobRecord
    from ctscan.storage.store import open_store

    store = open_store("memory://team/models")
    version = store.save("mobilenetv2", weights=b"weights", card=CARD)
    store.promote("mobilenetv2", version, reason="test")
    assert store.list_models() == ["mobilenetv2"] and store.production("mobilenetv2") == version
    card, weights = store.verified_card("mobilenetv2", version)
    assert weights == b"weights" and store.card("mobilenetv2", version) == card
    with pytest.raises(VersionExistsError):
        store.save("mobilenetv2", weights=b"other", card=CARD, version=version)
    # Bytes changed behind the store's back are refused on the next read.
    MemoryObjectStore.spaces["team"][f"models/mobilenetv2/{version}/weights.npz"] = b"tampered"
    with pytest.raises(ChecksumError):
        store.load_files("mobilenetv2", version)

    records = JobRecords.for_store("memory://team/models")
    record = JobRecord(id=new_job_id(), state="queued", model="mobilenetv2", dataset="d", dataset_version="v",
                       init="none", epochs=1, created_at=now())
    records.create(record)
    assert [r.id for r in records.recent()] == [record.id] and store.list_models() == ["mobilenetv2"]

    # A dataset version, verified against its checksums on the way in (a few real images).
    import csv
    import hashlib
    import shutil

    from ctscan.data.dataset import CTDataset

    small = tmp_path / "small"
    rows = []
    for sample in CTDataset(data_dir).split("val")[:2] + CTDataset(data_dir).split("train")[:2]:
        (small / sample.relative_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample.path, small / sample.relative_path)
        rows.append((sample.relative_path, sample.label, sample.split))
    with (small / "split.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label", "split"), *rows])
    (small / "SHA256SUMS").write_text("".join(
        f"{hashlib.sha256((small / rel).read_bytes()).hexdigest()}  {rel}\n" for rel, _, _ in rows))
    manifest = upload_dataset(small, "memory://team/datasets/small", version="v1")
    assert manifest.url == "memory://team/datasets/small/v1" and manifest.images_verified == 4
    assert list_dataset_versions("memory://team/datasets", "small") == ["v1"]


def test_unknown_schemes_are_refused_with_the_known_ones(memory_backend: None) -> None:
    with pytest.raises(StoreError, match=r"no store backend for gs:// URLs .*memory://.*s3://"):
        open_objects("gs://bucket/models")
    assert isinstance(open_objects("file:///tmp/x"), LocalObjectStore)


def test_local_folders_never_overwrite_and_write_folders_whole(tmp_path: Path) -> None:
    objects = open_objects(tmp_path / "root")
    objects.put_new("a/b.txt", b"first")
    with pytest.raises(VersionExistsError):
        objects.put_new("a/b.txt", b"second")
    assert objects.get("a/b.txt") == b"first"
    objects.put("a/b.txt", b"replaced")  # pointers are replaced atomically
    assert objects.get("a/b.txt") == b"replaced"

    objects.put_folder_new("v1", {"data.bin": b"x" * 10, "SUMS": b"sums"}, marker="SUMS")
    with pytest.raises(VersionExistsError):
        objects.put_folder_new("v1", {"SUMS": b"other"}, marker="SUMS")
    assert objects.walk("v1") == {"SUMS": 4, "data.bin": 10}
    # A folder that cannot be written completely leaves nothing behind, not even its staging.
    missing = tmp_path / "no-such-file"
    with pytest.raises(StoreError):
        objects.put_folder_new("v2", {"data.bin": missing, "SUMS": b"sums"}, marker="SUMS")
    assert objects.names() == ["a", "v1"] and not objects.exists("v2/SUMS")

    for bad in ("../outside", "a/../../outside", "./a"):
        with pytest.raises(StoreError, match="leaves"):
            objects.get(bad)


def test_local_objects_are_readable_by_other_users(tmp_path: Path) -> None:
    """A container's service user reads a store folder written by root (the release's ONNX
    copies are made on the host): no 0600 files or 0700 folders."""
    import os
    import stat

    previous = os.umask(0o022)
    try:
        objects = open_objects(tmp_path / "root")
        objects.put("pointer.json", b"{}")
        objects.put_new("new.txt", b"x")
        objects.put_folder_new("v1", {"onnx/model.onnx": b"m", "SUMS": b"s"}, marker="SUMS")
    finally:
        os.umask(previous)
    root = tmp_path / "root"
    for path in (root / "pointer.json", root / "new.txt", root / "v1", root / "v1" / "onnx", root / "v1" / "SUMS",
                 root / "v1" / "onnx" / "model.onnx"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o004, f"{path.name}: {oct(mode)}"
        if path.is_dir():
            assert mode & 0o001, f"{path.name}: {oct(mode)}"
