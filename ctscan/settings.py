"""All configuration, read from environment variables (or a `.env` file), one section per concern.

Shared sections, each variable read here and nowhere else:

    StoreSettings   CTSCAN_MODEL_STORE, CTSCAN_DATASETS_URL   where models and datasets live
    S3Settings      CTSCAN_S3_*, AWS_DEFAULT_REGION            how S3 is reached (credentials: boto3)
    AdminSettings   CTSCAN_ADMIN_TOKEN                         the admin credential for training jobs
    CoreSettings    CTSCAN_DATA_DIR, CTSCAN_RELEASE_DIR, CTSCAN_RUNS_DIR   the CLI's local folders
    AuditSettings   CTSCAN_AUDIT_DIR                           where the audit trail is appended

Service sections (each service reads its own, plus the shared ones it names as fields):

    InferenceSettings   INFERENCE_*
    WebSettings         WEB_*, INFERENCE_URL
    TrainerSettings     REDIS_URL, CELERY_*, CTSCAN_TRAINER_*, CTSCAN_PROMOTION_METRIC, CTSCAN_BROKER_DIR

No default points into the source checkout: local data defaults to the per-user data folder
(`$CTSCAN_HOME`, else `$XDG_DATA_HOME/ctscan`, else `~/.local/share/ctscan`); the release
folder has no default. `make up` (scripts/devstack.py) and the Makefile set what they use.
Secrets have no default, and placeholders ("changeme"...) are refused.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ctscan.imaging.decoding import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE
from ctscan.study import DEFAULT_MAX_TOTAL_PIXELS

# Values people paste from examples; refused whatever their case or surrounding spaces.
PLACEHOLDER_SECRETS = frozenset({
    "changeme", "change-me", "change_me", "changethis", "change-this", "secret", "password",
    "placeholder", "admin", "default", "example", "test", "todo", "xxx", "none", "null", "token",
    "your-secret-key", "secret-key", "please-change",
})
MIN_SECRET_KEY_LENGTH = 16
MIN_PASSWORD_LENGTH = 8
PROMOTION_METRICS = ("auc", "accuracy", "f1", "precision", "recall")


def data_home() -> Path:
    """The per-user folder for local stores, runs and caches."""
    explicit = os.environ.get("CTSCAN_HOME")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share") / "ctscan"


def refuse_placeholder(value: SecretStr, *, name: str, min_length: int) -> SecretStr:
    text = value.get_secret_value().strip()
    if not text:
        raise ValueError(f"{name} is empty; set it to a real secret")
    if text.lower() in PLACEHOLDER_SECRETS or text.lower().startswith(("changeme", "change-me", "<")):
        raise ValueError(f"{name} is a placeholder; set it to a real secret")
    if len(text) < min_length:
        raise ValueError(f"{name} must be at least {min_length} characters long")
    return value


class Section(BaseSettings):
    # Variables are read by their names only (validation_alias), never by a field's name:
    # `populate_by_name` would also read MODEL_STORE, DATA_DIR, STORE... from the environment.
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    @classmethod
    def from_values(cls, **values: Any) -> Any:
        """Build from field names (code and tests); the environment fills in the rest.
        `_env_file=None` leaves a `.env` out."""
        fields = cls.model_fields
        return cls(**{
            str(fields[name].validation_alias or name) if name in fields else name: value
            for name, value in values.items()})


def _shared(factory: Any) -> Any:
    """A shared section inside a service's settings. Its alias is no environment variable's
    name: the section reads its own variables; code passes it with `from_values`."""
    return Field(default_factory=factory, validation_alias=f"section:{factory.__name__}")


# --- shared sections --------------------------------------------------------------------------
class StoreSettings(Section):
    # Local folder or s3://bucket/prefix (or another registered backend, see ctscan.storage.objects).
    model_store: str = Field(default_factory=lambda: str(data_home() / "model-store"),
                             validation_alias="CTSCAN_MODEL_STORE")
    # Published dataset versions: local folder or s3://bucket/prefix/datasets.
    datasets_url: str = Field(default_factory=lambda: str(data_home() / "datasets"),
                              validation_alias="CTSCAN_DATASETS_URL")


class S3Settings(Section):
    endpoint_url: str | None = Field(default=None, validation_alias="CTSCAN_S3_ENDPOINT_URL")
    region: str = Field(default="us-east-1", validation_alias="AWS_DEFAULT_REGION")
    # "path" works with MinIO and local servers; AWS accepts it too.
    addressing_style: str = Field(default="path", validation_alias="CTSCAN_S3_ADDRESSING_STYLE")
    max_attempts: int = Field(default=5, ge=1, validation_alias="CTSCAN_S3_MAX_ATTEMPTS")
    connect_timeout: float = Field(default=5.0, gt=0, validation_alias="CTSCAN_S3_CONNECT_TIMEOUT")
    read_timeout: float = Field(default=60.0, gt=0, validation_alias="CTSCAN_S3_READ_TIMEOUT")


class AdminSettings(Section):
    """The admin credential for queueing and cancelling training jobs. Optional for the web
    (without it the console cannot queue), required by the trainer worker."""

    admin_token: SecretStr | None = Field(default=None, validation_alias="CTSCAN_ADMIN_TOKEN")

    @field_validator("admin_token")
    @classmethod
    def _refuse_placeholders(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        return refuse_placeholder(value, name="CTSCAN_ADMIN_TOKEN", min_length=MIN_PASSWORD_LENGTH)

    def token(self) -> str | None:
        return None if self.admin_token is None else self.admin_token.get_secret_value().strip()


class PromotionSettings(Section):
    """The promotion gate's floors: whatever the metric it compares on, a candidate below
    either floor on its val split is never promoted (a model that says COVID for every image
    has a perfect recall and a balanced accuracy of 0.5)."""

    min_auc: float = Field(default=0.70, ge=0.0, le=1.0, validation_alias="CTSCAN_PROMOTION_MIN_AUC")
    min_balanced_accuracy: float = Field(default=0.65, ge=0.0, le=1.0,
                                         validation_alias="CTSCAN_PROMOTION_MIN_BALANCED_ACCURACY")


class CoreSettings(Section):
    # A dataset folder laid out like UCSD COVID-CT (split.csv, SHA256SUMS, images).
    data_dir: Path = Field(default_factory=lambda: data_home() / "data" / "ucsd-covid-ct",
                           validation_alias="CTSCAN_DATA_DIR")
    # The shipped release (a model store folder) that `ctscan models seed` copies from.
    release_dir: Path | None = Field(default=None, validation_alias="CTSCAN_RELEASE_DIR")
    # Run folders of `ctscan train` (checkpoints, history.png).
    runs_dir: Path = Field(default_factory=lambda: data_home() / "runs", validation_alias="CTSCAN_RUNS_DIR")


class AuditSettings(Section):
    # The append-only audit trail (ctscan.access.audit_trail): a folder every service process can
    # write; in containers a mounted volume, never the image.
    audit_dir: Path = Field(default_factory=lambda: data_home() / "audit", validation_alias="CTSCAN_AUDIT_DIR")


# --- services ---------------------------------------------------------------------------------
class InferenceSettings(Section):
    model_config = SettingsConfigDict(env_prefix="INFERENCE_", env_file=".env", extra="ignore")

    # Which models to serve; the ensemble is offered when two or more are loaded.
    # Comma-separated in the environment: INFERENCE_MODELS=mobilenetv2,densenet121
    models: Annotated[list[str], NoDecode] = Field(default_factory=lambda: list(_ensemble_members()))
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    # Whole studies (POST /predict/study): all files together, or one ZIP as expanded.
    max_study_bytes: int = Field(default=512 * 1024 * 1024, ge=1)
    max_study_slices: int = Field(default=1000, ge=1, le=5000)
    max_zip_ratio: int = Field(default=100, ge=2)  # expansion ratio beyond which a ZIP entry is a bomb
    # Per slice, from its header before decoding (CT: 512-1024 px a side), and per study in all.
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=64)
    max_side: int = Field(default=DEFAULT_MAX_SIDE, ge=8)
    max_study_pixels: int = Field(default=DEFAULT_MAX_TOTAL_PIXELS, ge=64)
    # Decoding: uploads waiting for a decode thread beyond this are refused at once (503 with
    # Retry-After) rather than queued behind minutes of work; slices larger than
    # `decode_heavy_pixels` (beyond a 1024 x 1024 CT matrix) decode on their own threads, a
    # share of the cores, so they cannot hold up ordinary slices.
    decode_queue: int = Field(default=64, ge=1, le=100_000)
    decode_heavy_pixels: int = Field(default=1024 * 1024, ge=64)
    # Dynamic batching: a batch closes at max_batch_size or max_wait_ms after its first request.
    max_batch_size: int = Field(default=16, ge=1, le=256)
    max_wait_ms: float = Field(default=2.0, ge=0.0, le=1000.0)
    # Serve a version's stored ONNX copy when it has one (made and checked against
    # TensorFlow when the version was saved); a copy whose recorded difference exceeds the
    # tolerance is not used.
    use_onnx: bool = True
    onnx_tolerance: float = Field(default=1e-4, gt=0.0)
    # Threads decoding uploads (0 = one per core): more only adds contention and memory.
    decode_threads: int = Field(default=0, ge=0, le=256)
    # ONNX Runtime threads per model (0 = one per core), and whether they busy-wait between
    # layers while a batch runs: that shaves about a millisecond off a lone request, but
    # under load, and for the ensemble's three models at once, it takes the cores from
    # decoding and from each other (measured: fewer requests per second). Off by default.
    onnx_threads: int = Field(default=0, ge=0, le=256)
    onnx_spinning: bool = False
    # Real CT images for the smoke predictions; empty = CTSCAN_DATA_DIR (a synthetic slice
    # when neither holds images).
    verification_dir: str = ""
    verification_images: int = Field(default=4, ge=1, le=64)
    # Seconds between polls of the store's production pointers; 0 turns hot reload off.
    reload_poll_seconds: float = Field(default=30.0, ge=0.0)
    warmup_gradcam: bool = True
    log_level: str = "info"
    # Who may call /predict: "keys" (an API key from `ctscan keys create`, sent as X-API-Key
    # or Authorization: Bearer) or "off" (anyone who reaches the port: local use only).
    auth: Literal["keys", "off"] = "keys"
    # A revoked key stops working within this many seconds (each replica re-reads the store).
    key_reload_seconds: float = Field(default=5.0, gt=0, le=300)
    # Requests a minute per key (per replica) unless the key has its own limit.
    rate_limit_per_minute: int = Field(default=120, ge=1)
    # Requests a minute per person behind the web page (the page names them; per replica).
    user_rate_limit_per_minute: int = Field(default=30, ge=1)

    store: StoreSettings = _shared(StoreSettings)
    core: CoreSettings = _shared(CoreSettings)
    audit: AuditSettings = _shared(AuditSettings)

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("models")
    @classmethod
    def _known_models(cls, models: list[str]) -> list[str]:
        known = _architecture_names()
        unknown = sorted(set(models) - set(known))
        if unknown:
            raise ValueError(f"unknown models {unknown}; choose from {list(known)}")
        if not models:
            raise ValueError("at least one model must be served")
        return list(dict.fromkeys(models))

    def verification_path(self) -> Path:
        return Path(self.verification_dir) if self.verification_dir else self.core.data_dir


class WebSettings(Section):
    # Signs the session cookie and the CSRF tokens.
    secret_key: SecretStr = Field(validation_alias="WEB_SECRET_KEY")
    # Who may use the page. "accounts": people log in with an account from
    # `ctscan accounts create` (roles clinician / admin); "proxy": an authenticating reverse
    # proxy (e.g. an OIDC proxy) has logged them in and sends their name in
    # `proxy_user_header` (admins: `proxy_admin_group` in `proxy_groups_header`); the proxy
    # must drop these headers from clients. "off": no login, local use only.
    auth: Literal["accounts", "proxy", "off"] = Field(default="accounts", validation_alias="WEB_AUTH")
    # The built-in account "admin" (role admin) has this password; optional once admins have
    # accounts of their own.
    admin_password: SecretStr | None = Field(default=None, validation_alias="WEB_ADMIN_PASSWORD")
    proxy_user_header: str = Field(default="X-Forwarded-User", validation_alias="WEB_PROXY_USER_HEADER")
    proxy_groups_header: str = Field(default="X-Forwarded-Groups", validation_alias="WEB_PROXY_GROUPS_HEADER")
    proxy_admin_group: str = Field(default="ctscan-admins", validation_alias="WEB_PROXY_ADMIN_GROUP")
    # The page's own API key for the inference service; registered in the store (as key
    # "web") when the page starts, so one Secret configures both sides.
    inference_api_key: SecretStr | None = Field(default=None, validation_alias="WEB_INFERENCE_API_KEY")

    inference_url: str = Field(default="http://127.0.0.1:8000", validation_alias="INFERENCE_URL")
    # Connect fails fast (the service is down); reading waits for Grad-CAM on a CPU.
    inference_connect_timeout_s: float = Field(default=3.0, gt=0, validation_alias="WEB_INFERENCE_CONNECT_TIMEOUT_S")
    inference_read_timeout_s: float = Field(default=60.0, gt=0, validation_alias="WEB_INFERENCE_READ_TIMEOUT_S")
    inference_retries: int = Field(default=2, ge=0, le=5, validation_alias="WEB_INFERENCE_RETRIES")
    max_upload_mb: float = Field(default=20.0, gt=0, validation_alias="WEB_MAX_UPLOAD_MB")
    # Whole studies (the /study page): all files together, and how long their analysis may take.
    max_study_mb: float = Field(default=512.0, gt=0, validation_alias="WEB_MAX_STUDY_MB")
    max_study_files: int = Field(default=1000, ge=1, le=5000, validation_alias="WEB_MAX_STUDY_FILES")
    inference_study_timeout_s: float = Field(default=600.0, gt=0, validation_alias="WEB_INFERENCE_STUDY_TIMEOUT_S")
    # Defaults offered in the "queue a training job" form; an empty version means the newest
    # published one.
    default_dataset: str = Field(default="ucsd-covid-ct", validation_alias="WEB_DEFAULT_DATASET")
    default_dataset_version: str = Field(default="", validation_alias="WEB_DEFAULT_DATASET_VERSION")
    # Behind TLS in production: send the session cookie over HTTPS only.
    session_cookie_secure: bool = Field(default=False, validation_alias="WEB_SESSION_COOKIE_SECURE")
    session_hours: float = Field(default=8.0, gt=0, validation_alias="WEB_SESSION_HOURS")
    # Reverse proxies in front of the page (the ingress: 1) whose X-Forwarded-For/-Proto are
    # believed: the login throttle then sees each person's address, not the proxy's, and
    # HTTPS is recognised. 0 (no proxy) believes no such header.
    trusted_proxy_hops: int = Field(default=0, ge=0, le=5, validation_alias="WEB_TRUSTED_PROXY_HOPS")

    # The console lists, promotes and rolls back models in store.model_store and offers the
    # dataset versions published in store.datasets_url; it queues jobs with admin's token.
    store: StoreSettings = _shared(StoreSettings)
    admin: AdminSettings = _shared(AdminSettings)
    audit: AuditSettings = _shared(AuditSettings)

    @field_validator("secret_key")
    @classmethod
    def _check_secret_key(cls, value: SecretStr) -> SecretStr:
        return refuse_placeholder(value, name="WEB_SECRET_KEY", min_length=MIN_SECRET_KEY_LENGTH)

    @field_validator("admin_password")
    @classmethod
    def _check_admin_password(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        return refuse_placeholder(value, name="WEB_ADMIN_PASSWORD", min_length=MIN_PASSWORD_LENGTH)

    @field_validator("inference_api_key")
    @classmethod
    def _check_api_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        return refuse_placeholder(value, name="WEB_INFERENCE_API_KEY", min_length=24)

    @field_validator("inference_url")
    @classmethod
    def _check_inference_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("INFERENCE_URL must start with http:// or https://")
        return value.rstrip("/")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_study_bytes(self) -> int:
        return int(self.max_study_mb * 1024 * 1024)


class TrainerSettings(Section):
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", validation_alias="REDIS_URL")
    # Empty = REDIS_URL; `filesystem://` works too (job records do not live in the broker).
    broker_url: str = Field(default="", validation_alias="CELERY_BROKER_URL")
    # Empty = REDIS_URL; "disabled" runs without a result backend (progress then only in the store).
    result_backend: str = Field(default="", validation_alias="CELERY_RESULT_BACKEND")
    # Local scratch: dataset cache and run folders (checkpoints are mirrored to the store).
    work_dir: Path = Field(default_factory=lambda: data_home() / "trainer", validation_alias="CTSCAN_TRAINER_WORK_DIR")
    queue: str = Field(default="training", validation_alias="CTSCAN_TRAINER_QUEUE")
    # A training job longer than this is stopped (soft limit: the job records why).
    soft_time_limit_s: int = Field(default=6 * 3600, ge=10, validation_alias="CTSCAN_TRAINER_SOFT_TIME_LIMIT")
    # Redis redelivers an unacknowledged job after this long; it must exceed the time limit,
    # or a healthy long job would be handed to a second worker.
    visibility_timeout_s: int | None = Field(default=None, ge=1, validation_alias="CTSCAN_TRAINER_VISIBILITY_TIMEOUT")
    promotion_metric: str = Field(default="auc", validation_alias="CTSCAN_PROMOTION_METRIC")
    # Message folder of the embedded `filesystem://` broker (make up without Redis).
    broker_dir: Path = Field(default_factory=lambda: data_home() / "broker", validation_alias="CTSCAN_BROKER_DIR")
    # Liveness: a running job holds a lease in Redis that its worker renews every
    # heartbeat; a lease not renewed for lease_ttl_s means the worker is gone, and the reaper
    # (in every worker, every reaper_interval_s) requeues the job from its checkpoint or fails it.
    heartbeat_interval_s: float = Field(default=5.0, gt=0, validation_alias="CTSCAN_TRAINER_HEARTBEAT_INTERVAL")
    lease_ttl_s: float = Field(default=30.0, gt=0, validation_alias="CTSCAN_TRAINER_LEASE_TTL")
    reaper_interval_s: float = Field(default=10.0, gt=0, validation_alias="CTSCAN_TRAINER_REAPER_INTERVAL")
    # A job is tried at most this often (each start counts); between tries it waits
    # retry_backoff_s, doubled each time.
    max_attempts: int = Field(default=3, ge=1, le=20, validation_alias="CTSCAN_TRAINER_MAX_ATTEMPTS")
    retry_backoff_s: float = Field(default=10.0, ge=0, validation_alias="CTSCAN_TRAINER_RETRY_BACKOFF")
    # Resident memory a job may use; the worker stops a job that exceeds it.
    job_memory_mb: int = Field(default=8192, ge=256, validation_alias="CTSCAN_TRAINER_JOB_MEMORY_MB")
    # Largest input size a job may ask for (also bounded by the architecture and by memory).
    max_input_size: int = Field(default=512, ge=32, le=512, validation_alias="CTSCAN_TRAINER_MAX_INPUT_SIZE")
    # How long an S3 outage during training may last: the job waits for S3 to come back and
    # resumes from its last good checkpoint; longer, and it fails.
    s3_outage_budget_s: float = Field(default=600.0, ge=0, validation_alias="CTSCAN_TRAINER_S3_OUTAGE_BUDGET")
    # Checkpoints of cancelled, failed and abandoned jobs are deleted this long after the job ended.
    checkpoint_retention_s: float = Field(default=7 * 24 * 3600.0, ge=0,
                                          validation_alias="CTSCAN_TRAINER_CHECKPOINT_RETENTION")

    store: StoreSettings = _shared(StoreSettings)
    admin: AdminSettings = _shared(AdminSettings)
    promotion: PromotionSettings = _shared(PromotionSettings)

    @field_validator("promotion_metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        if value not in PROMOTION_METRICS:
            raise ValueError(f"CTSCAN_PROMOTION_METRIC must be one of {', '.join(sorted(PROMOTION_METRICS))}")
        return value

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def celery_result_backend(self) -> str | None:
        if self.result_backend == "disabled":
            return None
        return self.result_backend or self.redis_url

    @property
    def hard_time_limit_s(self) -> int:
        return self.soft_time_limit_s + 120  # room to write the failed record after the soft limit

    @property
    def broker_visibility_timeout_s(self) -> int:
        return self.visibility_timeout_s or self.hard_time_limit_s + 3600


def _architecture_names() -> tuple[str, ...]:
    from ctscan.models import architecture_names

    return architecture_names()


def _ensemble_members() -> tuple[str, ...]:
    from ctscan.models import ensemble_members

    return ensemble_members()


# --- read once per process --------------------------------------------------------------------
@lru_cache
def get_store_settings() -> StoreSettings:
    return StoreSettings()


@lru_cache
def get_s3_settings() -> S3Settings:
    return S3Settings()


@lru_cache
def get_admin_settings() -> AdminSettings:
    return AdminSettings()


@lru_cache
def get_promotion_settings() -> PromotionSettings:
    return PromotionSettings()


@lru_cache
def get_core_settings() -> CoreSettings:
    return CoreSettings()


@lru_cache
def get_audit_settings() -> AuditSettings:
    return AuditSettings()


@lru_cache
def get_inference_settings() -> InferenceSettings:
    return InferenceSettings()


@lru_cache
def get_web_settings() -> WebSettings:
    return WebSettings()  # type: ignore[call-arg]  # required fields come from the environment


@lru_cache
def get_trainer_settings() -> TrainerSettings:
    return TrainerSettings()


def read_env_file(path: str | Path) -> dict[str, str]:
    """`NAME=value` lines (optionally `export NAME='value'`, as `make up` writes var/dev.env)."""
    import shlex

    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"no environment file {source}")
    values: dict[str, str] = {}
    for line in source.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        name, sep, value = line.partition("=")
        if sep and name.strip().isidentifier():
            parts = shlex.split(value, posix=True) if value.strip() else [""]
            values[name.strip()] = parts[0] if parts else ""
    return values


def load_env_file(path: str | Path) -> dict[str, str]:
    """Put an environment file's variables into this process's environment (they win over
    what was set before) and forget settings read earlier."""
    import os

    values = read_env_file(path)
    os.environ.update(values)
    for reader in (get_store_settings, get_s3_settings, get_admin_settings, get_promotion_settings,
                   get_core_settings, get_audit_settings, get_inference_settings, get_web_settings,
                   get_trainer_settings):
        reader.cache_clear()
    return values


def describe_settings_error(exc: ValidationError) -> str:
    """One line naming each refused variable (never its value)."""
    problems = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else "settings"
        message = error["msg"].removeprefix("Value error, ")
        problems.append(message if message.startswith(name) else f"{name}: {message}")
    return "; ".join(problems)


def clear_caches() -> None:
    """Forget every section read so far (tests that change the environment call this)."""
    for getter in (get_store_settings, get_s3_settings, get_admin_settings, get_core_settings, get_promotion_settings,
                   get_audit_settings,
                   get_inference_settings, get_web_settings, get_trainer_settings):
        getter.cache_clear()
