"""What the API sends and takes besides :class:`jobs.models.JobRequest`: pydantic models,
so the OpenAPI document (``api.openapi``) is generated from the same code that
serialises the answers."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
)

from api.keys import TENANT_PATTERN
from jobs.models import FailureReason, JobStatus, Output, WorkerState
from jobs.quotas import QuotaSettings

Scalar = StrictStr | StrictInt | StrictFloat | StrictBool


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FieldProblem(_Out):
    """One rejected field: which, and what is allowed there."""

    field: str = Field(description="The field (or header) name, e.g. `width`.")
    message: str = Field(description="What is wrong and what is allowed, e.g. `64 to 1024`.")


class Problem(_Out):
    """An error, as RFC 9457 problem details (``application/problem+json``)."""

    type: str = Field(description="A URI naming the kind of problem.")
    title: str
    status: int = Field(ge=100, le=599)
    detail: str | None = None
    instance: str | None = Field(default=None, description="The request path.")
    errors: list[FieldProblem] | None = Field(
        default=None, description="Each rejected field (422 and 400 answers)."
    )
    limit: str | None = Field(default=None, description="The quota limit reached (429 answers).")


class Failure(_Out):
    reason: FailureReason
    message: str = Field(description="Safe to show a user.")


class JobTicket(_Out):
    """The answer to a submit: where to follow the job."""

    job_id: str
    status: JobStatus
    created_at: datetime
    status_url: str = Field(description="`GET` it for the job's status.")
    events_url: str = Field(description="`GET` it for a stream of Server-Sent Events.")


class JobView(_Out):
    """A job as its tenant sees it."""

    job_id: str
    status: JobStatus
    workflow: str
    lane: str
    params: dict[str, Scalar] = Field(description="Every parameter, resolved and within bounds.")
    created_at: datetime
    updated_at: datetime
    position: int | None = Field(
        default=None, ge=1, description="1 = next in its lane; only while queued."
    )
    attempt: int | None = None
    worker_id: str | None = None
    outputs: list[Output] = Field(default_factory=list, description="When succeeded.")
    seed: int | None = None
    timings: dict[str, float] = Field(
        default_factory=dict, description="Seconds per phase (queued, render, upload, ...)."
    )
    failure: Failure | None = Field(default=None, description="When failed.")
    status_url: str
    events_url: str


class JobList(_Out):
    jobs: list[JobView]


class WorkflowParam(_Out):
    type: Literal["string", "int", "float", "choice", "bool", "image"]
    description: str
    required: bool
    default: Scalar | None = None
    random: bool
    allowed: str = Field(description="The allowed values, in words.")
    min: StrictInt | StrictFloat | None = None
    max: StrictInt | StrictFloat | None = None
    multiple_of: int | None = None
    max_length: int | None = None
    choices: list[str] | None = None


class Workflow(_Out):
    name: str
    title: str
    description: str
    backends: list[str]
    lanes: list[str] | None
    params: dict[str, WorkflowParam]

    @classmethod
    def from_described(cls, described: dict[str, Any]) -> Workflow:
        return cls.model_validate(described)


class WorkflowList(_Out):
    workflows: list[Workflow]


class Lane(_Out):
    name: str
    depth: int = Field(
        ge=0,
        description="Jobs ready at the broker for the lane: its queue and, with model "
        "affinity, its models' queues.",
    )
    queued: int = Field(ge=0, description="Jobs of this frontend queued (the ledger).")
    running: int = Field(ge=0, description="Jobs of this frontend rendering (the ledger).")


class Queue(_Out):
    lanes: list[Lane]


class WorkerView(_Out):
    worker_id: str
    backend: str
    lanes: list[str]
    state: WorkerState
    job_id: str | None
    device: str | None
    vram_total: int | None = Field(description="Bytes.")
    vram_free: int | None = Field(description="Bytes.")
    models: list[str]
    healthy: bool
    completed: int
    seen_at: datetime


class WorkerList(_Out):
    workers: list[WorkerView]


class QuotaUsage(_Out):
    """The caller's limits and what is used of them today (UTC)."""

    tenant: str
    limits: QuotaSettings = Field(description="The tenant's quota settings.")
    tenant_images_today: int
    user_images_today: int
    user_in_flight: int
    tenant_pending: int
    tenant_images_left: int | None
    user_images_left: int | None
    user_in_flight_left: int | None
    resets_at: datetime


class Health(_Out):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict, description="`ok` or what failed.")


# -- admin ---------------------------------------------------------------------------


class KeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: StrictStr = Field(pattern=TENANT_PATTERN, description="The tenant the key acts for.")
    name: StrictStr | None = Field(default=None, max_length=100, description="A note for admins.")


class KeyView(_Out):
    key_id: str
    tenant: str
    name: str | None
    created_at: datetime
    revoked_at: datetime | None


class KeyCreated(KeyView):
    key: str = Field(description="The key. Shown this once: only its hash is stored.")


class KeyList(_Out):
    keys: list[KeyView]


class QuotaChange(BaseModel):
    """Limits to change (the others stay). ``null`` means no limit."""

    model_config = ConfigDict(extra="forbid")

    images_per_day: int | None = Field(default=None, ge=0)
    images_per_user_per_day: int | None = Field(default=None, ge=0)
    concurrent_per_user: int | None = Field(default=None, ge=0)
    pending_per_tenant: int | None = Field(default=None, ge=0)
    max_steps: int | None = Field(default=None, ge=1)
    max_pixels: int | None = Field(default=None, ge=1)
    max_count: int | None = Field(default=None, ge=1)
    workflows: list[StrictStr] | None = None
    lanes: list[StrictStr] | None = None
    models: list[StrictStr] | None = None
    banned_words: list[StrictStr] | None = None
    nsfw_workflows: list[StrictStr] | None = None

    @field_validator("workflows", "lanes", "models", "banned_words", "nsfw_workflows")
    @classmethod
    def _encodable(cls, items: list[str] | None) -> list[str] | None:
        # JSON can carry a lone surrogate ("\ud800"): stored, it could never be sent back.
        for item in items or ():
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{item!r} contains an unpaired surrogate") from None
        return items


class TenantQuota(_Out):
    tenant: str
    limits: QuotaSettings


class InputImageView(_Out):
    """An uploaded input image: send ``key`` as the workflow's image parameter."""

    key: str = Field(description="Put this in `params` under the workflow's image parameter.")
    content_type: str
    width: int
    height: int
    bytes: int
