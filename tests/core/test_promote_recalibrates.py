"""`ctscan models promote` of an ensemble member fits the ensemble again on val in the same
step, so the clinicians' default uses the new version at once; with `--no-recalibrate` the
ensemble keeps serving the versions it was calibrated for, and the admin is told so."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from ctscan.storage.store import open_store

REPO_ROOT = Path(__file__).resolve().parents[2]


def ctscan(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ctscan.cli", *args], capture_output=True, text=True, timeout=900,
                          cwd=REPO_ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env})

ADMIN = {"CTSCAN_ADMIN_TOKEN": "promote-test-admin-token-0123456789"}


def _new_member_version(store_path: Path, name: str) -> str:
    store = open_store(store_path)
    card, weights = store.verified_card(name, store.production(name) or "")
    return store.save(name, weights=weights, card=card.model_dump(exclude={"name", "version", "weights_sha256"}))


def test_promoting_a_member_recalibrates_the_ensemble_in_the_same_step(tiny_model_store: Path, data_dir: Path,
                                                                        tmp_path: Path) -> None:
    store_path = Path(shutil.copytree(tiny_model_store, tmp_path / "store"))
    version = _new_member_version(store_path, "mobilenetv2")
    env = {**ADMIN, "CTSCAN_AUDIT_DIR": str(tmp_path / "audit")}
    # Set-up writes the admin verifier (fail-closed: without one every admin command is refused).
    assert ctscan("admin", "init", "--replace", "--store", str(store_path), env=env).returncode == 0
    done = ctscan("models", "promote", "mobilenetv2", version, "--store", str(store_path), "--data", str(data_dir),
                  env=env)
    assert done.returncode == 0, done.stderr
    assert "ensemble recalibrated on val" in done.stdout and f"mobilenetv2 {version}" in done.stdout
    record = open_store(store_path).ensemble_record()
    assert record is not None and record.members["mobilenetv2"] == version
    # The fixture's record named its members explicitly: the same members are fitted again.
    assert record.members_rule == "explicit" and set(record.members) == {"mobilenetv2", "densenet121", "inceptionv3"}

    # Asked not to: production moves, the ensemble stays on the old versions and the admin is told.
    second = _new_member_version(store_path, "mobilenetv2")
    left = ctscan("models", "promote", "mobilenetv2", second, "--store", str(store_path), "--no-recalibrate",
                  env=env)
    assert left.returncode == 0, left.stderr
    assert "the ensemble keeps serving the versions it was calibrated for (densenet121" in left.stderr
    assert f"mobilenetv2 {version}" in left.stderr and f"mobilenetv2 alone answers with {second}" in left.stderr
    assert "ctscan models calibrate-ensemble" in left.stderr
    store = open_store(store_path)
    assert store.production("mobilenetv2") == second and store.ensemble_record().members["mobilenetv2"] == version


def test_a_missing_data_set_changes_nothing(tiny_model_store: Path, tmp_path: Path) -> None:
    store_path = Path(shutil.copytree(tiny_model_store, tmp_path / "store"))
    before = open_store(store_path).production("mobilenetv2")
    version = _new_member_version(store_path, "mobilenetv2")
    failed = ctscan("models", "promote", "mobilenetv2", version, "--store", str(store_path),
                    "--data", str(tmp_path / "no-such-data"), env={**ADMIN, "CTSCAN_AUDIT_DIR": str(tmp_path / "a")})
    assert failed.returncode != 0
    assert open_store(store_path).production("mobilenetv2") == before
