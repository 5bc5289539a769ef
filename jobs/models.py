"""The job contract every service shares: requests, jobs and the events about them.

Everything here crosses a process boundary as JSON, so every model carries
``schema_version`` and every enum is a ``(str, Enum)``. Readers accept the versions they
know and reject the rest loudly (:func:`parse_event`, :meth:`Job.from_wire`).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, TypeAdapter

SCHEMA_VERSION = 1

#: A parameter value as it travels: strict, so a list or an object is never a prompt.
Scalar = StrictStr | StrictInt | StrictFloat | bool


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_job_id() -> str:
    """A lowercase UUID: ComfyUI takes it as ``prompt_id`` as is."""
    return str(uuid.uuid4())


class _Wire(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", ser_json_bytes="base64", val_json_bytes="base64"
    )


class Origin(_Wire):
    """Who asked, and where the answer goes. Frontends fill it; users never do."""

    frontend: Literal["discord", "api", "cli"] = "cli"
    #: The frontend instance whose event queue receives this job's events.
    reply_to: StrictStr = "cli"
    tenant: StrictStr | None = Field(default=None, description="Discord guild id or API tenant")
    user: StrictStr | None = None
    channel: StrictStr | None = None
    message: StrictStr | None = None
    #: The channel is age-restricted (NSFW-only workflows are allowed only there).
    age_restricted: bool = False


class JobRequest(_Wire):
    """What a user asks for. Every field but ``workflow`` and ``prompt`` is optional: the
    workflow's manifest supplies defaults and bounds, and admission checks them."""

    workflow: StrictStr = Field(min_length=1, max_length=64)
    prompt: StrictStr
    negative: StrictStr | None = None
    seed: StrictInt | None = None
    steps: StrictInt | None = None
    cfg: StrictFloat | StrictInt | None = None
    width: StrictInt | None = None
    height: StrictInt | None = None
    count: StrictInt | None = Field(default=None, description="images per job (the batch role)")
    checkpoint: StrictStr | None = None
    lane: StrictStr | None = None
    #: Template-specific parameters beyond the standard roles, by manifest name.
    params: dict[StrictStr, Scalar] = Field(default_factory=dict)

    def role_values(self) -> dict[str, Any]:
        """The request as ``{role: value}``, leaving out what the user did not set."""
        roles: dict[str, Any] = dict(self.params)
        for role, attr in _REQUEST_ROLES.items():
            value = getattr(self, attr)
            if value is not None:
                roles[role] = value
        return roles


#: Manifest role name -> JobRequest attribute.
_REQUEST_ROLES = {
    "prompt": "prompt",
    "negative": "negative",
    "seed": "seed",
    "steps": "steps",
    "cfg": "cfg",
    "width": "width",
    "height": "height",
    "batch": "count",
    "checkpoint": "checkpoint",
}


def request_fields(roles: Mapping[str, Scalar]) -> dict[str, Any]:
    """``JobRequest`` fields that ask for ``roles`` (a job's params, say, to ask again
    for what it asked for): the standard roles as their fields, the rest in ``params``;
    the inverse of :meth:`JobRequest.role_values`."""
    fields: dict[str, Any] = {"params": {}}
    for role, value in roles.items():
        if role in _REQUEST_ROLES:
            fields[_REQUEST_ROLES[role]] = value
        else:
            fields["params"][role] = value
    return fields


class Job(_Wire):
    """An admitted request: validated, defaults applied, seed chosen, id assigned."""

    schema_version: Literal[1] = 1
    job_id: StrictStr = Field(default_factory=new_job_id)
    workflow: StrictStr
    lane: StrictStr
    #: Every role of the workflow, resolved and within bounds.
    params: dict[StrictStr, Scalar]
    origin: Origin = Field(default_factory=Origin)
    idempotency_key: StrictStr
    created_at: datetime = Field(default_factory=utcnow)
    #: Times an admin sent it back from the dead-letter queue. Attempts keep counting up
    #: across retries (see :meth:`attempt`), so a frontend never takes a retry's events
    #: for stale frames of the first run.
    retries: Annotated[StrictInt, Field(ge=0)] = 0
    #: A tenant's own workflow travels with its jobs: ``{"manifest": {...}, "graph":
    #: {...}}``, checked again by the renderer (``Template.from_documents``). None: the
    #: workflow is in every renderer's catalog.
    template: dict[StrictStr, Any] | None = None
    #: The model file it needs loaded (its checkpoint or diffusion model), for model
    #: affinity; None: any renderer of its lane suits it equally.
    model: StrictStr | None = None

    def attempt(self, delivery_count: int, delivery_limit: int) -> int:
        """The attempt number of a delivery: 1 for the first, growing across retries."""
        return self.retries * (delivery_limit + 1) + delivery_count + 1

    @property
    def prompt(self) -> str:
        return str(self.params.get("prompt", ""))

    @property
    def seed(self) -> int | None:
        seed = self.params.get("seed")
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None

    def to_wire(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_wire(cls, body: bytes) -> Job:
        return cls.model_validate_json(body)


class JobStatus(str, Enum):
    """A job's life in the ledger. Terminal states never change again."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED)


class FailureReason(str, Enum):
    INVALID = "invalid"
    OOM = "oom"
    BACKEND_DOWN = "backend_down"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    INTERNAL = "internal"


class EventType(str, Enum):
    ACCEPTED = "accepted"
    PROGRESS = "progress"
    PREVIEW = "preview"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class _Event(_Wire):
    schema_version: Literal[1] = 1
    job_id: StrictStr
    #: 1 for the first delivery of the job, 2 for the first redelivery, ...
    attempt: StrictInt = Field(ge=1)
    worker_id: StrictStr
    #: Monotonic per (job, attempt, worker): consumers drop anything not newer.
    seq: StrictInt = Field(ge=0)
    at: datetime = Field(default_factory=utcnow)

    @property
    def persistent(self) -> bool:
        """Whether losing this event would lose information (the others may be dropped)."""
        return True

    @property
    def terminal(self) -> bool:
        return False

    def to_wire(self) -> bytes:
        return self.model_dump_json().encode()


class Accepted(_Event):
    type: Literal[EventType.ACCEPTED] = EventType.ACCEPTED
    gpu: StrictStr | None = None


class Progress(_Event):
    type: Literal[EventType.PROGRESS] = EventType.PROGRESS
    step: StrictInt = Field(ge=0)
    total: StrictInt = Field(ge=1)
    node: StrictStr | None = None
    elapsed: float = 0.0

    @property
    def persistent(self) -> bool:
        return False


class Preview(_Event):
    type: Literal[EventType.PREVIEW] = EventType.PREVIEW
    mime: StrictStr
    image: bytes
    step: StrictInt | None = None

    @property
    def persistent(self) -> bool:
        return False


class Output(_Wire):
    url: StrictStr
    key: StrictStr
    size: StrictInt
    width: StrictInt
    height: StrictInt
    content_type: StrictStr = "image/png"


class Succeeded(_Event):
    type: Literal[EventType.SUCCEEDED] = EventType.SUCCEEDED
    outputs: list[Output]
    seed: StrictInt | None = None
    #: Seconds per phase: ``render``, ``upload`` and whatever the backend measured.
    timings: dict[StrictStr, float] = Field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return True


class Failed(_Event):
    type: Literal[EventType.FAILED] = EventType.FAILED
    reason: FailureReason
    #: Safe to show a user: no paths, no tracebacks, no secrets.
    message: StrictStr

    @property
    def terminal(self) -> bool:
        return True


Event = Annotated[Accepted | Progress | Preview | Succeeded | Failed, Field(discriminator="type")]
_EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def parse_event(body: bytes) -> Event:
    """Decode one event from the wire. Raises ``pydantic.ValidationError`` when malformed."""
    return _EVENT_ADAPTER.validate_json(body)


class ControlAction(str, Enum):
    CANCEL = "cancel"
    #: Jobs were published to a model's queue (``lane``, ``model``): an idle renderer
    #: that can load the model looks at the model queues now rather than at its next
    #: poll (``renderer/affinity.py``). A hint: nothing depends on its arrival.
    WAKE = "wake"


class Control(_Wire):
    """A message to every renderer (the control fanout)."""

    schema_version: Literal[1] = 1
    action: ControlAction
    job_id: StrictStr | None = None
    requested_by: StrictStr | None = None
    #: A wake's lane and model file.
    lane: StrictStr | None = None
    model: StrictStr | None = None
    at: datetime = Field(default_factory=utcnow)

    def to_wire(self) -> bytes:
        return self.model_dump_json().encode()


class WorkerState(str, Enum):
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"
    STOPPED = "stopped"


class Heartbeat(_Wire):
    """What a renderer says about itself every few seconds (``/workers``, ``/queue``)."""

    schema_version: Literal[1] = 1
    worker_id: StrictStr
    backend: StrictStr
    lanes: list[StrictStr]
    state: WorkerState
    job_id: StrictStr | None = None
    device: StrictStr | None = None
    vram_total: StrictInt | None = None
    vram_free: StrictInt | None = None
    models: list[StrictStr] = Field(default_factory=list)
    #: The last measured load time of model files, seconds (ComfyUI: how long each loader
    #: node ran; a cached loader loads nothing), so scheduling by model is measured.
    model_load_seconds: dict[StrictStr, float] = Field(default_factory=dict)
    #: Model files the renderer can load, per ComfyUI models folder (``checkpoints``,
    #: ``loras``, ...), as its ComfyUI lists them: what the bot suggests to users.
    available_models: dict[StrictStr, list[StrictStr]] = Field(default_factory=dict)
    healthy: bool = True
    #: Times this renderer's supervisor restarted its ComfyUI (0 when it runs none).
    restarts: StrictInt = 0
    completed: StrictInt = 0
    #: Seconds until the next heartbeat: a worker silent for 3 intervals is gone.
    interval: float
    at: datetime = Field(default_factory=utcnow)

    def to_wire(self) -> bytes:
        return self.model_dump_json().encode()
