"""The architectures of the product: one registry, one factory.

`ARCHITECTURES` is the only list of model names: the CLI, the services' settings, the web
page, the evaluation, the benchmarks and the scripts all ask it; `ensemble_members()` names
the ones in the product's ensemble (served by default). An architecture is its name, the name people read, a
backbone builder, the backbone's own input preprocessing, its input size and the brief's
head; `register_architecture` adds one (see docs/architecture.md).

Each model takes RGB pixels 0..255 (float32, NHWC) and does its backbone's own
preprocessing inside, so servers and the ONNX copy feed plain pixels. The backbone is built
on the preprocessed tensor (one flat graph), which keeps Grad-CAM and layer freezing simple.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ctscan.errors import ModelError, StoreError

if TYPE_CHECKING:
    import keras

    from ctscan.storage.records import ModelCard
    from ctscan.storage.store import ModelStore

ENSEMBLE = "ensemble"  # the mean of the architectures' probabilities; never an architecture's name
INPUT_NAME = "pixels"
OUTPUT_NAME = "probability_covid"
HEAD_PREFIX = "head_"
PREPROCESSING_PREFIX = "pre_"  # layer names of the preprocessing (not part of the backbone)
SCRATCH_BN_MOMENTUM = 0.9

# (preprocessed input tensor, weights: "imagenet" | path | None) -> backbone without its top
BackboneBuilder = Callable[[Any, str | None], "keras.Model"]
# input tensor of pixels 0..255 -> what the backbone expects; layers named PREPROCESSING_PREFIX*
Preprocessing = Callable[[Any], Any]


@dataclass(frozen=True)
class ArchitectureSpec:
    name: str
    label: str  # as people read it ("DenseNet-121")
    backbone: BackboneBuilder
    preprocessing: Preprocessing
    input_size: int
    min_input_size: int
    dense_units: int
    dropout_rates: tuple[float, ...]
    gradcam_layer: str  # last convolutional activation of the backbone
    # Layers (from the top of the backbone) made trainable in the fine-tuning phase;
    # 0 = the seed's regime keeps the base frozen throughout.
    finetune_layers: int = 0
    # Whether the product's ensemble (and so the default served models, `ctscan predict`'s
    # ensemble, the page's picker) includes it. An architecture outside it can be trained,
    # stored, evaluated and served by name; it joins once a trained version is shipped.
    in_ensemble: bool = True


# --- preprocessing, as layers inside the model ------------------------------------------------
def scale_to_plus_minus_one(inputs: Any) -> Any:
    """keras.applications' "tf" mode: pixels 0..255 -> -1..1."""
    import keras

    return keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name=f"{PREPROCESSING_PREFIX}scale")(inputs)


def imagenet_normalisation(inputs: Any) -> Any:
    """keras.applications' "torch" mode: 0..1, then ImageNet's mean and standard deviation."""
    import keras

    scaled = keras.layers.Rescaling(1.0 / 255.0, name=f"{PREPROCESSING_PREFIX}scale")(inputs)
    return keras.layers.Normalization(
        mean=[0.485, 0.456, 0.406],
        variance=[0.229**2, 0.224**2, 0.225**2],
        name=f"{PREPROCESSING_PREFIX}normalize",
    )(scaled)


def keep_pixels(inputs: Any) -> Any:
    """No preprocessing layer: the backbone normalises its input itself (EfficientNet)."""
    return inputs


# --- backbones ---------------------------------------------------------------------------------
def _inception_v3(tensor: Any, weights: str | None) -> keras.Model:
    import keras

    return keras.applications.InceptionV3(include_top=False, weights=weights, input_tensor=tensor)


def _densenet121(tensor: Any, weights: str | None) -> keras.Model:
    import keras

    return keras.applications.DenseNet121(include_top=False, weights=weights, input_tensor=tensor)


def _mobilenet_v2(tensor: Any, weights: str | None) -> keras.Model:
    import keras

    return keras.applications.MobileNetV2(include_top=False, weights=weights, input_tensor=tensor)


# ImageNet's channel statistics (0..1 scale), as keras.applications' EfficientNet fixes them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _efficientnet_b0(tensor: Any, weights: str | None) -> keras.Model:
    """EfficientNet-B0, whose own first layers scale 0..255 pixels and normalise them.

    Keras adds one more rescaling layer only when it loads its ImageNet weights, so a version
    trained from them and rebuilt without weights (as the store rebuilds every version) would
    see other inputs. Here the graph is always the one without weights: the normalisation is
    set to ImageNet's statistics and pre-trained weights (ImageNet or a local file) are copied
    in layer by layer."""
    import keras

    backbone = keras.applications.EfficientNetB0(include_top=False, weights=None, input_tensor=tensor)
    if weights is not None:
        source = keras.applications.EfficientNetB0(include_top=False, weights=weights,
                                                   input_shape=tuple(tensor.shape[1:]))
        targets = [layer for layer in backbone.layers if layer.weights]
        sources = [layer for layer in source.layers if layer.weights]
        for target, weighted in zip(targets, sources, strict=True):
            target.set_weights(weighted.get_weights())
    normalization = next(layer for layer in backbone.layers if isinstance(layer, keras.layers.Normalization))
    count = normalization.get_weights()[2]
    normalization.set_weights([np.asarray(IMAGENET_MEAN, np.float32), np.square(np.asarray(IMAGENET_STD, np.float32)),
                               count])
    return backbone


ARCHITECTURES: dict[str, ArchitectureSpec] = {}


def register_architecture(spec: ArchitectureSpec) -> None:
    if not spec.name.isidentifier() or spec.name == ENSEMBLE:
        raise ValueError(f"{spec.name!r} cannot be an architecture name")
    ARCHITECTURES[spec.name] = spec


def unregister_architecture(name: str) -> None:
    ARCHITECTURES.pop(name, None)


def architecture_names() -> tuple[str, ...]:
    """Every architecture: what can be trained, stored, evaluated and served by name."""
    return tuple(ARCHITECTURES)


def ensemble_members() -> tuple[str, ...]:
    """The architectures of the product's ensemble, served by default."""
    return tuple(name for name, spec in ARCHITECTURES.items() if spec.in_ensemble)


register_architecture(ArchitectureSpec(
    "inceptionv3", "InceptionV3", _inception_v3, scale_to_plus_minus_one, 299, 75, 512, (0.5,), "mixed10"))
# The brief's head: Dense 512 then two Dropouts before the output unit.
register_architecture(ArchitectureSpec(
    "densenet121", "DenseNet-121", _densenet121, imagenet_normalisation, 224, 32, 512, (0.5, 0.3), "relu"))
register_architecture(ArchitectureSpec(
    "mobilenetv2", "MobileNetV2", _mobilenet_v2, scale_to_plus_minus_one, 224, 32, 1024, (0.5,), "out_relu",
    finetune_layers=20))
# The original project's future work; MobileNetV2's head. Not in the ensemble until a trained
# version passes the promotion floors (none has been trained for the release yet).
register_architecture(ArchitectureSpec(
    "efficientnetb0", "EfficientNet-B0", _efficientnet_b0, keep_pixels, 224, 32, 1024, (0.5,), "top_activation",
    finetune_layers=20, in_ensemble=False))
# The quickest to train on a CPU: the default of forms that queue training.
FASTEST_ARCHITECTURE = "mobilenetv2"


def get_spec(name: str) -> ArchitectureSpec:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ModelError(
            f"unknown model {name!r}; choose one of {', '.join(architecture_names())}"
        ) from None


def parse_init(init: str) -> str | None:
    """'imagenet' | 'none' | PATH -> the `weights` argument for keras.applications."""
    if init == "imagenet":
        return "imagenet"
    if init == "none":
        return None
    path = Path(init).expanduser()
    if not path.is_file():
        raise ModelError(
            f"init {init!r} is neither 'imagenet', 'none' nor an existing weights file"
        )
    return str(path)


def build_model(
    name: str,
    init: str = "imagenet",
    input_size: int | None = None,
    *,
    learning_rate: float = 1e-3,
    compile_model: bool = True,
) -> keras.Model:
    """Build (and compile) one architecture with the brief's head.

    init: "imagenet" (download, where reachable), "none" (random) or a path to backbone
    weights saved without the top (for sites without internet).
    """
    spec = get_spec(name)
    size = input_size or spec.input_size
    if size < spec.min_input_size:
        raise ModelError(f"{name} needs an input size of at least {spec.min_input_size}, got {size}")
    weights = parse_init(init)

    import keras

    inputs = keras.Input(shape=(size, size, 3), name=INPUT_NAME, dtype="float32")
    preprocessed = spec.preprocessing(inputs)
    try:
        backbone = spec.backbone(preprocessed, weights)
    except Exception as exc:  # urllib and h5py raise several types for a missing download or file
        if weights == "imagenet":
            raise ModelError(
                "ImageNet weights could not be downloaded "
                f"({type(exc).__name__}); use --init none (random initialisation) or "
                "--init PATH with a local backbone weights file"
            ) from None
        if weights is not None:
            raise ModelError(f"cannot load backbone weights from {weights}: {exc}") from None
        raise
    if weights is None:
        # Keras' backbones use BatchNorm momentum 0.99-0.999, tuned for ImageNet's millions of
        # steps; trained from scratch on a few hundred images the moving statistics would
        # barely move and inference-mode outputs collapse to a constant.
        for layer in backbone.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = SCRATCH_BN_MOMENTUM
    x = keras.layers.GlobalAveragePooling2D(name=f"{HEAD_PREFIX}pool")(backbone.output)
    x = keras.layers.Dense(spec.dense_units, activation="relu", name=f"{HEAD_PREFIX}dense")(x)
    for index, rate in enumerate(spec.dropout_rates):
        x = keras.layers.Dropout(rate, name=f"{HEAD_PREFIX}dropout{index + 1}")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name=OUTPUT_NAME)(x)
    model = keras.Model(inputs, outputs, name=name)
    if compile_model:
        compile_for_training(model, learning_rate=learning_rate)
    return model


def compile_for_training(
    model: keras.Model,
    *,
    learning_rate: float,
    weight_decay: float = 0.0,
    use_ema: bool = False,
    label_smoothing: float = 0.0,
) -> None:
    import keras

    # EMA momentum 0.99: an average over roughly the last 100 steps, four epochs of 425 images.
    optimizer_options: dict[str, Any] = {"learning_rate": learning_rate, "use_ema": use_ema,
                                         "ema_momentum": 0.99}
    optimizer = (keras.optimizers.AdamW(weight_decay=weight_decay, **optimizer_options) if weight_decay > 0
                 else keras.optimizers.Adam(**optimizer_options))
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing),
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")],
    )


def backbone_layers(model: keras.Model) -> list[Any]:
    """Backbone layers in graph order (everything between the input/preprocessing and the head)."""
    return [
        layer
        for layer in model.layers
        if layer.name != INPUT_NAME
        and not layer.name.startswith((PREPROCESSING_PREFIX, HEAD_PREFIX))
        and layer.name != OUTPUT_NAME
    ]


def set_backbone_trainable(model: keras.Model, *, trainable: bool) -> None:
    for layer in backbone_layers(model):
        layer.trainable = trainable


def unfreeze_top(model: keras.Model, n_layers: int) -> int:
    """Make the top `n_layers` backbone layers trainable, keeping BatchNormalization frozen
    (its statistics were learnt on the pre-training data and small batches would wreck them).
    Returns how many layers became trainable."""
    import keras

    layers = backbone_layers(model)
    if not isinstance(n_layers, int) or isinstance(n_layers, bool) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive integer, got {n_layers!r}")
    if n_layers > len(layers):
        raise ValueError(f"the backbone has {len(layers)} layers; cannot unfreeze {n_layers}")
    set_backbone_trainable(model, trainable=False)
    unfrozen = 0
    for layer in layers[-n_layers:]:
        if isinstance(layer, keras.layers.BatchNormalization):
            continue
        layer.trainable = True
        unfrozen += 1
    return unfrozen


def predict_probabilities(model: Any, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """The model's (uncalibrated) probabilities of COVID-19 for a batch of pixels, in chunks."""
    if len(images) == 0:
        return np.zeros((0,), np.float32)
    outputs = [np.asarray(model(images[i:i + batch_size].astype(np.float32), training=False))
               for i in range(0, len(images), batch_size)]
    return np.concatenate(outputs).reshape(-1)


# --- weights in the store ----------------------------------------------------------------------
# float16 keeps 3 significant digits; arrays with larger magnitudes (BatchNorm variances of
# randomly initialised nets can be big) stay float32 so restoring them is exact enough.
FLOAT16_SAFE_MAX = 1.0e4


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


def keras_model_from(card: ModelCard, weights: bytes) -> keras.Model:
    """The architecture named by the card with these (verified) weights restored into it."""
    model = build_model(card.architecture, init="none", input_size=card.input_size, compile_model=False)
    unpack_weights(model, weights)
    return model


def load_keras_model(store: ModelStore, name: str, version: str | None = None) -> tuple[keras.Model, ModelCard]:
    """Build the architecture named by the card and restore verified weights into it."""
    version = version or store.production(name)
    if not version:
        raise StoreError(f"model {name} has no production version in {store.url}")
    card, weights = store.verified_card(name, version)
    return keras_model_from(card, weights), card
