"""One settings module: each variable read in one section, no default inside the source tree,
secrets refused when they are placeholders, and services holding the shared sections."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from ctscan.settings import (
    AdminSettings,
    CoreSettings,
    InferenceSettings,
    StoreSettings,
    TrainerSettings,
    data_home,
    describe_settings_error,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCATION_VARIABLES = ("CTSCAN_MODEL_STORE", "CTSCAN_DATASETS_URL", "CTSCAN_DATA_DIR", "CTSCAN_RELEASE_DIR",
                      "CTSCAN_RUNS_DIR", "CTSCAN_TRAINER_WORK_DIR", "CTSCAN_BROKER_DIR", "CTSCAN_HOME",
                      "XDG_DATA_HOME", "INFERENCE_VERIFICATION_DIR")


@pytest.fixture()
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in LOCATION_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # no .env from a developer's checkout
    return tmp_path / "home" / ".local" / "share" / "ctscan"


def test_no_default_points_into_the_source_tree(clean_environment: Path) -> None:
    store, core, trainer = StoreSettings(), CoreSettings(), TrainerSettings()
    locations = [store.model_store, store.datasets_url, core.data_dir, core.runs_dir, trainer.work_dir,
                 trainer.broker_dir, InferenceSettings().verification_path()]
    for location in locations:
        assert Path(location).is_relative_to(clean_environment), location
        assert not Path(location).resolve().is_relative_to(REPO_ROOT), location
    assert core.release_dir is None  # the release folder must be named (make setup does)


def test_the_data_folder_follows_ctscan_home_and_xdg(clean_environment: Path, monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert data_home() == tmp_path / "xdg" / "ctscan"
    monkeypatch.setenv("CTSCAN_HOME", str(tmp_path / "explicit"))
    assert StoreSettings().model_store == str(tmp_path / "explicit" / "model-store")


def test_services_read_the_shared_sections_from_their_own_variables(clean_environment: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTSCAN_MODEL_STORE", "s3://bucket/models")
    monkeypatch.setenv("CTSCAN_ADMIN_TOKEN", "an-admin-token-of-some-length")
    monkeypatch.setenv("INFERENCE_MODELS", "mobilenetv2, densenet121")
    # Names of fields are not variables: nothing is read from STORE or MODEL_STORE.
    monkeypatch.setenv("STORE", '{"model_store": "/wrong"}')
    monkeypatch.setenv("MODEL_STORE", "/wrong")
    trainer, inference = TrainerSettings(), InferenceSettings()
    assert trainer.store.model_store == inference.store.model_store == "s3://bucket/models"
    assert trainer.admin.token() == "an-admin-token-of-some-length"
    assert inference.models == ["mobilenetv2", "densenet121"]


@pytest.mark.parametrize("token", ["changeme", "token", "short", "<your-token>"])
def test_a_placeholder_admin_token_is_refused(token: str) -> None:
    with pytest.raises(ValidationError) as caught:
        AdminSettings.from_values(_env_file=None, admin_token=token)
    assert describe_settings_error(caught.value).startswith("CTSCAN_ADMIN_TOKEN ")
    assert token not in describe_settings_error(caught.value) or token == "token"


def test_an_empty_admin_token_means_not_configured() -> None:
    assert AdminSettings.from_values(_env_file=None, admin_token="  ").token() is None
    assert AdminSettings.from_values(_env_file=None, admin_token=None).token() is None
