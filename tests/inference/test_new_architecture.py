"""A fourth architecture through every seam: EfficientNet-B0 is one registration in
ctscan/models.py; `ctscan train` trains and stores it (with its checked ONNX copy), the
inference service serves it by name, the console offers it for training, and the shipped
ensemble is unchanged (it is not shipped)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctscan.models import architecture_names, ensemble_members, get_spec
from ctscan.schemas import ModelsResponse, Prediction
from ctscan.settings import InferenceSettings
from ctscan.storage.store import open_store
from ctscan.training.hyperparameters import checked_hyperparameters
from inference.conftest import start_service, stop_service

NEW = "efficientnetb0"


def test_the_new_architecture_is_offered_for_training_but_not_shipped() -> None:
    from services.web.forms import model_labels, prediction_choices

    assert NEW in architecture_names() and NEW not in ensemble_members()
    assert ensemble_members() == ("inceptionv3", "densenet121", "mobilenetv2")
    # Served by name when asked; the default served set (and so the ensemble) is the shipped one.
    assert InferenceSettings(models=[NEW]).models == [NEW]
    assert InferenceSettings().models == list(ensemble_members())
    # The console's job form and the trainer check it like any other; the clinic's picker does
    # not offer a model the service does not serve by default.
    assert model_labels()[NEW] == "EfficientNet-B0" and model_labels()["ensemble"] == "Calibrated ensemble"
    assert NEW not in {choice.value for choice in prediction_choices()}
    assert checked_hyperparameters(model=NEW, epochs=1, values={"input_size": 32}) == {"input_size": 32}
    assert get_spec(NEW).min_input_size == 32


@pytest.mark.slow  # trains a network (the ctscan command), converts it to ONNX, starts the service
def test_efficientnetb0_is_trained_by_the_cli_and_served(tmp_path: Path, data_dir: Path,
                                                         real_ct_images: dict[str, Path]) -> None:
    store_dir = tmp_path / "store"
    done = subprocess.run(
        [sys.executable, "-m", "ctscan.cli", "train", "--model", NEW, "--init", "none", "--input-size", "32",
         "--epochs", "1", "--batch-size", "8", "--limit-per-class", "4", "--no-augment", "--data", str(data_dir),
         "--run-dir", str(tmp_path / "run"), "--store", str(store_dir), "--promote", "always"],
        capture_output=True, text=True, timeout=1200, check=False, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    store = open_store(store_dir)
    version = store.production(NEW)
    assert version is not None and store.card(NEW, version).architecture == NEW
    assert store.has_onnx(NEW, version), "the ONNX copy was not made or did not match TensorFlow"

    service = start_service(store_dir=store_dir, log_path=tmp_path / "service.log",
                            env={"INFERENCE_MODELS": NEW, "INFERENCE_RELOAD_POLL_SECONDS": "0",
                                 "INFERENCE_VERIFICATION_DIR": str(data_dir)})
    try:
        models = ModelsResponse.model_validate(service.get("/models").json())
        assert [(m.name, m.version, m.backend) for m in models.models] == [(NEW, version, "onnxruntime")]
        response = service.predict(real_ct_images["covid_png"].read_bytes(), params={"model": NEW, "explain": "true"})
        assert response.status_code == 200, response.text
        answer = Prediction.model_validate(response.json())
        assert (answer.model, answer.model_version, answer.members) == (NEW, version, None)
        # One epoch on eight images is no classifier; its input gate may refuse the slice.
        assert answer.outcome in ("covid", "non_covid", "indeterminate", "not_chest_ct")
        if answer.probability_covid is not None:
            assert 0.0 <= answer.probability_covid <= 1.0 and answer.heatmap_png_base64
    finally:
        stop_service(service)
