"""Forms of the web service. Every form carries a CSRF token (Flask-WTF)."""

from __future__ import annotations

from flask_wtf import FlaskForm  # type: ignore[import-untyped]
from flask_wtf.file import FileField, FileRequired  # type: ignore[import-untyped]
from wtforms import (  # type: ignore[import-untyped]
    BooleanField,
    FloatField,
    HiddenField,
    IntegerField,
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

from services.web.console import MODEL_NAMES

MODEL_LABELS = {
    "ensemble": "Ensemble (all three models)",
    "inceptionv3": "InceptionV3",
    "densenet121": "DenseNet-121",
    "mobilenetv2": "MobileNetV2",
}
# Small enough for a few minutes per epoch on two CPU cores (InceptionV3 needs at least 75).
DEFAULT_INPUT_SIZE = 64
_SAFE_NAME = Regexp(r"^[A-Za-z0-9._-]+$", message="Use letters, digits, dots, dashes or underscores.")


class PredictForm(FlaskForm):
    file = FileField("CT image", validators=[FileRequired("Please choose a CT image to upload.")])
    model = SelectField("Model", choices=[SelectChoice(n, label) for n, label in MODEL_LABELS.items()],
                        default="ensemble")
    explain = BooleanField("Show the Grad-CAM heatmap", default=True)


class LoginForm(FlaskForm):
    password = PasswordField("Admin password", validators=[DataRequired("Please enter the password.")])
    next = HiddenField()


class QueueJobForm(FlaskForm):
    # Defaults that finish on a CPU-only machine without internet: MobileNetV2 (the fastest),
    # random initialisation (ImageNet weights need a download) and a small input size.
    model = SelectField("Model", choices=[SelectChoice(n, MODEL_LABELS[n]) for n in MODEL_NAMES],
                        default="mobilenetv2")
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
