"""Model store: versions of each trained model with its card, checksums and a production pointer.

`ModelStore` is the interface; `LocalModelStore` keeps a folder, and the S3 store
(`ctscan.s3store`) keeps the same layout under a bucket prefix:

    <root>/<model>/<version>/weights.npz      float16 where lossless enough, float32 otherwise
    <root>/<model>/<version>/card.json        model card (metrics, threshold, provenance...)
    <root>/<model>/<version>/SHA256SUMS       checksums of the two files above
    <root>/<model>/production.json            {"version": ..., "history": [...]}
    <root>/ensemble.json                      members' versions and the ensemble's val threshold

A version, once written, is never overwritten; a failed save leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import shutil
import tempfile
from abc import ABC, abstractmethod
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ctscan.errors import ChecksumError, StoreError, VersionExistsError

if TYPE_CHECKING:
    import keras

WEIGHTS_FILE = "weights.npz"
CARD_FILE = "card.json"
SUMS_FILE = "SHA256SUMS"
PRODUCTION_FILE = "production.json"
ENSEMBLE_FILE = "ensemble.json"
ARTIFACT_FILES = (WEIGHTS_FILE, CARD_FILE)
# float16 keeps 3 significant digits; arrays with larger magnitudes (BatchNorm variances of
# randomly initialised nets can be big) stay float32 so restoring them is exact enough.
FLOAT16_SAFE_MAX = 1.0e4


def new_version() -> str:
    """Sortable, collision-safe version id: UTC time plus a random suffix."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(2)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def format_sums(files: dict[str, bytes]) -> bytes:
    return "".join(f"{sha256_bytes(data)}  {name}\n" for name, data in sorted(files.items())).encode()


def parse_sums(text: str) -> dict[str, str]:
    sums = {}
    for line in text.splitlines():
        digest, sep, name = line.partition("  ")
        if sep:
            sums[name.strip()] = digest.strip()
    return sums


def verify_artifacts(files: dict[str, bytes], where: str) -> None:
    """Raise ChecksumError unless every artifact matches the SHA256SUMS in `files`."""
    if SUMS_FILE not in files:
        raise ChecksumError(f"{where}: no {SUMS_FILE}; refusing to load unverified weights")
    sums = parse_sums(files[SUMS_FILE].decode("utf-8", "replace"))
    for name in ARTIFACT_FILES:
        if name not in files:
            raise ChecksumError(f"{where}: {name} is missing")
        if sums.get(name) != sha256_bytes(files[name]):
            raise ChecksumError(f"{where}: {name} does not match its SHA-256; refusing to load it")


def pack_weights(model: keras.Model) -> bytes:
    """Model weights -> compressed npz (float16 where safe).

    Keys are the variable's position plus its path: Keras numbers unnamed layers per process
    (InceptionV3's `batch_normalization_57`...), so names alone do not identify a variable
    once several models were built; the architecture fixes the order.
    """
    arrays: dict[str, np.ndarray] = {}
    for index, variable in enumerate(model.weights):
        value = np.asarray(variable.numpy())
        if value.dtype == np.float32 and (value.size == 0 or np.abs(value).max() < FLOAT16_SAFE_MAX):
            value = value.astype(np.float16)
        arrays[f"{index:05d}|{variable.path}"] = value
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def unpack_weights(model: keras.Model, data: bytes) -> None:
    """Restore weights packed by `pack_weights` into a model of the same architecture."""
    try:
        archive = np.load(io.BytesIO(data))
    except (OSError, ValueError) as exc:
        raise StoreError(f"weights file is unreadable: {exc}") from None
    with archive as arrays:
        variables = list(model.weights)
        if all("|" in key for key in arrays.files):
            ordered = sorted(arrays.files, key=lambda key: int(key.split("|", 1)[0]))
        else:  # early releases keyed by path only
            ordered = [variable.path for variable in variables]
            missing = sorted(set(ordered) - set(arrays.files))[:3]
            if missing:
                raise StoreError(f"weights do not fit model {model.name}: missing {missing}")
        if len(ordered) != len(variables):
            raise StoreError(f"weights do not fit model {model.name}: {len(ordered)} arrays stored, "
                             f"the architecture has {len(variables)}")
        for key, variable in zip(ordered, variables, strict=True):
            value = arrays[key]
            if tuple(value.shape) != tuple(variable.shape):
                raise StoreError(f"weights do not fit model {model.name}: {key} has shape "
                                 f"{value.shape}, the model expects {tuple(variable.shape)}")
            variable.assign(value.astype(np.float32))


class ModelStore(ABC):
    """Where model versions live. Implementations: LocalModelStore, S3ModelStore."""

    url: str

    # --- primitives an implementation provides -------------------------------------------
    @abstractmethod
    def _read(self, key: str) -> bytes | None:
        """Bytes at `key` (a '/'-separated path under the store root), None when absent."""

    @abstractmethod
    def _write_version(self, key_prefix: str, files: dict[str, bytes]) -> None:
        """Write all files of a new version, or raise VersionExistsError; never partial."""

    @abstractmethod
    def _write_pointer(self, key: str, data: bytes) -> None:
        """Replace a small pointer document atomically."""

    @abstractmethod
    def _list(self, key_prefix: str) -> list[str]:
        """Names directly below `key_prefix` (folders and files)."""

    # --- shared behaviour -----------------------------------------------------------------
    def list_models(self) -> list[str]:
        return sorted(name for name in self._list("") if self.list_versions(name))

    def list_versions(self, name: str) -> list[str]:
        return sorted(v for v in self._list(name) if self._read(f"{name}/{v}/{SUMS_FILE}") is not None)

    def save(self, name: str, *, weights: bytes, card: dict[str, Any], version: str | None = None) -> str:
        version = version or new_version()
        card = {**card, "name": name, "version": version, "weights_sha256": sha256_bytes(weights)}
        card_bytes = json.dumps(card, indent=2, sort_keys=True, default=str).encode()
        files = {WEIGHTS_FILE: weights, CARD_FILE: card_bytes}
        files[SUMS_FILE] = format_sums(files)
        self._write_version(f"{name}/{version}", files)
        return version

    def load_files(self, name: str, version: str) -> dict[str, bytes]:
        """All artifact files of a version, verified against its checksums."""
        files: dict[str, bytes] = {}
        for filename in (*ARTIFACT_FILES, SUMS_FILE):
            data = self._read(f"{name}/{version}/{filename}")
            if data is not None:
                files[filename] = data
        if not files:
            raise StoreError(f"model {name} has no version {version} in {self.url}")
        verify_artifacts(files, f"{self.url} {name}/{version}")
        return files

    def card(self, name: str, version: str) -> dict[str, Any]:
        data = self._read(f"{name}/{version}/{CARD_FILE}")
        if data is None:
            raise StoreError(f"model {name} has no version {version} in {self.url}")
        return dict(json.loads(data))

    def production_record(self, name: str) -> dict[str, Any]:
        data = self._read(f"{name}/{PRODUCTION_FILE}")
        return dict(json.loads(data)) if data else {"version": None, "history": []}

    def production(self, name: str) -> str | None:
        version = self.production_record(name).get("version")
        return str(version) if version else None

    def promote(self, name: str, version: str, *, reason: str = "") -> None:
        if version not in self.list_versions(name):
            raise StoreError(f"model {name} has no version {version} in {self.url}")
        record = self.production_record(name)
        history = list(record.get("history", []))
        if record.get("version") and record["version"] != version:
            history.append(record["version"])
        new_record = {
            "version": version,
            "history": history,
            "updated_at": datetime.now(UTC).isoformat(),
            "reason": reason,
        }
        self._write_pointer(f"{name}/{PRODUCTION_FILE}", json.dumps(new_record, indent=2).encode())

    def rollback(self, name: str) -> str:
        record = self.production_record(name)
        history = list(record.get("history", []))
        if not history:
            raise StoreError(f"model {name} has no earlier production version to roll back to")
        previous = history.pop()
        new_record = {
            "version": previous,
            "history": history,
            "updated_at": datetime.now(UTC).isoformat(),
            "reason": f"rollback from {record.get('version')}",
        }
        self._write_pointer(f"{name}/{PRODUCTION_FILE}", json.dumps(new_record, indent=2).encode())
        return previous

    def ensemble_record(self) -> dict[str, Any] | None:
        data = self._read(ENSEMBLE_FILE)
        return dict(json.loads(data)) if data else None

    def save_ensemble_record(self, record: dict[str, Any]) -> None:
        self._write_pointer(ENSEMBLE_FILE, json.dumps(record, indent=2, sort_keys=True).encode())

    def copy_version_from(self, other: ModelStore, name: str, version: str) -> None:
        """Copy one verified version from another store (seeding, publishing)."""
        files = other.load_files(name, version)
        self._write_version(f"{name}/{version}", files)


class LocalModelStore(ModelStore):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve() if key else self.root
        if path != self.root and self.root not in path.parents:
            raise StoreError(f"key {key!r} leaves the store")
        return path

    def _read(self, key: str) -> bytes | None:
        path = self._path(key)
        return path.read_bytes() if path.is_file() else None

    def _list(self, key_prefix: str) -> list[str]:
        path = self._path(key_prefix)
        if not path.is_dir():
            return []
        return sorted(p.name for p in path.iterdir() if not p.name.startswith("."))

    def _write_version(self, key_prefix: str, files: dict[str, bytes]) -> None:
        target = self._path(key_prefix)
        if target.exists():
            raise VersionExistsError(f"{key_prefix} already exists in {self.url}; versions are never overwritten")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            for filename, data in files.items():
                (staging / filename).write_bytes(data)
            # rename is atomic and fails if the target appeared meanwhile
            os.rename(staging, target)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if target.exists():
                raise VersionExistsError(f"{key_prefix} already exists in {self.url}") from None
            raise StoreError(f"cannot write {key_prefix} to {self.url}: {exc}") from None

    def _write_pointer(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)


def open_store(url: str | Path) -> ModelStore:
    """`s3://bucket/prefix` -> S3ModelStore, anything else -> LocalModelStore."""
    text = str(url)
    if text.startswith("s3://"):
        from ctscan.s3store import S3ModelStore  # imported lazily: boto3 is only needed here

        return S3ModelStore.from_url(text)
    return LocalModelStore(text)


def load_keras_model(store: ModelStore, name: str, version: str | None = None) -> tuple[keras.Model, dict[str, Any]]:
    """Build the architecture named by the card and restore verified weights into it."""
    from ctscan.models import build_model

    version = version or store.production(name)
    if not version:
        raise StoreError(f"model {name} has no production version in {store.url}")
    files = store.load_files(name, version)
    card = json.loads(files[CARD_FILE])
    model = build_model(card["architecture"], init="none", input_size=int(card["input_size"]),
                        compile_model=False)
    unpack_weights(model, files[WEIGHTS_FILE])
    return model, card
