"""The hyper-parameters a training job may set: one pydantic model for the CLI, the web
console and the worker, so a bad value is refused at submit with the same message everywhere
(and the worker refuses a record that bypassed the submit check).

A job's record keeps only what was given (`checked_hyperparameters` returns the given keys);
`TrainConfig` supplies the defaults. Input size is bounded by the architecture's minimum and
by `MAX_INPUT_SIZE` (the data are held in memory as float32 arrays: 512 px already takes
3 MB per slice), and the estimated memory of the decoded data set must fit the per-job limit.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, model_validator

from ctscan.errors import CTScanError

MAX_INPUT_SIZE = 512
StrictBool = Annotated[bool, Strict()]
# Numbers: ints and floats are accepted, strings ("abc", "1e-3") are not; the CLI parses
# NAME=VALUE as JSON, so `--hp learning_rate=0.001` arrives as a float.
Number = Annotated[float, Field(allow_inf_nan=False)]


class HyperParameterError(CTScanError):
    """A hyper-parameter that is unknown, of the wrong type or out of range."""


class HyperParameters(BaseModel):
    """Every field may be left out (None = `TrainConfig`'s default)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    input_size: int | None = None  # bounds depend on the architecture: checked_hyperparameters
    finetune_epochs: int | None = Field(default=None, ge=1, le=1000)
    batch_size: int | None = Field(default=None, ge=1, le=512)
    learning_rate: Number | None = Field(default=None, gt=0, le=1)
    finetune_learning_rate: Number | None = Field(default=None, gt=0, le=1)
    patience: int | None = Field(default=None, ge=1, le=1000)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    threshold_rule: Literal["youden", "f1", "accuracy"] | None = None
    limit_per_class: int | None = Field(default=None, ge=1)
    augment: StrictBool | None = None
    preprocessing: str | None = None
    augmentation: Literal["basic", "domain", "lesion"] | None = None
    mixup: Number | None = Field(default=None, ge=0, le=1)
    ema: StrictBool | None = None
    label_smoothing: Number | None = Field(default=None, ge=0, le=0.3)
    weight_decay: Number | None = Field(default=None, ge=0, le=1)
    source_variants: int | None = Field(default=None, ge=1, le=16)
    swa_epochs: int | None = Field(default=None, ge=0, le=1000)
    input_gate: StrictBool | None = None
    anatomy_balance: StrictBool | None = None
    source_weights: dict[str, Annotated[float, Field(gt=0, le=100)]] | None = None

    @model_validator(mode="after")
    def _known_preprocessing(self) -> HyperParameters:
        if self.preprocessing is not None:
            from ctscan.imaging.preprocessing import PREPROCESSORS

            if self.preprocessing not in PREPROCESSORS:
                raise ValueError(f"preprocessing must be one of {', '.join(PREPROCESSORS)}, "
                                 f"got {self.preprocessing!r}")
        return self

    def given(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"]) or "hyper-parameters"
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            allowed = ", ".join(HyperParameters.model_fields)
            problems.append(f"unknown hyper-parameter {name}; allowed: {allowed}")
        elif error["loc"]:
            problems.append(f"hyper-parameter {name}: {message} (got {error['input']!r})")
        else:
            problems.append(message)
    return "; ".join(problems)


def checked_hyperparameters(*, model: str, epochs: int, values: Any,
                            max_input_size: int = MAX_INPUT_SIZE) -> dict[str, Any]:
    """The given hyper-parameters, checked against the model and the epochs; raises
    HyperParameterError naming each bad value."""
    from ctscan.models import get_spec  # plain data, no TensorFlow

    if not isinstance(epochs, int) or isinstance(epochs, bool) or not 1 <= epochs <= 1000:
        raise HyperParameterError(f"epochs must be a whole number in 1..1000, got {epochs!r}")
    if not isinstance(values, dict):
        raise HyperParameterError("hyperparameters must be a mapping of name to value")
    # JSON numbers: an int is a fine float (learning_rate=1 is 1.0), never the other way round.
    try:
        checked = _validate(values)
    except ValidationError as exc:
        raise HyperParameterError(_describe(exc)) from None
    spec = get_spec(model)
    size = checked.input_size
    if size is not None and not spec.min_input_size <= size <= max_input_size:
        raise HyperParameterError(f"hyper-parameter input_size: {model} takes {spec.min_input_size}.."
                                  f"{max_input_size} pixels, got {size}")
    if checked.swa_epochs is not None and checked.swa_epochs > epochs:
        raise HyperParameterError(f"hyper-parameter swa_epochs: at most epochs ({epochs}), got {checked.swa_epochs}")
    return checked.given()


def _validate(values: dict[str, Any]) -> HyperParameters:
    # Strict mode refuses "0.001" for a float and 1.5 for an int, but would also refuse an int
    # for a float field: widen ints to floats for the float fields first.
    floats = {name for name, field in HyperParameters.model_fields.items()
              if field.annotation is not None and "float" in str(field.annotation)}
    widened = {name: float(value) if name in floats and type(value) is int else value
               for name, value in values.items()}
    return HyperParameters.model_validate(widened)


def estimated_data_bytes(*, images: int, input_size: int, variants: int = 1) -> int:
    """Memory of the decoded data set: float32 RGB arrays of every train and val slice."""
    return images * max(variants, 1) * input_size * input_size * 3 * 4
