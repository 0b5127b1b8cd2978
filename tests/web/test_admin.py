"""The admins' console through Flask's test client, with the trainer's real JobsClient on
the machine's Redis (a queue of our own; no worker needed to queue) and a real local store."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from ctscan.access.admin_credential import AdminVerifier
from ctscan.storage.records import JobProgress, JobRecord
from ctscan.storage.store import ModelStore, open_store
from services.web.app import create_app
from services.web.console import ConsoleUnavailableError

from .conftest import ADMIN_PASSWORD, TRAINER_TOKEN, csrf_token, log_in, trainer_settings_for


@pytest.fixture()
def store(tmp_path: Path) -> ModelStore:
    """Two real (tiny) versions of one model, the older in production."""
    store = open_store(tmp_path / "store")
    for index, auc in enumerate((0.71, 0.83)):
        store.save("mobilenetv2", weights=b"weights-%d" % index, version=f"2026010{index + 1}T000000Z-aaaa",
                   card={"architecture": "mobilenetv2", "input_size": 64, "init": "none", "epochs_run": 3,
                         "threshold": 0.42 + index / 100,
                         "metrics": {"val": {"accuracy": 0.7 + index / 10, "precision": 0.66, "recall": 0.7,
                                             "f1": 0.68, "auc": auc}}})
    store.promote("mobilenetv2", "20260101T000000Z-aaaa")
    return store


@pytest.fixture()
def trainer_settings(store: ModelStore, published_datasets: tuple[str, str, str], trainer_queue: str,
                     tmp_path: Path) -> Any:
    return trainer_settings_for(
        CTSCAN_MODEL_STORE=store.url, CTSCAN_DATASETS_URL=published_datasets[0],
        CTSCAN_ADMIN_TOKEN=TRAINER_TOKEN, CTSCAN_TRAINER_QUEUE=trainer_queue,
        CTSCAN_TRAINER_WORK_DIR=str(tmp_path / "work"))


@pytest.fixture()
def jobs_client(trainer_settings: Any) -> Any:
    from services.trainer.api import JobsClient

    client = JobsClient.from_settings(trainer_settings)
    # What a trainer worker holding TRAINER_TOKEN publishes when it starts.
    AdminVerifier(client.records.objects).init(TRAINER_TOKEN)
    return client


@pytest.fixture()
def make_app(make_settings: Callable[..., Any], store: ModelStore, jobs_client: Any,
             published_datasets: tuple[str, str, str]) -> Callable[..., Any]:
    def build(**overrides: Any) -> Any:
        settings = make_settings(model_store=store.url, default_dataset=published_datasets[1],
                                 default_dataset_version=published_datasets[2], **overrides)
        return create_app(settings, jobs_client_factory=lambda: jobs_client)

    return build


@pytest.fixture()
def client(make_app: Callable[..., Any]) -> Iterator[FlaskClient]:
    yield make_app().test_client()


def login(client: FlaskClient, password: str = ADMIN_PASSWORD, username: str = "admin") -> Any:
    """Log in as the built-in admin (WEB_ADMIN_PASSWORD) through the login form."""
    return log_in(client, username, password, next_page="/admin")


def console_token(client: FlaskClient) -> str:
    return csrf_token(client.get("/admin").get_data(as_text=True))


def queue_form(token: str, **overrides: Any) -> dict[str, Any]:
    form = {"csrf_token": token, "model": "mobilenetv2", "init": "none", "input_size": "64",
            "dataset": "ucsd-covid-ct", "dataset_version": "web-test", "epochs": "3", "batch_size": "8",
            "learning_rate": "0.001"}
    form.update(overrides)
    return form


# --- login and refusals -------------------------------------------------------------------------
def test_console_redirects_to_login_without_a_session(client: FlaskClient) -> None:
    response = client.get("/admin")
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/login?next=/admin")
    assert client.get("/admin/jobs/table").status_code == 401


def test_actions_without_login_are_refused(client: FlaskClient, store: ModelStore,
                                           jobs_client: Any) -> None:
    token = csrf_token(client.get("/login").get_data(as_text=True))
    assert client.post("/admin/jobs", data=queue_form(token)).status_code == 401
    assert client.post("/admin/models/mobilenetv2/promote",
                       data={"csrf_token": token, "version": "20260102T000000Z-aaaa"}).status_code == 401
    assert client.post("/admin/models/mobilenetv2/rollback", data={"csrf_token": token}).status_code == 401
    assert client.post("/admin/jobs/some-job/cancel", data={"csrf_token": token}).status_code == 401
    assert store.production("mobilenetv2") == "20260101T000000Z-aaaa"
    assert jobs_client.list_jobs() == []


def test_wrong_password_is_refused(client: FlaskClient) -> None:
    response = login(client, "not-the-password")
    assert response.status_code == 401
    assert "That user name or password is not correct" in response.get_data(as_text=True)
    assert client.get("/admin").status_code == 302


def test_the_old_admin_login_address_still_logs_in(client: FlaskClient) -> None:
    page = client.get("/admin/login?next=/admin")
    assert page.status_code == 200 and 'id="login-form"' in page.get_data(as_text=True)
    response = client.post("/admin/login", data={"csrf_token": csrf_token(page.get_data(as_text=True)),
                                                 "username": "admin", "password": ADMIN_PASSWORD, "next": "/admin"})
    assert response.status_code == 302 and response.headers["Location"] == "/admin"
    assert "Training console" in client.get("/admin").get_data(as_text=True)


def test_login_without_csrf_token_is_refused(client: FlaskClient) -> None:
    client.get("/login")
    response = client.post("/login", data={"username": "admin", "password": ADMIN_PASSWORD})
    assert response.status_code == 400
    assert client.get("/admin").status_code == 302


def test_repeated_failures_are_throttled(client: FlaskClient) -> None:
    for _ in range(5):
        assert login(client, "guess-guess").status_code == 401
    response = login(client)  # even the right password waits now
    assert response.status_code == 429
    assert "Too many failed attempts" in response.get_data(as_text=True)


def test_login_sets_a_protected_session_cookie_and_logout_ends_it(client: FlaskClient) -> None:
    response = login(client)
    assert response.status_code == 302 and response.headers["Location"] == "/admin"
    cookies = response.headers.getlist("Set-Cookie")
    [cookie] = [c for c in cookies if c.startswith("ctscan_session=")]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    # The device cookie (login throttling) is as protected, and says only whose browser it is.
    [device] = [c for c in cookies if c.startswith("ctscan_device=")]
    assert "HttpOnly" in device and "SameSite=Lax" in device
    page = client.get("/admin").get_data(as_text=True)
    assert "Training console" in page
    response = client.post("/logout", data={"csrf_token": csrf_token(page)})
    assert response.status_code == 302 and response.headers["Location"] == "/login"
    assert client.get("/admin").status_code == 302


def test_logout_needs_its_csrf_token(client: FlaskClient) -> None:
    login(client)
    assert client.post("/logout").status_code == 400
    assert client.get("/admin").status_code == 200  # still logged in


def test_login_never_redirects_off_site(client: FlaskClient) -> None:
    for target in ("//evil.example/admin", "https://evil.example/", "/\\evil.example"):
        client.post("/logout", data={"csrf_token": csrf_token(client.get("/login").get_data(as_text=True))})
        token = csrf_token(client.get("/login").get_data(as_text=True))
        response = client.post("/login", data={"csrf_token": token, "username": "admin",
                                                "password": ADMIN_PASSWORD, "next": target})
        assert response.status_code == 302 and response.headers["Location"] == "/", target


def test_queue_form_offers_the_published_dataset_versions(make_settings: Callable[..., Any], store: ModelStore,
                                                         jobs_client: Any,
                                                         published_datasets: tuple[str, str, str]) -> None:
    settings = make_settings(model_store=store.url, datasets_url=published_datasets[0])
    client = create_app(settings, jobs_client_factory=lambda: jobs_client).test_client()
    login(client)
    html = client.get("/admin").get_data(as_text=True)
    assert '<option value="web-test">' in html  # the published version, in the datalist
    assert re.search(r'id="job-dataset_version"[^>]*value="web-test"', html)  # and the default


# --- jobs -----------------------------------------------------------------------------------
def test_queue_job_goes_to_the_trainer(client: FlaskClient, jobs_client: Any) -> None:
    login(client)
    response = client.post("/admin/jobs", data=queue_form(console_token(client)), follow_redirects=True)
    html = response.get_data(as_text=True)
    jobs = jobs_client.list_jobs()
    assert len(jobs) == 1
    job = jobs[0]
    assert (job.model, job.dataset, job.dataset_version, job.init, job.epochs) == \
        ("mobilenetv2", "ucsd-covid-ct", "web-test", "none", 3)
    assert job.hyperparameters == {"input_size": 64, "batch_size": 8, "learning_rate": 0.001}
    assert f"Queued job {job.id}" in html
    assert job.id in html and "badge-queued" in html


def test_the_console_refuses_hyperparameters_with_the_trainers_own_check(
        make_settings: Callable[..., Any], store: ModelStore, published_datasets: tuple[str, str, str],
        trainer_queue: str, tmp_path: Path) -> None:
    """The console submits through the same hyper-parameter model as the CLI: here the
    per-job memory limit refuses 512 px for the whole UCSD data set, before anything is queued."""
    from services.trainer.api import JobsClient

    small = JobsClient.from_settings(trainer_settings_for(
        CTSCAN_MODEL_STORE=store.url, CTSCAN_DATASETS_URL=published_datasets[0],
        CTSCAN_ADMIN_TOKEN=TRAINER_TOKEN, CTSCAN_TRAINER_QUEUE=trainer_queue,
        CTSCAN_TRAINER_WORK_DIR=str(tmp_path / "work"), CTSCAN_TRAINER_JOB_MEMORY_MB="1024"))
    AdminVerifier(small.records.objects).init(TRAINER_TOKEN)
    settings = make_settings(model_store=store.url, default_dataset=published_datasets[1],
                             default_dataset_version=published_datasets[2])
    client = create_app(settings, jobs_client_factory=lambda: small).test_client()
    login(client)
    html = client.post("/admin/jobs", data=queue_form(console_token(client), input_size="512"),
                       follow_redirects=True).get_data(as_text=True)
    assert "The job was not queued: hyper-parameter Input size:" in html
    assert "more than half the per-job memory limit (1024 MB" in html
    assert small.list_jobs() == []


def test_queue_job_with_wrong_csrf_token_is_refused(client: FlaskClient, jobs_client: Any) -> None:
    login(client)
    response = client.post("/admin/jobs", data=queue_form("forged-token"))
    assert response.status_code == 400
    assert jobs_client.list_jobs() == []


def test_queue_job_form_errors_are_explained(client: FlaskClient, jobs_client: Any) -> None:
    login(client)
    token = console_token(client)
    html = client.post("/admin/jobs", data=queue_form(token, epochs="0"),
                       follow_redirects=True).get_data(as_text=True)
    assert "The job was not queued. Epochs:" in html
    html = client.post("/admin/jobs", data=queue_form(token, dataset_version="no-such-version"),
                       follow_redirects=True).get_data(as_text=True)
    assert "has no published version no-such-version" in html
    # In the form's words: a version to choose, not a command to run.
    assert "choose one of the published versions" in html and "ctscan data upload" not in html
    assert jobs_client.list_jobs() == []


def test_queueing_needs_the_trainer_token(make_app: Callable[..., Any], jobs_client: Any) -> None:
    client = make_app(admin_token=None).test_client()
    login(client)
    page = client.get("/admin").get_data(as_text=True)
    assert "Queueing is disabled" in page
    html = client.post("/admin/jobs", data=queue_form(csrf_token(page)), follow_redirects=True).get_data(as_text=True)
    assert "CTSCAN_ADMIN_TOKEN is not set" in html
    assert jobs_client.list_jobs() == []


def test_a_wrong_trainer_token_is_reported(make_app: Callable[..., Any], jobs_client: Any) -> None:
    # The web holds another token than the trainer's workers (a deployment mistake).
    client = make_app(admin_token="a-different-token-123").test_client()
    login(client)
    html = client.post("/admin/jobs", data=queue_form(console_token(client)),
                       follow_redirects=True).get_data(as_text=True)
    assert "The job was not queued: admin token rejected" in html


def test_progress_is_shown_and_polled(client: FlaskClient, jobs_client: Any) -> None:
    login(client)
    client.post("/admin/jobs", data=queue_form(console_token(client), epochs="5"))
    job = jobs_client.list_jobs()[0]
    # What a worker writes after two epochs (the trainer's own record store).
    job.state = "running"
    job.progress = [
        JobProgress(epoch=1, total_epochs=5, loss=0.69, val_loss=0.68, val_auc=0.61, val_accuracy=0.58, seconds=9),
        JobProgress(epoch=2, total_epochs=5, loss=0.55, val_loss=0.6, val_auc=0.744, val_accuracy=0.66, seconds=9),
    ]
    jobs_client.records.save(job)
    fragment = client.get("/admin/jobs/table").get_data(as_text=True)
    assert 'data-active="true"' in fragment
    assert "2/5" in fragment and "val AUC 0.744" in fragment and "badge-running" in fragment
    assert "<html" not in fragment  # only the table, for the polling script


def test_cancel_a_queued_job(client: FlaskClient, jobs_client: Any) -> None:
    login(client)
    client.post("/admin/jobs", data=queue_form(console_token(client)))
    job_id = jobs_client.list_jobs()[0].id
    html = client.post(f"/admin/jobs/{job_id}/cancel", data={"csrf_token": console_token(client)},
                       follow_redirects=True).get_data(as_text=True)
    assert f"Job {job_id} is cancelled" in html
    assert jobs_client.get(job_id).state == "cancelled"
    assert "badge-cancelled" in html


def test_cancel_an_unknown_job_is_explained(client: FlaskClient) -> None:
    login(client)
    html = client.post("/admin/jobs/20990101-nope/cancel", data={"csrf_token": console_token(client)},
                       follow_redirects=True).get_data(as_text=True)
    assert "Job 20990101-nope was not cancelled: no job" in html


def test_console_still_loads_when_the_trainer_is_unavailable(make_settings: Callable[..., Any],
                                                             store: ModelStore) -> None:
    def unavailable() -> Any:
        raise ConsoleUnavailableError("The training service is not installed here.")

    app = create_app(make_settings(model_store=store.url), jobs_client_factory=unavailable)
    client = app.test_client()
    login(client)
    html = client.get("/admin").get_data(as_text=True)
    assert "The training service is not installed here." in html
    assert "20260101T000000Z-aaaa" in html  # models still listed


# --- models ---------------------------------------------------------------------------------
def test_models_are_listed_with_metrics(client: FlaskClient) -> None:
    login(client)
    html = client.get("/admin").get_data(as_text=True)
    section = html[html.index('id="model-mobilenetv2"'):]
    assert "production: <code>20260101T000000Z-aaaa</code>" in section
    section = section[section.index("<tbody>"):]
    assert section.index("20260102T000000Z-aaaa") < section.index("20260101T000000Z-aaaa")  # newest first
    assert "0.830" in section and "0.710" in section  # val AUC of each version
    assert re.search(r"20260101T000000Z-aaaa</code> <span class=\"badge badge-succeeded\">production", section)


def test_promote_then_roll_back(client: FlaskClient, store: ModelStore) -> None:
    login(client)
    token = console_token(client)
    html = client.post("/admin/models/mobilenetv2/promote", data={"csrf_token": token,
                                                                   "version": "20260102T000000Z-aaaa"},
                       follow_redirects=True).get_data(as_text=True)
    # First what it changes, and nothing changed yet.
    assert 'id="promote-confirm"' in html and "instead of version 20260101T000000Z-aaaa" in html
    assert store.production("mobilenetv2") == "20260101T000000Z-aaaa"
    html = client.post("/admin/models/mobilenetv2/promote", data={"csrf_token": csrf_token(html), "confirm": "yes",
                                                                   "version": "20260102T000000Z-aaaa"},
                       follow_redirects=True).get_data(as_text=True)
    assert "mobilenetv2: production is now 20260102T000000Z-aaaa" in html
    assert store.production("mobilenetv2") == "20260102T000000Z-aaaa"
    html = client.post("/admin/models/mobilenetv2/rollback", data={"csrf_token": token},
                       follow_redirects=True).get_data(as_text=True)
    assert "rolled back to 20260101T000000Z-aaaa" in html
    assert store.production("mobilenetv2") == "20260101T000000Z-aaaa"
    html = client.post("/admin/models/mobilenetv2/rollback", data={"csrf_token": token},
                       follow_redirects=True).get_data(as_text=True)
    assert "Rollback refused: model mobilenetv2 has no earlier production version" in html


def test_promote_unknown_version_is_refused(client: FlaskClient, store: ModelStore) -> None:
    login(client)
    html = client.post("/admin/models/mobilenetv2/promote", data={"csrf_token": console_token(client),
                                                                   "version": "20990101T000000Z-zzzz"},
                       follow_redirects=True).get_data(as_text=True)
    assert "Promotion refused: model mobilenetv2 has no version 20990101T000000Z-zzzz" in html
    assert store.production("mobilenetv2") == "20260101T000000Z-aaaa"


def test_promote_without_csrf_token_is_refused(client: FlaskClient, store: ModelStore) -> None:
    login(client)
    response = client.post("/admin/models/mobilenetv2/promote", data={"version": "20260102T000000Z-aaaa",
                                                                       "confirm": "yes"})
    assert response.status_code == 400
    assert store.production("mobilenetv2") == "20260101T000000Z-aaaa"


# --- the first hour: defaults that work here, the form's words, one set of metrics per run ------
def test_queue_form_defaults_work_on_a_cpu_machine_without_internet(
        make_app: Callable[..., Any], published_datasets: tuple[str, str, str]) -> None:
    client = make_app(datasets_url=published_datasets[0]).test_client()
    login(client)
    html = client.get("/admin").get_data(as_text=True)
    form = html[html.index('id="queue-form"'):html.index("</form>", html.index('id="queue-form"'))]
    assert re.search(r'<option selected value="mobilenetv2">|<option value="mobilenetv2" selected>', form)
    assert re.search(r'<option selected value="none">|<option value="none" selected>', form)
    assert re.search(r'id="job-input_size"[^>]*value="64"', form)
    assert "Input size (pixels)" in form
    assert "1 published" in form  # the note beside the dataset version
    assert re.search(r'id="job-dataset_version"[^>]*value="web-test"', form)


def test_an_input_size_too_small_for_the_model_is_refused_in_the_forms_words(client: FlaskClient,
                                                                            jobs_client: Any) -> None:
    login(client)
    html = client.post("/admin/jobs", data=queue_form(console_token(client), model="inceptionv3", input_size="64"),
                       follow_redirects=True).get_data(as_text=True)
    assert "The job was not queued. Input size: inceptionv3 needs at least 75 pixels, got 64." in html
    assert jobs_client.list_jobs() == []


def test_a_failed_jobs_reason_is_given_in_the_forms_words(client: FlaskClient, jobs_client: Any) -> None:
    login(client)
    client.post("/admin/jobs", data=queue_form(console_token(client), init="imagenet"))
    job = jobs_client.list_jobs()[0]
    # What a worker without internet records for ImageNet weights (the core's message).
    job = job.model_copy(update={"state": "failed", "error": (
        "ImageNet weights could not be downloaded (URLError); use --init none "
        "(random initialisation) or --init PATH with a local backbone weights file")})
    jobs_client.records.save(job)
    row = client.get("/admin/jobs/table").get_data(as_text=True)
    row = row[row.index(f'data-job-id="{job.id}"'):]
    assert 'choose &#34;None (from scratch)&#34; under Initial weights' in row
    assert "--init" not in row


def test_a_finished_run_shows_its_versions_metrics_and_why_it_was_not_promoted(
        client: FlaskClient, jobs_client: Any, store: ModelStore) -> None:
    login(client)
    client.post("/admin/jobs", data=queue_form(console_token(client), epochs="1"))
    job = jobs_client.list_jobs()[0]
    # What the worker writes when its run (saved as version <job id>) loses to production.
    store.save("mobilenetv2", weights=b"weights-new", version=job.id,
               card={"architecture": "mobilenetv2", "input_size": 64, "init": "none", "epochs_run": 1,
                     "threshold": 0.5, "metrics": {"val": {"accuracy": 0.517, "precision": 1.0, "recall": 0.05,
                                                           "f1": 0.095, "auc": 0.484}}})
    job = JobRecord.model_validate({**job.model_dump(), **dict(
        state="succeeded", result_version=job.id, promoted=False, metrics={
            "auc": 0.484, "accuracy": 0.517, "f1": 0.095, "threshold": 0.5},
        progress=[{"epoch": 1, "total_epochs": 1, "loss": 0.7, "val_loss": 0.69, "val_auc": 0.55,
                   "val_accuracy": 0.6, "seconds": 40}],
        promotion={"metric": "auc", "split": "val", "candidate": 0.484,
                   "production_version": "20260101T000000Z-aaaa", "production": 0.71})})
    jobs_client.records.save(job)
    html = client.get("/admin").get_data(as_text=True)
    row = html[html.index(f'<tr data-job-id="{job.id}"'):]
    row = row[:row.index("</tr>")]
    assert ("Not promoted: val AUC 0.484 does not beat production 20260101T000000Z-aaaa (val AUC 0.710)."
            in row)
    # One set of metrics per run: the row shows the saved version's, as the model table does,
    # not the last epoch's (val AUC 0.55 at epoch 1).
    assert "AUC 0.484" in row and "acc 0.517" in row and "F1 0.095" in row and "0.55" not in row
    table = html[html.index('id="model-mobilenetv2"'):]
    version_row = table[table.index(f"<code>{job.id}</code>"):]
    version_row = version_row[:version_row.index("</tr>")]
    assert all(value in version_row for value in ("0.517", "0.095", "0.484"))


def test_a_promotion_of_an_ensemble_member_leaves_the_ensemble_on_its_pinned_version(
        client: FlaskClient, store: ModelStore) -> None:
    excluded = "val AUC 0.612 (worst val source: sirm-covid-ct) is below the promotion floor 0.700"
    store.save_ensemble_record({"members": {"mobilenetv2": "20260101T000000Z-aaaa"}, "threshold": 0.47,
                                "threshold_rule": "youden", "created_at": "2026-01-01T00:00:00+00:00",
                                "members_rule": "floors", "excluded": {"densenet121": excluded}})
    login(client)
    html = client.get("/admin").get_data(as_text=True)
    assert "calibrated on val for" in html and 'id="ensemble-pinned"' not in html and 'id="ensemble-stale"' not in html
    # The page says how the members were chosen and which model is left out, and why.
    assert "clear the promotion floors on every val source" in html
    left_out = html[html.index('id="ensemble-excluded"'):]
    assert f"densenet121 ({excluded})" in left_out[:left_out.index("</ul>")]
    confirm = client.post("/admin/models/mobilenetv2/promote", data={"csrf_token": console_token(client),
                                                                     "version": "20260102T000000Z-aaaa"})
    consequences = confirm.get_data(as_text=True)
    consequences = consequences[consequences.index('id="consequences"'):consequences.index("</ul>")]
    # The admin is told, before confirming, that the clinicians' default keeps its calibrated version.
    assert "keeps serving mobilenetv2 20260101T000000Z-aaaa" in consequences
    assert "It uses 20260102T000000Z-aaaa only once it is recalibrated" in consequences
    assert "ctscan models calibrate-ensemble" in consequences and "switched off" not in consequences
    client.post("/admin/models/mobilenetv2/promote", data={"csrf_token": console_token(client), "confirm": "yes",
                                                           "version": "20260102T000000Z-aaaa"})
    assert store.production("mobilenetv2") == "20260102T000000Z-aaaa"
    html = client.get("/admin").get_data(as_text=True)
    assert 'id="ensemble-stale"' not in html and "not served" not in html
    pinned = html[html.index('id="ensemble-pinned"'):]
    pinned = pinned[:pinned.index("</div>")]
    assert ("The ensemble keeps serving mobilenetv2 <code>20260101T000000Z-aaaa</code> (production is now "
            "<code>20260102T000000Z-aaaa</code>)") in pinned
    assert "needs recalibration" in pinned and "ctscan models calibrate-ensemble" in pinned


def test_a_store_without_an_ensemble_record_is_told_the_ensemble_is_not_served(
        client: FlaskClient, store: ModelStore) -> None:
    login(client)
    html = client.get("/admin").get_data(as_text=True)
    stale = html[html.index('id="ensemble-stale"'):]
    assert "has no calibration and is not served" in stale[:stale.index("</div>")]
