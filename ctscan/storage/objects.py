"""Object stores: one folder-like interface over a local folder, S3 or any registered backend.

Everything the project keeps (model versions, ONNX copies, datasets, job records,
checkpoints) goes through `ObjectStore`; the typed repositories (`ctscan.storage.store`,
`ctscan.data.versions`, `ctscan.storage.job_records`) sit on top and never look at a URL themselves.
`open_objects(url)` is the one place that turns a URL into a backend, by its scheme:

    s3://bucket/prefix        ctscan.storage.s3store.S3ObjectStore (registered below, imported lazily)
    /some/folder, file://...  LocalObjectStore
    <scheme>://...            whatever `register_backend(scheme, factory)` installed

Keys are '/'-separated paths relative to the store's root; `..` and `.` never leave it.
Names starting with `.tmp-` are a backend's work in progress and are never listed.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path

from ctscan.errors import StoreError, VersionExistsError

TEMP_PREFIX = ".tmp-"
# Stored objects are readable by everyone who can reach the folder (a container's service
# user, a backup job); who may write is the folder's business.
FILE_MODE = 0o644
FOLDER_MODE = 0o755

# A folder's files: their bytes, or a local file to copy (large datasets are not read into memory).
FileSource = bytes | Path


def read_source(source: FileSource) -> bytes:
    return source if isinstance(source, bytes) else source.read_bytes()


def source_size(source: FileSource) -> int:
    return len(source) if isinstance(source, bytes) else source.stat().st_size


def check_key(key: str, where: str) -> str:
    """The key without surrounding slashes; refuses keys that would leave the store."""
    key = key.strip("/")
    if any(part in ("..", ".") for part in key.split("/")) or "\\" in key or "\0" in key:
        raise StoreError(f"key {key!r} leaves {where}")
    return key


class ObjectStore(ABC):
    """A tree of immutable-or-atomically-replaced objects under one root URL."""

    url: str

    @abstractmethod
    def child(self, key_prefix: str) -> ObjectStore:
        """The same backend rooted at `key_prefix` below this root."""

    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """The object's bytes, None when it does not exist."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def names(self, key_prefix: str = "") -> list[str]:
        """Sorted names directly below `key_prefix` (sub-folders and objects)."""

    @abstractmethod
    def walk(self, key_prefix: str = "") -> dict[str, int]:
        """Every object below `key_prefix` -> its size, keys relative to `key_prefix`."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Create or replace one object; readers see the old or the new bytes, never half."""

    @abstractmethod
    def put_new(self, key: str, data: bytes) -> None:
        """Create an object that must not exist yet; VersionExistsError if it does."""

    @abstractmethod
    def put_folder_new(self, key_prefix: str, files: Mapping[str, FileSource], *, marker: str) -> None:
        """Create a folder of new objects, all or nothing; VersionExistsError if anything is
        there already. `marker` (one of `files`) is written last: a reader that finds it finds
        the whole folder, on backends where the folder cannot appear in one step."""

    @abstractmethod
    def download_file(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def delete(self, keys: list[str]) -> None:
        """Remove objects (missing ones are ignored)."""

    def local_path(self, key: str = "") -> Path | None:
        """The local file or folder behind `key` when the backend is a local folder, else None
        (callers may then use data in place instead of downloading it)."""
        return None


class LocalObjectStore(ObjectStore):
    """A folder seen as objects. New folders appear by one atomic rename."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        key = check_key(key, self.url)
        path = (self.root / key).resolve() if key else self.root
        if path != self.root and self.root not in path.parents:
            raise StoreError(f"key {key!r} leaves {self.url}")
        return path

    def child(self, key_prefix: str) -> LocalObjectStore:
        return LocalObjectStore(self._path(key_prefix))

    def local_path(self, key: str = "") -> Path:
        return self._path(key)

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            return path.read_bytes() if path.is_file() else None
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def names(self, key_prefix: str = "") -> list[str]:
        path = self._path(key_prefix)
        if not path.is_dir():
            return []
        return sorted(p.name for p in path.iterdir() if not p.name.startswith(TEMP_PREFIX))

    def walk(self, key_prefix: str = "") -> dict[str, int]:
        base = self._path(key_prefix)
        if not base.is_dir():
            return {}
        found = {}
        for path in base.rglob("*"):
            relative = path.relative_to(base)
            if path.is_file() and not any(part.startswith(TEMP_PREFIX) for part in relative.parts):
                found[relative.as_posix()] = path.stat().st_size
        return found

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
            os.fchmod(handle, FILE_MODE)  # not mkstemp's 0600: containers read the store as another user
            with os.fdopen(handle, "wb") as stream:
                stream.write(data)
            os.replace(temporary, path)
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc}") from None

    def put_new(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Written aside and linked into place: link() fails if the name exists, and
            # readers never see a half-written object.
            handle, temporary = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
            os.fchmod(handle, FILE_MODE)  # not mkstemp's 0600: containers read the store as another user
            with os.fdopen(handle, "wb") as stream:
                stream.write(data)
            try:
                os.link(temporary, path)
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: exclusive create instead
                with path.open("xb") as stream:
                    stream.write(data)
            finally:
                os.unlink(temporary)
        except FileExistsError:
            raise VersionExistsError(f"{path} already exists; it is never overwritten") from None
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc}") from None

    def put_folder_new(self, key_prefix: str, files: Mapping[str, FileSource], *, marker: str) -> None:
        if marker not in files:
            raise ValueError(f"marker {marker!r} is not one of the files")
        target = self._path(key_prefix)
        if target.exists():
            raise VersionExistsError(f"{target} already exists; it is never overwritten")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{target.name}.", dir=target.parent))
            staging.chmod(FOLDER_MODE)  # mkdtemp's 0700 would hide the version from a service's own user
        except OSError as exc:
            raise StoreError(f"cannot write {target}: {exc}") from None
        try:
            for relative, source in files.items():
                destination = staging / check_key(relative, self.url)
                destination.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(source, bytes):
                    destination.write_bytes(source)
                else:
                    shutil.copyfile(source, destination)
            os.rename(staging, target)  # atomic; fails if the target appeared meanwhile
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if target.exists():
                raise VersionExistsError(f"{target} was written meanwhile; it is never overwritten") from None
            raise StoreError(f"cannot write {target}: {exc}") from None

    def download_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise StoreError(f"{source} does not exist")
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)


# --- backends by URL scheme -----------------------------------------------------------------
BackendFactory = Callable[[str], ObjectStore]
# Built-in backends as "module:attribute" so their dependencies (boto3) load only when used.
_BACKENDS: dict[str, BackendFactory | str] = {"s3": "ctscan.storage.s3store:S3ObjectStore.from_url"}


def register_backend(scheme: str, factory: BackendFactory) -> None:
    """Make `open_objects` send `<scheme>://...` URLs to `factory(url)`."""
    if not scheme.isidentifier() or scheme == "file":
        raise ValueError(f"{scheme!r} cannot be a store scheme")
    _BACKENDS[scheme] = factory


def unregister_backend(scheme: str) -> None:
    _BACKENDS.pop(scheme, None)


def backend_schemes() -> list[str]:
    return sorted({"file", *_BACKENDS})


def _resolve(factory: BackendFactory | str) -> BackendFactory:
    if not isinstance(factory, str):
        return factory
    module_name, _, attribute = factory.partition(":")
    target: object = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target  # type: ignore[return-value]


def open_objects(url: str | Path) -> ObjectStore:
    """The object store at `url`: a registered `scheme://` backend, else a local folder."""
    text = str(url)
    scheme, separator, rest = text.partition("://")
    if not separator:
        return LocalObjectStore(text)
    if scheme == "file":
        return LocalObjectStore(rest)
    factory = _BACKENDS.get(scheme)
    if factory is None:
        raise StoreError(f"no store backend for {scheme}:// URLs ({text}); "
                         f"known: {', '.join(s + '://' for s in backend_schemes())} or a folder")
    return _resolve(factory)(text)
