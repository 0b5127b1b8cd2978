"""Forms of the web service. Every form carries a CSRF token (Flask-WTF)."""

from __future__ import annotations

from flask_wtf import FlaskForm  # type: ignore[import-untyped]
from flask_wtf.file import FileField, FileRequired  # type: ignore[import-untyped]
from wtforms import (  # type: ignore[import-untyped]
    BooleanField,
    FloatField,
    HiddenField,
    IntegerField,
    MultipleFileField,
    PasswordField,
    SelectChoice,
    SelectField,
    StringField,
)
from wtforms.validators import (  # type: ignore[import-untyped]
    DataRequired,
    Length,
    NumberRange,
    Optional,
    Regexp,
)

from ctscan.models import ARCHITECTURES, FASTEST_ARCHITECTURE, architecture_names, ensemble_members


def model_labels() -> dict[str, str]:
    """"ensemble" and every architecture, as the page names them (from the registry). The
    ensemble combines the members its calibration pins, which may be fewer than the models
    offered, so its label names no count; each answer lists the members it combined."""
    return {"ensemble": "Calibrated ensemble",
            **{name: spec.label for name, spec in ARCHITECTURES.items()}}


def prediction_choices() -> list[SelectChoice]:
    """What a clinician may ask for: the ensemble and its members (the models served by
    default); the console's training form offers every architecture."""
    labels = model_labels()
    return [SelectChoice(name, labels[name]) for name in ("ensemble", *ensemble_members())]


# Small enough for a few minutes per epoch on two CPU cores (InceptionV3 needs at least 75).
DEFAULT_INPUT_SIZE = 64
_SAFE_NAME = Regexp(r"^[A-Za-z0-9._-]+$", message="Use letters, digits, dots, dashes or underscores.")


class PredictForm(FlaskForm):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.model.choices = prediction_choices()

    file = FileField("CT image", validators=[FileRequired("Please choose a CT image to upload.")])
    model = SelectField("Model", default="ensemble")
    explain = BooleanField("Show the Grad-CAM heatmap", default=True)


class StudyForm(FlaskForm):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.model.choices = prediction_choices()

    files = MultipleFileField("The slices of one series, or one ZIP of it",
                              validators=[DataRequired("Please choose the slices of one series, or a ZIP of it.")])
    model = SelectField("Model", default="ensemble")
    explain = BooleanField("Show Grad-CAM heatmaps of the most suspicious slices", default=True)


class LoginForm(FlaskForm):
    username = StringField("User name", validators=[DataRequired("Please enter your user name."), Length(max=64)])
    password = PasswordField("Password", validators=[DataRequired("Please enter the password."), Length(max=1024)])
    next = HiddenField()


class QueueJobForm(FlaskForm):
    # Defaults that finish on a CPU-only machine without internet: MobileNetV2 (the fastest),
    # random initialisation (ImageNet weights need a download) and a small input size.
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        labels = model_labels()
        self.model.choices = [SelectChoice(n, labels[n]) for n in architecture_names()]

    model = SelectField("Model", default=FASTEST_ARCHITECTURE)
    dataset = StringField("Dataset", validators=[DataRequired(), Length(max=100), _SAFE_NAME])
    dataset_version = StringField("Dataset version", validators=[DataRequired(), Length(max=100), _SAFE_NAME])
    init = SelectField("Initial weights", choices=[SelectChoice("imagenet", "ImageNet weights"),
                                                   SelectChoice("none", "None (from scratch)")], default="none")
    input_size = IntegerField("Input size (pixels)", default=DEFAULT_INPUT_SIZE,
                              validators=[Optional(), NumberRange(min=32, max=512)])
    epochs = IntegerField("Epochs", default=5, validators=[DataRequired(), NumberRange(min=1, max=200)])
    batch_size = IntegerField("Batch size", default=16, validators=[Optional(), NumberRange(min=1, max=256)])
    learning_rate = FloatField("Learning rate", default=0.001,
                               validators=[Optional(), NumberRange(min=1e-7, max=1.0)])


class ActionForm(FlaskForm):
    """A button that changes something (cancel, rollback, log out): only the CSRF token."""


class PromoteForm(FlaskForm):
    version = HiddenField(validators=[DataRequired(), Length(max=100), _SAFE_NAME])
    # "yes" only from the confirmation page, which names what the promotion changes.
    confirm = HiddenField(validators=[Optional(), Length(max=3)])
