"""The shipped release under `models/` (a local model store) and seeding a fresh store from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ctscan.errors import StoreError, VersionExistsError
from ctscan.storage.store import ModelStore, open_store


def seed_store(release_dir: Path, store: ModelStore) -> dict[str, Any]:
    """Copy every release version missing from `store` (with its ONNX copy), verifying
    checksums, and point `production` at the release's production version where the store has
    none yet. Never replaces anything already in the store; a version it holds with the same
    weights but without an ONNX copy gets the release's copy."""
    if not Path(release_dir).is_dir():
        raise StoreError(f"release folder not found: {release_dir}")
    release = open_store(release_dir)
    result: dict[str, Any] = {"store": store.url, "copied": [], "promoted": [], "kept": [], "onnx_attached": []}
    for name in release.list_models():
        existing = set(store.list_versions(name))
        for version in release.list_versions(name):
            if version not in existing:
                try:
                    store.copy_version_from(release, name, version)
                    result["copied"].append(f"{name}/{version}")
                    continue
                except VersionExistsError:
                    pass
            result["kept"].append(f"{name}/{version}")
            if store.card(name, version).weights_sha256 == release.card(name, version).weights_sha256:
                try:
                    if store.copy_onnx_from(release, name, version):
                        result["onnx_attached"].append(f"{name}/{version}")
                except VersionExistsError:
                    pass  # attached meanwhile by another seeder
        production = release.production(name)
        if production and store.production(name) is None:
            store.promote(name, production, reason="seeded from the shipped release")
            result["promoted"].append(f"{name}/{production}")
    ensemble = release.ensemble_record()
    if ensemble and store.ensemble_record() is None:
        store.save_ensemble_record(ensemble)
    return result
