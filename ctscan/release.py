"""The shipped release under `models/` (a local store) and seeding a fresh store from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ctscan.errors import StoreError, VersionExistsError
from ctscan.store import LocalModelStore, ModelStore


def seed_store(release_dir: Path, store: ModelStore) -> dict[str, Any]:
    """Copy every release version missing from `store`, verifying checksums, and point
    `production` at the release's production version where the store has none yet.
    Never replaces anything already in the store."""
    if not release_dir.is_dir():
        raise StoreError(f"release folder not found: {release_dir}")
    release = LocalModelStore(release_dir)
    result: dict[str, Any] = {"store": store.url, "copied": [], "promoted": [], "kept": []}
    for name in release.list_models():
        existing = set(store.list_versions(name))
        for version in release.list_versions(name):
            if version in existing:
                result["kept"].append(f"{name}/{version}")
                continue
            try:
                store.copy_version_from(release, name, version)
                result["copied"].append(f"{name}/{version}")
            except VersionExistsError:
                result["kept"].append(f"{name}/{version}")
        production = release.production(name)
        if production and store.production(name) is None:
            store.promote(name, production, reason="seeded from the shipped release")
            result["promoted"].append(f"{name}/{production}")
    ensemble = release.ensemble_record()
    if ensemble and store.ensemble_record() is None:
        store.save_ensemble_record(ensemble)
    return result
