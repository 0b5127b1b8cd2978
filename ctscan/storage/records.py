"""Records that cross a process boundary through the store: typed, validated on the way in.

A model card, a production pointer, the ensemble record, an ONNX copy's manifest, a dataset
manifest and a job record are written by one process (trainer, CLI, web console) and read
by others (inference, web, CLI). They are pydantic models here, serialised as JSON by the
repositories (`ctscan.storage.store`, `ctscan.data.versions`, `ctscan.storage.job_records`).

Records are open (`extra="allow"`): keys written by a newer version of the code survive a
round trip through an older one, and old records (the shipped release's cards) still load.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class Record(BaseModel):
    model_config = ConfigDict(extra="allow")
    # Write only the keys that were given (cards keep exactly what their author wrote) rather
    # than every field with its default.
    sparse: ClassVar[bool] = False

    def to_json(self) -> bytes:
        """Stable JSON (sorted keys): the bytes the store writes and checksums."""
        return json.dumps(self.model_dump(mode="json", exclude_unset=self.sparse), indent=2, sort_keys=True,
                          default=str).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Any:
        return cls.model_validate(json.loads(data))

    # Read-only mapping access (record["threshold"], record.get("gate"), "gate" in record) for
    # code written against the dict records these replace; new code reads attributes. A field
    # that is None counts as absent for `get` and `in`.
    def __getitem__(self, key: str) -> Any:
        if key in type(self).model_fields:
            return getattr(self, key)
        extra = self.model_extra or {}
        if key in extra:
            return extra[key]
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            value = self[key]
        except KeyError:
            return default
        return default if value is None else value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None


class ModelCard(Record):
    """What a model version is and how it was made (card.json beside its weights).

    The store sets `name`, `version` and `weights_sha256`; `architecture`, `input_size` and
    `threshold` are what a server needs. The rest is provenance, kept as written."""

    sparse: ClassVar[bool] = True

    name: str | None = None
    version: str | None = None
    weights_sha256: str | None = None
    architecture: str
    input_size: int = Field(ge=1)
    threshold: float
    init: str | None = None
    threshold_rule: str | None = None
    regime: list[dict[str, Any]] | None = None
    dataset: dict[str, Any] | None = None
    split: dict[str, Any] | None = None
    epochs_run: int | None = None
    best_epoch: int | None = None
    stopped_early: bool | None = None
    hyperparameters: dict[str, Any] | None = None
    # {"val": {accuracy, precision, recall, f1, auc, ...}, "test": {...}}
    metrics: dict[str, dict[str, Any]] = Field(default_factory=dict)
    history: list[dict[str, Any]] | None = None
    training_seconds: float | None = None
    git_commit: str | None = None
    environment: dict[str, Any] | None = None
    created_at: str | None = None
    intended_use: str | None = None
    job: dict[str, Any] | None = None  # set by the trainer service
    # Filled in by newer training code (preprocessing recipe, calibration, out-of-distribution gate).
    preprocessing: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    gate: dict[str, Any] | None = None
    uncertainty: dict[str, Any] | None = None  # the indeterminate band, chosen on val

    def val_metric(self, metric: str) -> float | None:
        """A val metric as the selection rule reads it: with several val sources, the worst
        source's (among those where it is defined), so no source can carry a model alone."""
        per_source = [float(m[metric]) for m in (self.metrics.get("val_sources") or {}).values()
                      if m.get(metric) is not None and m[metric] == m[metric]]  # NaN: one class only
        if per_source:
            return min(per_source)
        value = (self.metrics.get("val") or {}).get(metric)
        return None if value is None else float(value)

    def worst_val_source(self, metric: str) -> str | None:
        """Which val source gives `val_metric` (None with one source)."""
        per_source = {name: float(m[metric]) for name, m in (self.metrics.get("val_sources") or {}).items()
                      if m.get(metric) is not None and m[metric] == m[metric]}
        return min(per_source, key=lambda name: per_source[name]) if per_source else None


class ProductionPointer(Record):
    """`<model>/production.json`: the served version and the earlier ones (for rollback)."""

    version: str | None = None
    history: list[str] = Field(default_factory=list)
    updated_at: str | None = None
    reason: str = ""


class EnsembleRecord(Record):
    """`ensemble.json`: the ensemble is exactly its `members` (name -> version), the versions
    its calibration, threshold and indeterminate band were fitted for on val. Those versions
    are pinned: they are served for the ensemble even after a member's production version
    moves on, until the ensemble is calibrated again.

    `members_rule` says how the members were chosen: "floors" (the production models that
    clear the promotion floors on every val source; `excluded` says why each other one was
    left out) or "explicit" (named by an admin, `--members`; `overrides` names members kept
    although below the floors). Records written before these fields have none of them."""

    sparse: ClassVar[bool] = True

    members: dict[str, str] = Field(min_length=1)
    members_rule: Literal["floors", "explicit"] | None = None
    excluded: dict[str, str] | None = None  # production models left out -> why
    overrides: dict[str, str] | None = None  # explicit members below the floors -> their failure
    threshold: float
    threshold_rule: str | None = None
    dataset_fingerprint: str | None = None
    metrics: dict[str, dict[str, Any]] | None = None
    created_at: str | None = None
    calibration: dict[str, Any] | None = None
    uncertainty: dict[str, Any] | None = None


class OnnxManifest(Record):
    """`<model>/<version>/onnx/manifest.json`: an ONNX Runtime copy of a version's weights,
    and the check it passed against TensorFlow when it was made."""

    file: str = "model.onnx"
    sha256: str
    size: int
    weights_sha256: str  # the version's weights this copy was converted from
    input_size: int
    opset: int
    converter: str  # e.g. "tf2onnx 1.17.0"
    max_abs_difference: float  # ONNX vs TensorFlow, probabilities, on the images below
    tolerance: float
    verification_images: int
    verified_on: str  # where the real images came from
    created_at: str


class DatasetManifest(Record):
    """`<datasets>/<name>/<version>/MANIFEST.json`, written last: the version is complete."""

    url: str
    version: str
    fingerprint: str
    counts: dict[str, dict[str, int]]
    images_verified: int
    files: dict[str, int]  # relative path -> size in bytes
    created_at: str


JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class JobProgress(Record):
    epoch: int
    total_epochs: int
    loss: float
    val_loss: float
    val_auc: float
    val_accuracy: float
    seconds: float


class JobAttempt(Record):
    """One start of a job by a worker, and how that attempt ended (None while it runs)."""

    attempt: int
    worker: str | None = None
    started_at: str
    ended_at: str | None = None
    outcome: str | None = None


class DatasetRef(Record):
    """A published dataset version a job also trains on (besides its main one)."""

    dataset: str
    dataset_version: str


class JobRecord(Record):
    """`<store>/.jobs/<id>/job.json`: a training job, the source of truth for its state."""

    id: str
    state: JobState
    model: str
    dataset: str
    dataset_version: str
    init: str
    epochs: int
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    # More sources trained on at once (their train splits; selection on the worst val source).
    extra_datasets: list[DatasetRef] = Field(default_factory=list)
    progress: list[JobProgress] = Field(default_factory=list)
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    updated_at: str | None = None
    error: str | None = None
    result_version: str | None = None
    promoted: bool | None = None
    # What the promotion gate compared (metric, candidate, production): why it was or was not promoted.
    promotion: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    attempts: int = 0
    worker: str | None = None
    device: str | None = None
    resumed_from_epoch: int | None = None
    # HMAC of the request with the submitter's admin token; the worker checks it with its own.
    signature: str | None = None
    cancel_requested: bool | None = None
    # Liveness (services/trainer/liveness.py): each start increments the fence, and a worker
    # writes only while the record carries its own; every attempt and its cause; when a
    # requeued job may start again (backoff).
    fence: int = 0
    attempt_log: list[JobAttempt] = Field(default_factory=list)
    retry_at: str | None = None
    # Store outages the job waited out, resuming from its last checkpoint afterwards.
    outages: list[str] = Field(default_factory=list)

    def request_fields(self) -> dict[str, Any]:
        """What the submitter asked for (the part the signature covers)."""
        fields = {"id": self.id, "model": self.model, "dataset": self.dataset,
                  "dataset_version": self.dataset_version, "init": self.init, "epochs": self.epochs,
                  "hyperparameters": self.hyperparameters}
        if self.extra_datasets:  # only then: records signed before multi-source jobs still verify
            fields["extra_datasets"] = [ref.model_dump() for ref in self.extra_datasets]
        return fields
