"""Where the trainer keeps job records and checkpoints: beside the models, in the store.

`<model store>/.jobs/<job id>/...` and `<model store>/.runs/<job id>/...` (dot-names are
hidden from model listings). An S3 store gives `ctscan.s3store.S3Objects`; a local store
gives `LocalObjects`, the same small interface over a folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

from ctscan.errors import StoreError, VersionExistsError

JOBS_FOLDER = ".jobs"
RUNS_FOLDER = ".runs"


class Objects(Protocol):
    url: str

    def child(self, key_prefix: str) -> Objects: ...
    def get(self, key: str) -> bytes | None: ...
    def exists(self, key: str) -> bool: ...
    def names(self, key_prefix: str = "") -> list[str]: ...
    def walk(self, key_prefix: str = "") -> dict[str, int]: ...
    def put(self, key: str, data: bytes) -> None: ...
    def put_new(self, key: str, data: bytes) -> None: ...
    def download_file(self, key: str, path: Path) -> None: ...
    def delete(self, keys: list[str]) -> None: ...


class LocalObjects:
    """A folder seen as objects (runs without S3)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / key.strip("/")).resolve()
        if path != self.root and self.root not in path.parents:
            raise StoreError(f"key {key!r} leaves {self.url}")
        return path

    def child(self, key_prefix: str) -> LocalObjects:
        return LocalObjects(self._path(key_prefix))

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        return path.read_bytes() if path.is_file() else None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def names(self, key_prefix: str = "") -> list[str]:
        path = self._path(key_prefix)
        return sorted(p.name for p in path.iterdir() if not p.name.startswith(".tmp-")) if path.is_dir() else []

    def walk(self, key_prefix: str = "") -> dict[str, int]:
        base = self._path(key_prefix)
        if not base.is_dir():
            return {}
        return {p.relative_to(base).as_posix(): p.stat().st_size for p in base.rglob("*")
                if p.is_file() and not p.name.startswith(".tmp-")}

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)  # readers see the old or the new bytes, never half

    def put_new(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with path.open("xb") as stream:
                stream.write(data)
        except FileExistsError:
            raise VersionExistsError(f"{path} already exists; it is never overwritten") from None

    def download_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise StoreError(f"{source} does not exist")
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)


def open_objects(store_url: str) -> Objects:
    """The object folder at the root of a model store URL."""
    if store_url.startswith("s3://"):
        from ctscan.s3store import S3Objects

        return S3Objects.from_url(store_url)
    return LocalObjects(store_url)
