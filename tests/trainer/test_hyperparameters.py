"""Hyper-parameters are checked at submit by one pydantic model (ctscan.training.hyperparameters),
the same for the CLI, the console and the worker; `data upload` decodes every image."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ctscan.errors import CTScanError
from ctscan.training.hyperparameters import HyperParameterError, HyperParameters, checked_hyperparameters

# value -> what the refusal must say
BAD_VALUES: list[tuple[dict[str, Any], str]] = [
    ({"input_size": 0}, "input_size: mobilenetv2 takes 32..512 pixels, got 0"),
    ({"input_size": -3}, "input_size: mobilenetv2 takes 32..512 pixels, got -3"),
    ({"input_size": 100000}, "input_size: mobilenetv2 takes 32..512 pixels, got 100000"),
    ({"input_size": "big"}, "input_size: Input should be a valid integer"),
    ({"threshold_rule": "best"}, "threshold_rule: Input should be 'youden', 'f1' or 'accuracy'"),
    ({"learning_rate": "abc"}, "learning_rate: Input should be a valid number (got 'abc')"),
    ({"learning_rate": 0}, "learning_rate: Input should be greater than 0"),
    ({"augment": "maybe"}, "augment: Input should be a valid boolean (got 'maybe')"),
    ({"batch_size": 2.5}, "batch_size: Input should be a valid integer"),
    ({"batch_size": 0}, "batch_size: Input should be greater than or equal to 1"),
    ({"mixup": 3}, "mixup: Input should be less than or equal to 1"),
    ({"preprocessing": "magic"}, "preprocessing must be one of"),
    ({"swa_epochs": 9}, "swa_epochs: at most epochs (3), got 9"),
    ({"learning_rat": 0.1}, "unknown hyper-parameter learning_rat"),
    ({"source_weights": {"ucsd-covid-ct": 0}}, "source_weights.ucsd-covid-ct: Input should be greater than 0"),
    ({"source_weights": "ucsd=2"}, "source_weights: Input should be a valid dictionary"),
]


def test_the_model_covers_every_train_config_setting() -> None:
    from services.trainer.jobs import HYPERPARAMETERS

    assert set(HyperParameters.model_fields) == set(HYPERPARAMETERS)


@pytest.mark.parametrize(("values", "message"), BAD_VALUES)
def test_each_bad_value_is_refused_with_its_reason(values: dict[str, Any], message: str) -> None:
    with pytest.raises(HyperParameterError) as refused:
        checked_hyperparameters(model="mobilenetv2", epochs=3, values=values)
    assert message in str(refused.value)


def test_good_values_are_kept_as_given() -> None:
    given = {"input_size": 64, "learning_rate": 1, "augment": False, "threshold_rule": "f1"}
    assert checked_hyperparameters(model="mobilenetv2", epochs=3, values=given) == {
        "input_size": 64, "learning_rate": 1.0, "augment": False, "threshold_rule": "f1"}
    with pytest.raises(HyperParameterError, match=r"inceptionv3 takes 75\.\.512 pixels, got 64"):
        checked_hyperparameters(model="inceptionv3", epochs=1, values={"input_size": 64})
    with pytest.raises(HyperParameterError, match="epochs must be a whole number in 1..1000"):
        checked_hyperparameters(model="mobilenetv2", epochs=0, values={})


def test_the_jobs_api_refuses_every_bad_value_before_queueing(
        jobs_client: Any, published_dataset: tuple[str, str], admin_token: str) -> None:
    before = {r.id for r in jobs_client.list_jobs()}
    for values, message in BAD_VALUES:
        with pytest.raises(CTScanError) as refused:
            jobs_client.submit(model="mobilenetv2", dataset=published_dataset[0], dataset_version=published_dataset[1],
                               init="none", epochs=3, hyperparameters=values, admin_token=admin_token)
        assert message in str(refused.value)
    assert {r.id for r in jobs_client.list_jobs()} == before  # nothing was recorded or queued


def test_the_memory_guard_refuses_a_data_set_too_big_to_decode(
        trainer_env: dict[str, str], published_dataset: tuple[str, str], admin_token: str) -> None:
    from ctscan.settings import TrainerSettings
    from services.trainer.api import JobsClient

    # 20 train and val images, 16 variants each at 512 px: about 960 MB decoded, more than
    # half of a 256 MB limit.
    client = JobsClient(TrainerSettings.from_values(job_memory_mb=256, max_input_size=512))
    with pytest.raises(HyperParameterError, match="more than half the per-job memory limit"):
        client.submit(model="mobilenetv2", dataset=published_dataset[0], dataset_version=published_dataset[1],
                      init="none", epochs=1,
                      hyperparameters={"input_size": 512, "augment": True, "source_variants": 16},
                      admin_token=admin_token)


@pytest.mark.parametrize(("argument", "message"), [
    ("input_size=0", "input_size: mobilenetv2 takes 32..512 pixels, got 0"),
    ("input_size=100000", "got 100000"),
    ("learning_rate=abc", "learning_rate: Input should be a valid number (got 'abc')"),
    ("augment=maybe", "augment: Input should be a valid boolean (got 'maybe')"),
    ("threshold_rule=best", "threshold_rule: Input should be"),
])
def test_the_cli_refuses_bad_values_without_a_traceback(
        ctscan_cli: Callable[..., Any], published_dataset: tuple[str, str], argument: str, message: str) -> None:
    result = ctscan_cli("jobs", "submit", "--model", "mobilenetv2", "--dataset", published_dataset[0],
                        "--dataset-version", published_dataset[1], "--init", "none", "--epochs", "1",
                        "--hp", argument)
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith("ctscan: error: ") and message in result.stderr
    assert "Traceback" not in result.stderr


def test_upload_refuses_images_that_do_not_decode(trainer_env: dict[str, str], tiny_dataset_dir: Path,
                                                  tmp_path: Path) -> None:
    import hashlib

    from ctscan.data.versions import list_dataset_versions, upload_dataset
    from ctscan.errors import DataError

    broken = tmp_path / "undecodable"
    shutil.copytree(tiny_dataset_dir, broken)
    image = next(p for p in sorted(broken.rglob("*")) if p.suffix.lower() in (".png", ".jpg"))
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    # The checksums are remade, so only decoding can notice.
    sums = broken / "SHA256SUMS"
    relative = image.relative_to(broken).as_posix()
    sums.write_text("".join(
        f"{hashlib.sha256(image.read_bytes()).hexdigest()}  {relative}\n" if line.endswith(f"  {relative}") else
        line + "\n" for line in sums.read_text().splitlines()))
    datasets_url = trainer_env["CTSCAN_DATASETS_URL"] + "-decode"
    with pytest.raises(DataError, match=f"1 image\\(s\\) in .* do not decode, nothing was published: {relative}"):
        upload_dataset(broken, f"{datasets_url}/broken", version="v1")
    assert list_dataset_versions(datasets_url, "broken") == []
