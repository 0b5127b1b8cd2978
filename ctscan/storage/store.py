"""The model store: versions of each model (weights, card, checksums), production pointers,
the ensemble record and each version's ONNX copy, on any object store (`ctscan.storage.objects`).

    <root>/<model>/<version>/weights.npz          float16 where lossless enough, float32 otherwise
    <root>/<model>/<version>/card.json            model card (`ctscan.storage.records.ModelCard`)
    <root>/<model>/<version>/SHA256SUMS           checksums of the two files above, written last
    <root>/<model>/<version>/onnx/model.onnx      ONNX Runtime copy of the weights (optional)
    <root>/<model>/<version>/onnx/manifest.json   its provenance and check (`OnnxManifest`)
    <root>/<model>/<version>/onnx/SHA256SUMS      checksums of the two files above, written last
    <root>/<model>/production.json                `ProductionPointer`: version and history
    <root>/ensemble.json                          `EnsembleRecord`: members and val threshold

A version, once written, is never overwritten, and a failed save leaves nothing behind. The
ONNX copy is a separate, create-only attachment with its own checksums, bound to the weights
it was made from (`weights_sha256`): versions saved before ONNX copies existed (or whose
conversion failed) get one later through `attach_onnx` without their own files changing.
Every read is verified against the checksums.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError

from ctscan.errors import ChecksumError, StoreError, VersionExistsError
from ctscan.storage.objects import ObjectStore, open_objects
from ctscan.storage.records import EnsembleRecord, ModelCard, OnnxManifest, ProductionPointer, Record

if TYPE_CHECKING:
    from pathlib import Path

WEIGHTS_FILE = "weights.npz"
CARD_FILE = "card.json"
SUMS_FILE = "SHA256SUMS"
PRODUCTION_FILE = "production.json"
ENSEMBLE_FILE = "ensemble.json"
ARTIFACT_FILES = (WEIGHTS_FILE, CARD_FILE)
ONNX_FOLDER = "onnx"
ONNX_FILE = "model.onnx"
ONNX_MANIFEST_FILE = "manifest.json"
ONNX_FILES = (ONNX_FILE, ONNX_MANIFEST_FILE)

R = TypeVar("R", bound=Record)


def new_version() -> str:
    """Sortable, collision-safe version id: UTC time plus a random suffix."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(2)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def format_sums(files: Mapping[str, bytes]) -> bytes:
    return "".join(f"{sha256_bytes(data)}  {name}\n" for name, data in sorted(files.items())).encode()


def parse_sums(text: str) -> dict[str, str]:
    sums = {}
    for line in text.splitlines():
        digest, sep, name = line.partition("  ")
        if sep:
            sums[name.strip()] = digest.strip()
    return sums


def verify_artifacts(files: Mapping[str, bytes], where: str, names: tuple[str, ...] = ARTIFACT_FILES) -> None:
    """Raise ChecksumError unless every file in `names` matches the SHA256SUMS in `files`."""
    if SUMS_FILE not in files:
        raise ChecksumError(f"{where}: no {SUMS_FILE}; refusing to load unverified files")
    sums = parse_sums(files[SUMS_FILE].decode("utf-8", "replace"))
    for name in names:
        if name not in files:
            raise ChecksumError(f"{where}: {name} is missing")
        if sums.get(name) != sha256_bytes(files[name]):
            raise ChecksumError(f"{where}: {name} does not match its SHA-256; refusing to load it")


def _check_name(kind: str, value: str) -> str:
    if not value or "/" in value or value.startswith(".") or not value.isprintable():
        raise StoreError(f"{kind} {value!r} is not a valid name (no '/', no leading '.')")
    return value


def parse_record(cls: type[R], data: bytes, where: str) -> R:
    try:
        return cls.model_validate(json.loads(data))
    except (ValueError, ValidationError) as exc:
        first = exc.errors()[0] if isinstance(exc, ValidationError) else None
        detail = (f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}" if first else str(exc))
        raise StoreError(f"{where} is not a valid {cls.__name__}: {detail}") from None


class ModelStore:
    """Typed access to model versions on one object store."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects
        self.url = objects.url

    # --- listing ---------------------------------------------------------------------------
    def list_models(self) -> list[str]:
        # Dot-names (.jobs, .runs) belong to the trainer; files (ensemble.json) are records.
        return sorted(name for name in self.objects.names() if not name.startswith(".")
                      and self.list_versions(name))

    def list_versions(self, name: str) -> list[str]:
        return sorted(v for v in self.objects.names(name)
                      if not v.startswith(".") and self.objects.exists(f"{name}/{v}/{SUMS_FILE}"))

    # --- versions --------------------------------------------------------------------------
    def save(self, name: str, *, weights: bytes, card: ModelCard | Mapping[str, Any],
             version: str | None = None) -> str:
        """Write a new version (VersionExistsError if it exists); returns its id."""
        _check_name("model", name)
        version = _check_name("version", version or new_version())
        parsed = card if isinstance(card, ModelCard) else ModelCard.model_validate(dict(card))
        parsed = parsed.model_copy(update={"name": name, "version": version,
                                           "weights_sha256": sha256_bytes(weights)})
        files = {WEIGHTS_FILE: weights, CARD_FILE: parsed.to_json()}
        files[SUMS_FILE] = format_sums(files)
        try:
            self.objects.put_folder_new(f"{name}/{version}", files, marker=SUMS_FILE)
        except VersionExistsError:
            raise VersionExistsError(f"{name}/{version} already exists in {self.url}; "
                                     "versions are never overwritten") from None
        return version

    def load_files(self, name: str, version: str) -> dict[str, bytes]:
        """The version's weights, card and checksums, verified."""
        files: dict[str, bytes] = {}
        for filename in (*ARTIFACT_FILES, SUMS_FILE):
            data = self.objects.get(f"{name}/{version}/{filename}")
            if data is not None:
                files[filename] = data
        if not files:
            raise StoreError(f"model {name} has no version {version} in {self.url}")
        verify_artifacts(files, f"{self.url} {name}/{version}")
        return files

    def card(self, name: str, version: str) -> ModelCard:
        data = self.objects.get(f"{name}/{version}/{CARD_FILE}")
        if data is None:
            raise StoreError(f"model {name} has no version {version} in {self.url}")
        return parse_record(ModelCard, data, f"{self.url} {name}/{version}/{CARD_FILE}")

    def verified_card(self, name: str, version: str) -> tuple[ModelCard, bytes]:
        """The card and weights of a version, both checked against its checksums."""
        files = self.load_files(name, version)
        return parse_record(ModelCard, files[CARD_FILE], f"{self.url} {name}/{version}"), files[WEIGHTS_FILE]

    # --- production pointers ---------------------------------------------------------------
    def production_record(self, name: str) -> ProductionPointer:
        data = self.objects.get(f"{name}/{PRODUCTION_FILE}")
        if not data:
            return ProductionPointer()
        return parse_record(ProductionPointer, data, f"{self.url} {name}/{PRODUCTION_FILE}")

    def production(self, name: str) -> str | None:
        return self.production_record(name).version or None

    def promote(self, name: str, version: str, *, reason: str = "") -> None:
        if version not in self.list_versions(name):
            raise StoreError(f"model {name} has no version {version} in {self.url}")
        record = self.production_record(name)
        history = list(record.history)
        if record.version and record.version != version:
            history.append(record.version)
        self._write_pointer(name, ProductionPointer(version=version, history=history,
                                                    updated_at=datetime.now(UTC).isoformat(), reason=reason))

    def rollback(self, name: str) -> str:
        record = self.production_record(name)
        history = list(record.history)
        if not history:
            raise StoreError(f"model {name} has no earlier production version to roll back to")
        previous = history.pop()
        self._write_pointer(name, ProductionPointer(version=previous, history=history,
                                                    updated_at=datetime.now(UTC).isoformat(),
                                                    reason=f"rollback from {record.version}"))
        return previous

    def _write_pointer(self, name: str, pointer: ProductionPointer) -> None:
        self.objects.put(f"{name}/{PRODUCTION_FILE}", pointer.to_json())

    # --- ensemble --------------------------------------------------------------------------
    def ensemble_record(self) -> EnsembleRecord | None:
        data = self.objects.get(ENSEMBLE_FILE)
        return parse_record(EnsembleRecord, data, f"{self.url} {ENSEMBLE_FILE}") if data else None

    def save_ensemble_record(self, record: EnsembleRecord | Mapping[str, Any]) -> None:
        parsed = record if isinstance(record, EnsembleRecord) else EnsembleRecord.model_validate(dict(record))
        self.objects.put(ENSEMBLE_FILE, parsed.to_json())

    # --- ONNX copies -------------------------------------------------------------------------
    def has_onnx(self, name: str, version: str) -> bool:
        return self.objects.exists(f"{name}/{version}/{ONNX_FOLDER}/{SUMS_FILE}")

    def attach_onnx(self, name: str, version: str, onnx_bytes: bytes, manifest: OnnxManifest) -> None:
        """Store the ONNX copy of a version (create-only, checksummed, bound to its weights)."""
        card = self.card(name, version)
        if manifest.weights_sha256 != card.weights_sha256:
            raise StoreError(f"the ONNX copy was made from other weights than {name}/{version}")
        if manifest.sha256 != sha256_bytes(onnx_bytes) or manifest.size != len(onnx_bytes):
            raise ChecksumError(f"the ONNX copy of {name}/{version} does not match its manifest")
        files = {ONNX_FILE: onnx_bytes, ONNX_MANIFEST_FILE: manifest.to_json()}
        files[SUMS_FILE] = format_sums(files)
        try:
            self.objects.put_folder_new(f"{name}/{version}/{ONNX_FOLDER}", files, marker=SUMS_FILE)
        except VersionExistsError:
            raise VersionExistsError(f"{name}/{version} already has an ONNX copy in {self.url}; "
                                     "it is never replaced") from None

    def onnx_copy(self, name: str, version: str) -> tuple[bytes, OnnxManifest] | None:
        """The version's ONNX copy and manifest, verified; None when it has none."""
        folder = f"{name}/{version}/{ONNX_FOLDER}"
        sums = self.objects.get(f"{folder}/{SUMS_FILE}")
        if sums is None:
            return None
        files = {SUMS_FILE: sums}
        for filename in ONNX_FILES:
            data = self.objects.get(f"{folder}/{filename}")
            if data is not None:
                files[filename] = data
        where = f"{self.url} {folder}"
        verify_artifacts(files, where, ONNX_FILES)
        manifest = parse_record(OnnxManifest, files[ONNX_MANIFEST_FILE], f"{where}/{ONNX_MANIFEST_FILE}")
        if manifest.sha256 != sha256_bytes(files[ONNX_FILE]):
            raise ChecksumError(f"{where}: {ONNX_FILE} does not match its manifest")
        return files[ONNX_FILE], manifest

    # --- copying between stores ----------------------------------------------------------------
    def copy_version_from(self, other: ModelStore, name: str, version: str) -> None:
        """Copy one verified version (and its ONNX copy) from another store (seeding, publishing)."""
        files = other.load_files(name, version)
        self.objects.put_folder_new(f"{name}/{version}", files, marker=SUMS_FILE)
        self.copy_onnx_from(other, name, version)

    def copy_onnx_from(self, other: ModelStore, name: str, version: str) -> bool:
        """Attach `other`'s verified ONNX copy of a version this store holds with the same
        weights and lacks a copy of; True when one was attached."""
        if self.has_onnx(name, version):
            return False
        copy = other.onnx_copy(name, version)
        if copy is None:
            return False
        self.attach_onnx(name, version, *copy)
        return True


def open_store(url: str | Path) -> ModelStore:
    """The model store at a folder, s3://bucket/prefix or any registered backend's URL."""
    return ModelStore(open_objects(url))
