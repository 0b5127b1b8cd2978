"""The three architectures exactly as specified, their init modes and fine-tuning helper."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ctscan.errors import ModelError, StoreError
from ctscan.models import ARCHITECTURES, backbone_layers, build_model, load_keras_model, pack_weights, unfreeze_top
from ctscan.storage.store import open_store

# Tests that build a Keras model are slow (TensorFlow's import alone takes 10-20 s on the CI
# machine); the fast tier keeps the checks that refuse bad arguments before any is built.
keras_model = pytest.mark.slow


@keras_model
@pytest.mark.parametrize(
    ("name", "size", "dense_units", "dropouts"),
    [("inceptionv3", 299, 512, 1), ("densenet121", 224, 512, 2), ("mobilenetv2", 224, 1024, 1)],
)
def test_heads_match_the_brief(name: str, size: int, dense_units: int, dropouts: int) -> None:
    model = build_model(name, init="none")
    assert model.input_shape == (None, size, size, 3)
    head = [layer for layer in model.layers if layer.name.startswith("head_") or layer.name == "probability_covid"]
    kinds = [type(layer).__name__ for layer in head]
    assert kinds == ["GlobalAveragePooling2D", "Dense", *["Dropout"] * dropouts, "Dense"]
    assert head[1].units == dense_units and head[1].activation.__name__ == "relu"
    assert head[-1].units == 1 and head[-1].activation.__name__ == "sigmoid"
    assert model.get_layer(ARCHITECTURES[name].gradcam_layer) is not None


@keras_model
def test_preprocessing_lives_in_the_model_so_callers_feed_pixels() -> None:
    model = build_model("mobilenetv2", init="none", input_size=64, compile_model=False)
    assert model.layers[1].name == "pre_scale"
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    probabilities = np.asarray(model(pixels, training=False))
    assert probabilities.shape == (2, 1) and ((0 <= probabilities) & (probabilities <= 1)).all()


@keras_model
def test_imagenet_without_network_names_the_alternatives() -> None:
    with pytest.raises(ModelError, match="--init none.*--init PATH"):
        build_model("mobilenetv2", init="imagenet", input_size=64)


@keras_model
def test_local_backbone_weights_file_is_loaded(tmp_path: Path) -> None:
    import keras

    backbone = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(64, 64, 3))
    path = tmp_path / "mobilenet_backbone.weights.h5"
    backbone.save_weights(path)
    model = build_model("mobilenetv2", init=str(path), input_size=64, compile_model=False)
    np.testing.assert_allclose(model.get_layer("Conv1").get_weights()[0], backbone.get_layer("Conv1").get_weights()[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "resnet50"}, "unknown model 'resnet50'"),
        ({"name": "mobilenetv2", "init": "/no/such/weights.h5"}, "neither 'imagenet', 'none'"),
        ({"name": "inceptionv3", "init": "none", "input_size": 40}, "at least 75"),
    ],
)
def test_bad_arguments_raise_model_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ModelError, match=message):
        build_model(**kwargs)  # type: ignore[arg-type]


@keras_model
def test_unfreeze_top_keeps_batchnorm_frozen_and_checks_arguments() -> None:
    import keras

    model = build_model("mobilenetv2", init="none", input_size=64, compile_model=False)
    layers = backbone_layers(model)
    unfrozen = unfreeze_top(model, 20)
    top = layers[-20:]
    assert unfrozen == sum(not isinstance(layer, keras.layers.BatchNormalization) for layer in top)
    assert all(not layer.trainable for layer in layers[:-20])
    assert all(layer.trainable != isinstance(layer, keras.layers.BatchNormalization) for layer in top)
    for bad in (0, -3, len(layers) + 1):
        with pytest.raises(ValueError):
            unfreeze_top(model, bad)


@keras_model
def test_a_weights_file_that_is_not_weights_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "backbone.weights.h5"
    bogus.write_bytes(b"this is not HDF5")
    with pytest.raises(ModelError, match="cannot load backbone weights"):
        build_model("mobilenetv2", init=str(bogus), input_size=64, compile_model=False)


# --- weights in the store (ctscan.models packs them; the store only keeps bytes) -------------
@pytest.fixture(scope="module")
def small_model():  # type: ignore[no-untyped-def]
    return build_model("mobilenetv2", init="none", input_size=32, compile_model=False)


def card() -> dict[str, object]:
    return {"architecture": "mobilenetv2", "input_size": 32, "init": "none", "threshold": 0.5,
            "metrics": {"val": {"auc": 0.6}}}


@keras_model
def test_saved_weights_restore_in_float16_precision(tmp_path: Path, small_model) -> None:  # type: ignore[no-untyped-def]
    store = open_store(tmp_path)
    weights = pack_weights(small_model)
    version = store.save("mobilenetv2", weights=weights, card=card())
    restored, stored_card = load_keras_model(store, "mobilenetv2", version)
    pixels = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(restored(pixels)), np.asarray(small_model(pixels)), atol=2e-3)
    assert stored_card.version == version and len(stored_card.weights_sha256 or "") == 64
    # float16 storage: about half the float32 size
    assert len(weights) < 0.6 * 4 * small_model.count_params()


@keras_model
def test_weights_load_into_a_model_built_after_others_in_the_same_process(tmp_path: Path) -> None:
    # InceptionV3's unnamed layers get process-wide counters; loading must not depend on them.
    store = open_store(tmp_path)
    first = build_model("inceptionv3", init="none", input_size=75, compile_model=False)
    version = store.save("inceptionv3", weights=pack_weights(first),
                         card={**card(), "architecture": "inceptionv3", "input_size": 75})
    build_model("inceptionv3", init="none", input_size=75, compile_model=False)  # shifts the counters
    restored, _ = load_keras_model(store, "inceptionv3", version)
    pixels = np.random.default_rng(1).uniform(0, 255, (2, 75, 75, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(restored(pixels)), np.asarray(first(pixels)), atol=5e-3)


@keras_model
def test_weights_of_another_architecture_are_refused(tmp_path: Path, small_model) -> None:  # type: ignore[no-untyped-def]
    store = open_store(tmp_path)
    version = store.save("densenet121", weights=pack_weights(small_model),
                         card={**card(), "architecture": "densenet121"})
    with pytest.raises(StoreError, match="do not fit"):
        load_keras_model(store, "densenet121", version)
