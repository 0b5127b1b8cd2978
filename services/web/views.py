"""HTTP routes: the clinicians' page (`clinic`) and the admins' console (`admin`).

Routes translate HTTP to the plain functions in `uploads`, `inference_client` and `console`
and turn their exceptions into friendly pages; they hold no domain logic.
"""

from __future__ import annotations

import functools
import hmac
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    abort,
    flash,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)

from ctscan.errors import CTScanError, StoreError, UnsupportedImageError
from ctscan.records import EnsembleRecord
from services.web.app import services
from services.web.console import (
    QUEUE_ERRORS,
    STORE_ERRORS,
    form_words,
    input_size_problem,
    job_summary,
    model_overview,
    published_dataset_versions,
)
from services.web.forms import (
    ActionForm,
    LoginForm,
    PredictForm,
    PromoteForm,
    QueueJobForm,
    StudyForm,
    model_labels,
)
from services.web.inference_client import InferenceError
from services.web.study_view import probability_strip
from services.web.uploads import check_upload, png_data_url, preview_data_url

log = logging.getLogger("ctscan.web")

clinic = Blueprint("clinic", __name__)
admin = Blueprint("admin", __name__, url_prefix="/admin")

RouteResult = Any
F = TypeVar("F", bound=Callable[..., RouteResult])


# --- clinicians ---------------------------------------------------------------------------
def render_index(*, form: PredictForm | None = None, result: dict[str, Any] | None = None,
                 error: str | None = None, status: int = 200) -> tuple[str, int]:
    # formdata=None: this also renders the "too large" page, where the body must not be read.
    form = form or PredictForm(formdata=None)
    return render_template("index.html", form=form, result=result, error=error,
                           model_labels=model_labels()), status


@clinic.get("/")
def index() -> RouteResult:
    return render_index()


@clinic.get("/predict")
def predict_page() -> RouteResult:
    # A bookmarked or refreshed result page: results are never kept, so start afresh.
    return redirect(url_for("clinic.index"))


@clinic.post("/predict")
def predict() -> RouteResult:
    form = PredictForm()
    if not form.validate_on_submit():
        message = next(iter(form.file.errors or form.model.errors or ["Please check the form."]))
        return render_index(form=form, error=str(message), status=400)
    if (request.content_length or 0) > services().settings.max_upload_bytes:
        limit = services().settings.max_upload_mb
        return render_index(form=form, error=f"This file is larger than the {limit:g} MB limit. Please "
                                             "upload a single CT slice (PNG, JPEG or DICOM).", status=413)
    data = form.file.data.read()
    try:
        upload = check_upload(data=data)
    except UnsupportedImageError as exc:
        return render_index(form=form, error=str(exc), status=415)
    started = time.perf_counter()
    try:
        answer = services().inference.predict(data=upload.data, filename=upload.neutral_filename,
                                              model=form.model.data, explain=form.explain.data)
    except InferenceError as exc:
        log.warning("prediction failed: %s (%s)", type(exc).__name__, exc.status)
        return render_index(form=form, error=str(exc), status=exc.status)
    round_trip_ms = (time.perf_counter() - started) * 1000
    # Only identifiers and timings are logged; never the image, its name or DICOM tags.
    log.info("prediction request_id=%s model=%s version=%s format=%s round_trip_ms=%.0f",
             answer.request_id, answer.model, answer.model_version, upload.source_format, round_trip_ms)
    result = {**answer.model_dump(), "preview_url": preview_data_url(upload),
              "heatmap_url": png_data_url(answer.heatmap_png_base64),
              "round_trip_ms": round_trip_ms, "source_format": upload.source_format,
              "explain_requested": bool(form.explain.data)}
    return render_index(form=form, result=result)


def render_study(*, form: StudyForm | None = None, result: dict[str, Any] | None = None,
                 error: str | None = None, status: int = 200) -> tuple[str, int]:
    form = form or StudyForm(formdata=None)
    return render_template("study.html", form=form, result=result, error=error,
                           model_labels=model_labels()), status


@clinic.get("/study")
def study_page() -> RouteResult:
    return render_study()


@clinic.post("/study")
def study() -> RouteResult:
    form = StudyForm()
    if not form.validate_on_submit():
        message = next(iter(form.files.errors or form.model.errors or ["Please check the form."]))
        return render_study(form=form, error=str(message), status=400)
    files = [storage.read() for storage in form.files.data if storage and storage.filename]
    files = [data for data in files if data]
    if not files:
        return render_study(form=form, error="Please choose the slices of one series, or a ZIP of it.", status=400)
    limit = services().settings.max_study_files
    if len(files) > limit:
        return render_study(form=form, error=f"{len(files)} files were sent; at most {limit} slices per study.",
                            status=413)
    started = time.perf_counter()
    try:
        answer = services().inference.predict_study(files=files, model=form.model.data, explain=form.explain.data)
    except InferenceError as exc:
        log.warning("study prediction failed: %s (%s)", type(exc).__name__, exc.status)
        return render_study(form=form, error=str(exc), status=exc.status)
    round_trip_ms = (time.perf_counter() - started) * 1000
    # Only identifiers, counts and timings are logged; never the images, names or DICOM tags.
    log.info("study request_id=%s model=%s slices=%d outcome=%s round_trip_ms=%.0f",
             answer.request_id, answer.model, answer.slice_count, answer.outcome, round_trip_ms)
    result = {**answer.model_dump(), "round_trip_ms": round_trip_ms,
              "strip": probability_strip(answer.slices, threshold=answer.threshold),
              "top": [{**top.model_dump(), "heatmap_url": png_data_url(top.heatmap_png_base64)}
                      for top in answer.top_slices]}
    return render_study(form=form, result=result)


@clinic.get("/healthz")
def healthz() -> RouteResult:
    # Liveness of the web process only: a slow inference service must not get it restarted.
    return jsonify({"status": "ok"})


# --- admins -------------------------------------------------------------------------------
def _is_admin() -> bool:
    return bool(session.get("admin"))


def admin_required(view: F) -> F:
    """GET pages redirect to the login; anything else (actions, polling) answers 401."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> RouteResult:
        if not _is_admin():
            if request.method == "GET" and not request.path.endswith("/jobs/table"):
                return redirect(url_for("admin.login", next=request.path))
            abort(401)
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]




def _safe_next(target: str | None) -> str:
    # Only local console paths: never redirect a logged-in admin to another site.
    if target and target.startswith("/admin") and not urlsplit(target).netloc and "//" not in target:
        return target
    return url_for("admin.console")


@admin.route("/login", methods=["GET", "POST"])
def login() -> RouteResult:
    form = LoginForm()
    if request.method == "GET":
        form.next.data = request.args.get("next", "")
        return render_template("login.html", form=form, error=None)
    address = request.remote_addr or "unknown"
    if services().login_throttle.blocked(address):
        return render_template("login.html", form=form,
                               error="Too many failed attempts. Please wait a few minutes."), 429
    if not form.validate_on_submit():
        return render_template("login.html", form=form, error="Please enter the password."), 400
    expected = services().settings.admin_password.get_secret_value()
    if not hmac.compare_digest(form.password.data.encode(), expected.encode()):
        services().login_throttle.fail(address)
        log.warning("admin login refused from %s", address)
        return render_template("login.html", form=form, error="That password is not correct."), 401
    services().login_throttle.clear(address)
    session.clear()  # a fresh session on login: no fixation of an earlier cookie
    session["admin"] = True
    session.permanent = True
    return redirect(_safe_next(form.next.data))


@admin.post("/logout")
def logout() -> RouteResult:
    # CSRFProtect has already checked the token before this runs.
    session.clear()
    flash("You have been logged out.", "info")
    return redirect(url_for("admin.login"))


def _jobs_view() -> tuple[list[dict[str, Any]], str | None]:
    try:
        jobs = services().jobs().list_jobs(limit=50)
    except CTScanError as exc:
        return [], str(exc)
    except QUEUE_ERRORS as exc:  # the queue (Redis) may be down; the console must still load
        log.warning("listing jobs failed: %s", type(exc).__name__)
        return [], "The training queue cannot be reached right now."
    return [job_summary(job) for job in jobs], None


def _models_view() -> tuple[list[dict[str, Any]], EnsembleRecord | None, str | None]:
    try:
        store = services().store()
        return model_overview(store), store.ensemble_record(), None
    except CTScanError as exc:
        return [], None, str(exc)
    except STORE_ERRORS as exc:  # an unreachable S3 store must not take the console down
        log.warning("reading the model store failed: %s", type(exc).__name__)
        return [], None, "The model store cannot be read right now."


@admin.get("/")  # registered second: url_for builds "/admin"
@admin.get("")
@admin_required
def console() -> RouteResult:
    settings = services().settings
    dataset_versions = published_dataset_versions(datasets_url=settings.store.datasets_url,
                                                  dataset=settings.default_dataset)
    default_version = settings.default_dataset_version or (dataset_versions[-1] if dataset_versions else "")
    queue_form = QueueJobForm(formdata=None, dataset=settings.default_dataset, dataset_version=default_version)
    jobs, jobs_error = _jobs_view()
    models, ensemble, models_error = _models_view()
    production = {m["name"]: m["production"] for m in models if m["production"]}
    stale = production if ensemble is not None and production and ensemble.members != production else None
    return render_template(
        "admin.html", queue_form=queue_form, action_form=ActionForm(), jobs=jobs, jobs_error=jobs_error,
        dataset_versions=dataset_versions,
        models=models, ensemble=ensemble, ensemble_stale=stale, models_error=models_error,
        can_queue=settings.admin.token() is not None,
    )


@admin.get("/jobs/table")
@admin_required
def jobs_table() -> RouteResult:
    """The jobs table alone, for the page's polling script."""
    jobs, jobs_error = _jobs_view()
    return render_template("_jobs_table.html", jobs=jobs, jobs_error=jobs_error, action_form=ActionForm())


def _trainer_token() -> str | None:
    return services().settings.admin.token()


@admin.post("/jobs")
@admin_required
def queue_job() -> RouteResult:
    form = QueueJobForm()
    if not form.validate_on_submit():
        problems = "; ".join(f"{form[name].label.text}: {errors[0]}" for name, errors in form.errors.items())
        flash(f"The job was not queued. {problems}", "error")
        return redirect(url_for("admin.console"))
    token = _trainer_token()
    if token is None:
        flash("Queueing is not configured: CTSCAN_ADMIN_TOKEN is not set for the web service.", "error")
        return redirect(url_for("admin.console"))
    problem = input_size_problem(model=form.model.data, input_size=form.input_size.data)
    if problem:
        flash(f"The job was not queued. {problem}", "error")
        return redirect(url_for("admin.console"))
    hyperparameters: dict[str, Any] = {}
    if form.input_size.data:
        hyperparameters["input_size"] = form.input_size.data
    if form.batch_size.data:
        hyperparameters["batch_size"] = form.batch_size.data
    if form.learning_rate.data:
        hyperparameters["learning_rate"] = form.learning_rate.data
    try:
        job = services().jobs().submit(
            model=form.model.data, dataset=form.dataset.data, dataset_version=form.dataset_version.data,
            init=form.init.data, epochs=form.epochs.data, hyperparameters=hyperparameters, admin_token=token)
    except CTScanError as exc:
        flash(f"The job was not queued: {form_words(str(exc))}", "error")
    except QUEUE_ERRORS as exc:
        log.warning("queueing a job failed: %s", type(exc).__name__)
        flash("The job was not queued: the training queue cannot be reached right now.", "error")
    else:
        flash(f"Queued job {job.id} ({form.model.data}, {form.epochs.data} epochs).", "success")
    return redirect(url_for("admin.console"))


@admin.post("/jobs/<job_id>/cancel")
@admin_required
def cancel_job(job_id: str) -> RouteResult:
    token = _trainer_token()
    if token is None:
        flash("Cancelling is not configured: CTSCAN_ADMIN_TOKEN is not set for the web service.", "error")
        return redirect(url_for("admin.console"))
    try:
        job = services().jobs().cancel(job_id, admin_token=token)
    except CTScanError as exc:
        flash(f"Job {job_id} was not cancelled: {exc}", "error")
    except QUEUE_ERRORS as exc:
        log.warning("cancelling a job failed: %s", type(exc).__name__)
        flash("The job was not cancelled: the training queue cannot be reached right now.", "error")
    else:
        flash(f"Job {job_id} is {job.state}.", "success")
    return redirect(url_for("admin.console"))


@admin.post("/models/<name>/promote")
@admin_required
def promote(name: str) -> RouteResult:
    form = PromoteForm()
    if not form.validate_on_submit():
        flash("Promotion refused: no valid version was given.", "error")
        return redirect(url_for("admin.console"))
    try:
        services().store().promote(name, form.version.data, reason="promoted from the web console")
    except StoreError as exc:
        flash(f"Promotion refused: {exc}", "error")
    else:
        log.info("admin promoted %s %s", name, form.version.data)
        flash(f"{name}: production is now {form.version.data}. The inference service picks it "
              "up when it reloads its models.", "success")
    return redirect(url_for("admin.console"))


@admin.post("/models/<name>/rollback")
@admin_required
def rollback(name: str) -> RouteResult:
    try:
        version = services().store().rollback(name)
    except StoreError as exc:
        flash(f"Rollback refused: {exc}", "error")
    else:
        log.info("admin rolled back %s to %s", name, version)
        flash(f"{name}: production rolled back to {version}.", "success")
    return redirect(url_for("admin.console"))
