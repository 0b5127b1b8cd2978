"""The registry is the only list of model names: an architecture registered in one place is
built, stored, served by configuration, converted to ONNX and offered on the page."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ctscan.models import (
    ArchitectureSpec,
    architecture_names,
    build_model,
    register_architecture,
    scale_to_plus_minus_one,
    unregister_architecture,
)


def _tiny_cnn(tensor: Any, weights: str | None) -> Any:
    """A two-convolution backbone: the smallest thing with a last convolutional activation."""
    import keras

    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="toy_conv1")(tensor)
    x = keras.layers.Conv2D(16, 3, strides=2, name="toy_conv2")(x)
    x = keras.layers.Activation("relu", name="toy_features")(x)
    # Like keras.applications: the backbone starts at the model's input, through the preprocessing.
    return keras.Model(keras.utils.get_source_inputs(tensor), x, name="toy_backbone")


TOY = ArchitectureSpec("toynet", "ToyNet", _tiny_cnn, scale_to_plus_minus_one, input_size=48, min_input_size=16,
                       dense_units=8, dropout_rates=(0.2,), gradcam_layer="toy_features")


@pytest.fixture()
def toy_architecture() -> Iterator[ArchitectureSpec]:
    register_architecture(TOY)
    yield TOY
    unregister_architecture(TOY.name)


@pytest.mark.slow  # builds, stores and restores a Keras model
def test_a_registered_architecture_is_built_stored_and_offered(toy_architecture: ArchitectureSpec,
                                                               tmp_path: Path) -> None:
    from ctscan.gradcam import make_gradcam
    from ctscan.models import load_keras_model, pack_weights
    from ctscan.settings import InferenceSettings
    from ctscan.storage.store import open_store
    from services.web.forms import model_labels

    assert architecture_names()[-1] == "toynet"
    model = build_model("toynet", init="none", compile_model=False)
    assert model.input_shape == (None, 48, 48, 3) and model.layers[1].name == "pre_scale"

    store = open_store(tmp_path)
    version = store.save("toynet", weights=pack_weights(model),
                         card={"architecture": "toynet", "input_size": 48, "threshold": 0.5})
    restored, _ = load_keras_model(store, "toynet", version)
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 48, 48, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(restored(pixels)), np.asarray(model(pixels)), atol=2e-3)
    assert make_gradcam(restored)(pixels[0]).shape == (11, 11)

    # Configuration, the page and the command line know it without being told elsewhere.
    assert InferenceSettings(models=["toynet", "mobilenetv2"]).models == ["toynet", "mobilenetv2"]
    assert model_labels()["toynet"] == "ToyNet" and model_labels()["ensemble"] == "Calibrated ensemble"
    assert "toynet" in _subcommand_help("train")


def _subcommand_help(name: str) -> str:
    from ctscan.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return str(action.choices[name].format_help())  # type: ignore[index]


def test_names_are_refused_where_they_would_clash() -> None:
    with pytest.raises(ValueError):
        register_architecture(ArchitectureSpec("ensemble", "E", _tiny_cnn, scale_to_plus_minus_one, 48, 16, 8,
                                               (), "toy_features"))
    assert "ensemble" not in architecture_names()
