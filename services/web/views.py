"""HTTP routes: the clinicians' page (`clinic`) and the admins' console (`admin`).

Routes translate HTTP to the plain functions in `uploads`, `inference_client` and `console`
and turn their exceptions into friendly pages; they hold no domain logic. Who may call them
is stated on each route (`@allow`) and checked before it runs (`access_views.guard`); every
prediction sent and every admin action is written to the audit trail (`access_views.audit`).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from flask import Blueprint, flash, redirect, render_template, request, url_for

from ctscan.access.audit_trail import upload_digest
from ctscan.errors import CTScanError, StoreError, UnsupportedImageError
from ctscan.models import ENSEMBLE, FASTEST_ARCHITECTURE
from ctscan.storage.records import EnsembleRecord
from services.web.access_views import audit, current_name
from services.web.auth import Access, Body, allow
from services.web.console import (
    QUEUE_ERRORS,
    STORE_ERRORS,
    ensemble_behind,
    form_words,
    input_size_problem,
    job_summary,
    model_overview,
    promotion_consequences,
    published_dataset_versions,
)
from services.web.extensions import services
from services.web.forms import (
    ActionForm,
    PredictForm,
    PromoteForm,
    QueueJobForm,
    StudyForm,
    model_labels,
)
from services.web.inference_client import EnsembleUnavailableError, InferenceError
from services.web.study_view import probability_strip
from services.web.uploads import (
    FOOTER_STORAGE_NOTE,
    STUDY_STORAGE_NOTE,
    UPLOAD_STORAGE_NOTE,
    check_upload,
    png_data_url,
    preview_data_url,
)

log = logging.getLogger("ctscan.web")

clinic = Blueprint("clinic", __name__)
admin = Blueprint("admin", __name__, url_prefix="/admin")

RouteResult = Any


# Every route states its access (and its body, when it takes files) where it is declared;
# one that states nothing is refused to everyone (access_views.guard).


@clinic.app_context_processor
def _page_words() -> dict[str, Any]:
    return {"upload_storage_note": UPLOAD_STORAGE_NOTE, "study_storage_note": STUDY_STORAGE_NOTE,
            "footer_storage_note": FOOTER_STORAGE_NOTE}


@clinic.app_template_filter("label_of")
def _label_of(name: str) -> str:
    """A model's name as people read it ("DenseNet-121")."""
    return model_labels().get(name, name)


def new_request_id() -> str:
    # Sent to the inference service as X-Request-ID, which it keeps as client_request_id
    # beside its own id; the page's event names that one (service_request_id).
    return uuid.uuid4().hex


def echo(answered: str, sent: str) -> dict[str, str]:
    # The service mints its own id of each request; the page's event names it beside the page's.
    return {} if answered == sent else {"service_request_id": answered}


# --- clinicians ---------------------------------------------------------------------------
def single_models() -> dict[str, str]:
    """The models that answer while the ensemble is switched off, as the page names them."""
    return {name: label for name, label in model_labels().items() if name != ENSEMBLE}


def offer_single_models(form: PredictForm | StudyForm) -> None:
    """The ensemble is off: the form comes back with a single model chosen."""
    form.model.data = FASTEST_ARCHITECTURE


def render_index(*, form: PredictForm | None = None, result: dict[str, Any] | None = None,
                 error: str | None = None, status: int = 200, ensemble_off: bool = False) -> tuple[str, int]:
    # formdata=None: this also renders the "too large" page, where the body must not be read.
    form = form or PredictForm(formdata=None)
    return render_template("index.html", form=form, result=result, error=error, ensemble_off=ensemble_off,
                           single_models=single_models(), model_labels=model_labels()), status


@clinic.get("/")
@allow(Access.CLINICIAN)
def index() -> RouteResult:
    return render_index()


@clinic.get("/predict")
@allow(Access.CLINICIAN)
def predict_page() -> RouteResult:
    # A bookmarked or refreshed result page: results are never kept, so start afresh.
    return redirect(url_for("clinic.index"))


@clinic.post("/predict")
@allow(Access.CLINICIAN, body=Body.UPLOAD)
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
    request_id, sha256 = new_request_id(), upload_digest([upload.data])
    started = time.perf_counter()
    try:
        answer = services().inference.predict(data=upload.data, filename=upload.neutral_filename,
                                              model=form.model.data, explain=form.explain.data,
                                              request_id=request_id, user=current_name())
    except InferenceError as exc:
        log.warning("prediction failed: request_id=%s %s (%s)", request_id, type(exc).__name__, exc.status)
        audit(action="predict", outcome=exc.outcome, request_id=request_id, model=form.model.data,
              upload_sha256=sha256, status=exc.status)
        ensemble_off = isinstance(exc, EnsembleUnavailableError)
        if ensemble_off:
            offer_single_models(form)
        return render_index(form=form, error=str(exc), status=exc.status, ensemble_off=ensemble_off)
    round_trip_ms = (time.perf_counter() - started) * 1000
    audit(action="predict", outcome=answer.outcome, request_id=request_id, model=answer.model,
          model_version=answer.model_version, upload_sha256=sha256, status=200,
          detail=echo(answer.request_id, request_id))
    # Only identifiers and timings are logged; never the image, its name or DICOM tags.
    log.info("prediction request_id=%s model=%s version=%s format=%s round_trip_ms=%.0f",
             answer.request_id, answer.model, answer.model_version, upload.source_format, round_trip_ms)
    result = {**answer.model_dump(), "preview_url": preview_data_url(upload),
              "heatmap_url": png_data_url(answer.heatmap_png_base64),
              "round_trip_ms": round_trip_ms, "source_format": upload.source_format,
              "explain_requested": bool(form.explain.data)}
    return render_index(form=form, result=result)


def render_study(*, form: StudyForm | None = None, result: dict[str, Any] | None = None,
                 error: str | None = None, status: int = 200, ensemble_off: bool = False) -> tuple[str, int]:
    form = form or StudyForm(formdata=None)
    return render_template("study.html", form=form, result=result, error=error, ensemble_off=ensemble_off,
                           single_models=single_models(), model_labels=model_labels()), status


@clinic.get("/study")
@allow(Access.CLINICIAN)
def study_page() -> RouteResult:
    return render_study()


@clinic.post("/study")
@allow(Access.CLINICIAN, body=Body.STUDY)
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
    request_id, sha256 = new_request_id(), upload_digest(files)
    started = time.perf_counter()
    try:
        answer = services().inference.predict_study(files=files, model=form.model.data, explain=form.explain.data,
                                                    request_id=request_id, user=current_name())
    except InferenceError as exc:
        log.warning("study prediction failed: request_id=%s %s (%s)", request_id, type(exc).__name__, exc.status)
        audit(action="predict_study", outcome=exc.outcome, request_id=request_id, model=form.model.data,
              upload_sha256=sha256, status=exc.status, detail={"files": len(files)})
        ensemble_off = isinstance(exc, EnsembleUnavailableError)
        if ensemble_off:
            offer_single_models(form)
        return render_study(form=form, error=str(exc), status=exc.status, ensemble_off=ensemble_off)
    round_trip_ms = (time.perf_counter() - started) * 1000
    audit(action="predict_study", outcome=answer.outcome, request_id=request_id, model=answer.model,
          model_version=answer.model_version, upload_sha256=sha256, status=200,
          detail={"files": len(files), "slices": answer.slice_count, **echo(answer.request_id, request_id)})
    # Only identifiers, counts and timings are logged; never the images, names or DICOM tags.
    log.info("study request_id=%s model=%s slices=%d outcome=%s round_trip_ms=%.0f",
             answer.request_id, answer.model, answer.slice_count, answer.outcome, round_trip_ms)
    result = {**answer.model_dump(), "round_trip_ms": round_trip_ms,
              "strip": probability_strip(answer.slices, threshold=answer.threshold),
              "top": [{**top.model_dump(), "heatmap_url": png_data_url(top.heatmap_png_base64)}
                      for top in answer.top_slices]}
    return render_study(form=form, result=result)


# --- admins -------------------------------------------------------------------------------
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
@allow(Access.ADMIN)
def console() -> RouteResult:
    settings = services().settings
    dataset_versions = published_dataset_versions(datasets_url=settings.store.datasets_url,
                                                  dataset=settings.default_dataset)
    default_version = settings.default_dataset_version or (dataset_versions[-1] if dataset_versions else "")
    queue_form = QueueJobForm(formdata=None, dataset=settings.default_dataset, dataset_version=default_version)
    jobs, jobs_error = _jobs_view()
    models, ensemble, models_error = _models_view()
    production = {m["name"]: m["production"] for m in models if m["production"]}
    return render_template(
        "admin.html", queue_form=queue_form, action_form=ActionForm(), jobs=jobs, jobs_error=jobs_error,
        dataset_versions=dataset_versions,
        models=models, ensemble=ensemble, ensemble_behind=ensemble_behind(ensemble, production),
        models_error=models_error,
        can_queue=settings.admin.token() is not None,
    )


@admin.get("/jobs/table")
@allow(Access.ADMIN)
def jobs_table() -> RouteResult:
    """The jobs table alone, for the page's polling script."""
    jobs, jobs_error = _jobs_view()
    return render_template("_jobs_table.html", jobs=jobs, jobs_error=jobs_error, action_form=ActionForm())


def _trainer_token() -> str | None:
    return services().settings.admin.token()


@admin.post("/jobs")
@allow(Access.ADMIN)
def queue_job() -> RouteResult:
    form = QueueJobForm()
    if not form.validate_on_submit():
        problems = "; ".join(f"{form[name].label.text}: {errors[0]}" for name, errors in form.errors.items())
        audit(action="job_queue", outcome="refused", status=302, detail={"reason": "invalid form"})
        flash(f"The job was not queued. {problems}", "error")
        return redirect(url_for("admin.console"))
    job_detail = {"dataset": form.dataset.data, "dataset_version": form.dataset_version.data,
                  "epochs": form.epochs.data, "init": form.init.data}
    token = _trainer_token()
    if token is None:
        audit(action="job_queue", outcome="refused", model=form.model.data, status=302,
              detail={**job_detail, "reason": "CTSCAN_ADMIN_TOKEN is not set"})
        flash("Queueing is not configured: CTSCAN_ADMIN_TOKEN is not set for the web service.", "error")
        return redirect(url_for("admin.console"))
    problem = input_size_problem(model=form.model.data, input_size=form.input_size.data)
    if problem:
        audit(action="job_queue", outcome="refused", model=form.model.data, status=302,
              detail={**job_detail, "reason": problem})
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
        audit(action="job_queue", outcome="refused", model=form.model.data, status=302,
              detail={**job_detail, "reason": str(exc)})
        flash(f"The job was not queued: {form_words(str(exc))}", "error")
    except QUEUE_ERRORS as exc:
        log.warning("queueing a job failed: %s", type(exc).__name__)
        audit(action="job_queue", outcome="error", model=form.model.data, status=302,
              detail={**job_detail, "reason": type(exc).__name__})
        flash("The job was not queued: the training queue cannot be reached right now.", "error")
    else:
        audit(action="job_queue", outcome="ok", model=form.model.data, status=302,
              detail={**job_detail, "job_id": job.id})
        flash(f"Queued job {job.id} ({form.model.data}, {form.epochs.data} epochs).", "success")
    return redirect(url_for("admin.console"))


@admin.post("/jobs/<job_id>/cancel")
@allow(Access.ADMIN)
def cancel_job(job_id: str) -> RouteResult:
    token = _trainer_token()
    if token is None:
        audit(action="job_cancel", outcome="refused", status=302,
              detail={"job_id": job_id, "reason": "CTSCAN_ADMIN_TOKEN is not set"})
        flash("Cancelling is not configured: CTSCAN_ADMIN_TOKEN is not set for the web service.", "error")
        return redirect(url_for("admin.console"))
    try:
        job = services().jobs().cancel(job_id, admin_token=token)
    except CTScanError as exc:
        audit(action="job_cancel", outcome="refused", status=302, detail={"job_id": job_id, "reason": str(exc)})
        flash(f"Job {job_id} was not cancelled: {exc}", "error")
    except QUEUE_ERRORS as exc:
        log.warning("cancelling a job failed: %s", type(exc).__name__)
        audit(action="job_cancel", outcome="error", status=302,
              detail={"job_id": job_id, "reason": type(exc).__name__})
        flash("The job was not cancelled: the training queue cannot be reached right now.", "error")
    else:
        audit(action="job_cancel", outcome="ok", model=job.model, status=302,
              detail={"job_id": job_id, "state": job.state})
        flash(f"Job {job_id} is {job.state}.", "success")
    return redirect(url_for("admin.console"))


@admin.post("/models/<name>/promote")
@allow(Access.ADMIN)
def promote(name: str) -> RouteResult:
    form = PromoteForm()
    if not form.validate_on_submit():
        audit(action="promote", outcome="refused", model=name[:100], status=302,
              detail={"reason": "no valid version"})
        flash("Promotion refused: no valid version was given.", "error")
        return redirect(url_for("admin.console"))
    version = form.version.data
    if form.confirm.data != "yes":
        # First the consequences, then the change: the confirmation page posts back with confirm=yes.
        try:
            consequences = promotion_consequences(services().store(), name, version)
        except StoreError as exc:
            audit(action="promote", outcome="refused", model=name[:100], model_version=version, status=302,
                  detail={"reason": str(exc)})
            flash(f"Promotion refused: {exc}", "error")
            return redirect(url_for("admin.console"))
        return render_template("promote_confirm.html", name=name, version=version, consequences=consequences,
                               form=PromoteForm(formdata=None, version=version, confirm="yes"))
    try:
        services().store().promote(name, version, reason=f"promoted from the web console by {current_name()}")
    except StoreError as exc:
        audit(action="promote", outcome="refused", model=name[:100], model_version=version, status=302,
              detail={"reason": str(exc)})
        flash(f"Promotion refused: {exc}", "error")
    else:
        log.info("%s promoted %s %s", current_name(), name, version)
        audit(action="promote", outcome="ok", model=name, model_version=version, status=302)
        flash(f"{name}: production is now {version}. The inference service picks it "
              "up when it reloads its models.", "success")
    return redirect(url_for("admin.console"))


@admin.post("/models/<name>/rollback")
@allow(Access.ADMIN)
def rollback(name: str) -> RouteResult:
    try:
        version = services().store().rollback(name)
    except StoreError as exc:
        audit(action="rollback", outcome="refused", model=name[:100], status=302, detail={"reason": str(exc)})
        flash(f"Rollback refused: {exc}", "error")
    else:
        log.info("%s rolled back %s to %s", current_name(), name, version)
        audit(action="rollback", outcome="ok", model=name, model_version=version, status=302)
        flash(f"{name}: production rolled back to {version}.", "success")
    return redirect(url_for("admin.console"))
