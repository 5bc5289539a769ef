"""The tenant routes: submit, read, list, cancel and follow jobs; workflows, the queue,
the workers and the caller's quota.

``POST /v1/jobs`` requires an ``Idempotency-Key`` header (1 to 128 printable ASCII
characters, a UUID is ideal). A client that retries a submit it has no answer for sends
the same key and gets the same job: ``202 Accepted`` the first time, ``200 OK`` (with
``Idempotent-Replayed: true``) for each replay. The key is scoped to the tenant, so two
tenants never share a job by chance. Reusing a key for a *different* request is ``422``
(the same key must mean the same request: ``idempotency-key-reused``). Making the header
optional would mean a retry after a lost answer queues a second job and spends the
quota twice; so it is required (``400`` without it).

A job of another tenant is answered ``404``, as an unknown one is: job ids never tell
whether they exist elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime

import structlog
from aiohttp import web
from pydantic import ValidationError

from api import events
from api.auth import tenant
from api.context import ApiState, state
from api.http import field_errors, json_response, read_json
from api.keys import Principal
from api.models import (
    Failure,
    JobList,
    JobTicket,
    JobView,
    Lane,
    Queue,
    QuotaUsage,
    WorkerList,
    WorkerView,
    Workflow,
    WorkflowList,
)
from api.problems import ApiProblem, bad_request, invalid, not_found, unavailable
from jobs.control import CancelOutcome
from jobs.exceptions import InvalidRequest, JobsError, PermanentError
from jobs.ledger import JobRecord
from jobs.models import Failed, JobRequest, JobStatus, Origin, Output, Succeeded
from jobs.quotas import QuotaExceeded
from storage import StorageError
from workflows import FieldError

log = structlog.get_logger(__name__)

#: Printable ASCII without spaces; the ledger stores ``api:<tenant>:<key>`` (≤ 200).
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,128}$")
#: Jobs a list returns at most.
MAX_LIST = 100
_DISCORD_TIME = re.compile(r"<t:(\d+):[A-Za-z]>")

routes = web.RouteTableDef()


def _links(job_id: str) -> tuple[str, str]:
    return f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/events"


async def _outputs(api: ApiState, outputs: list[Output]) -> list[Output]:
    """Outputs with fresh URLs where this process can sign them (presigned URLs expire)."""
    store = api.services.store
    if store is None:
        return outputs
    fresh = []
    for output in outputs:
        try:
            url = await store.url_for(output.key)
        except StorageError:
            url = output.url  # another store's key (another prefix): keep what the renderer said
        fresh.append(output.model_copy(update={"url": url}))
    return fresh


async def job_view(api: ApiState, record: JobRecord) -> JobView:
    job = record.job
    status_url, events_url = _links(job.job_id)
    terminal = record.terminal
    position = None
    if record.status is JobStatus.QUEUED:
        position = await api.services.ledger.position(job.job_id)
    return JobView(
        job_id=job.job_id,
        status=record.status,
        workflow=job.workflow,
        lane=job.lane,
        params=dict(job.params),
        created_at=job.created_at,
        updated_at=record.updated_at,
        position=position,
        attempt=record.attempt,
        worker_id=record.worker_id,
        outputs=await _outputs(api, terminal.outputs) if isinstance(terminal, Succeeded) else [],
        seed=terminal.seed if isinstance(terminal, Succeeded) else job.seed,
        timings=dict(terminal.timings) if isinstance(terminal, Succeeded) else {},
        failure=(
            Failure(reason=terminal.reason, message=terminal.message)
            if isinstance(terminal, Failed)
            else None
        ),
        status_url=status_url,
        events_url=events_url,
    )


async def _own_job(request: web.Request, principal: Principal) -> JobRecord:
    job_id = request.match_info["job_id"]
    record = await state(request).services.ledger.get(job_id)
    if (
        record is None
        or record.job.origin.frontend != "api"
        or record.job.origin.tenant != principal.tenant
    ):
        raise not_found(f"No job {job_id!r} for this key's tenant.")
    return record


#: Workflow roles that a request's field sets under another name (``count`` sets ``batch``).
_FIELD_OF_ROLE = {"batch": "count"}


def _request_fields(errors: list[FieldError], request: JobRequest) -> list[FieldError]:
    """``errors`` naming the fields the client sent rather than the workflow's roles."""
    named = []
    for error in errors:
        field = _FIELD_OF_ROLE.get(error.field)
        if field is None or getattr(request, field) is None:
            named.append(error)
            continue
        _, _, text = error.message.partition(":")  # "batch: ..." or the quota's "count: ..."
        named.append(FieldError(field, f"{field}:{text}"))
    return named


def _fingerprint(request: JobRequest) -> str:
    canonical = json.dumps(request.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _readable(message: str) -> str:
    """Quota messages are written for Discord; its ``<t:…:R>`` time markup becomes ISO."""
    return _DISCORD_TIME.sub(
        lambda m: datetime.fromtimestamp(int(m.group(1)), UTC).strftime("at %Y-%m-%dT%H:%M:%SZ"),
        message,
    )


@routes.post("/v1/jobs")
async def submit(request: web.Request) -> web.Response:
    api = state(request)
    principal = await tenant(request)
    metrics = api.metrics
    client_key = request.headers.get("Idempotency-Key")
    if client_key is None:
        metrics.rejections.labels("idempotency_key").inc()
        raise bad_request(
            "Idempotency-Key",
            "Idempotency-Key: this header is required; send a new unique value (a UUID) per "
            "job and the same value when retrying it",
        )
    if not IDEMPOTENCY_KEY.match(client_key):
        metrics.rejections.labels("idempotency_key").inc()
        raise bad_request(
            "Idempotency-Key", "Idempotency-Key: 1 to 128 printable ASCII characters, no spaces"
        )
    body = await read_json(request)
    try:
        job_request = JobRequest.model_validate(body)
    except ValidationError as exc:
        metrics.rejections.labels("invalid").inc()
        raise invalid(field_errors(exc, JobRequest)) from exc
    ledger_key = f"api:{principal.tenant}:{client_key}"
    origin = Origin(
        frontend="api",
        reply_to=api.services.tracker.frontend_id,
        tenant=principal.tenant,
        user=principal.key_id,
    )
    try:
        admitted = await api.services.admission.submit(
            job_request, idempotency_key=ledger_key, origin=origin
        )
    except InvalidRequest as exc:
        metrics.rejections.labels("invalid").inc()
        raise invalid(_request_fields(exc.errors, job_request)) from exc
    except QuotaExceeded as exc:
        metrics.rejections.labels(f"quota.{exc.limit}").inc()
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else {}
        raise ApiProblem(
            429,
            "quota-exceeded",
            "Quota exceeded",
            _readable(exc.message),
            limit=exc.limit,
            errors=[FieldError(exc.limit, f"{exc.limit}: {_readable(exc.message)}")],
            headers=headers,
        ) from exc
    except PermanentError as exc:  # Unroutable: the topology is not declared
        metrics.rejections.labels("unavailable").inc()
        log.error("api.submit_unroutable", error=str(exc))
        raise unavailable("The job queue is not set up; try again later.") from exc
    except JobsError as exc:
        metrics.rejections.labels("unavailable").inc()
        raise unavailable(f"The job queue did not take the job: {exc}") from exc
    job = admitted.job
    fingerprint = _fingerprint(job_request)
    stored = await api.services.db.remember(ledger_key, fingerprint, job.job_id)
    if stored != fingerprint:
        metrics.rejections.labels("idempotency_key_reused").inc()
        raise ApiProblem(
            422,
            "idempotency-key-reused",
            "This Idempotency-Key was used for another request",
            f"Idempotency-Key: {client_key!r} was used for a different request (job "
            f"{job.job_id}); use a new key for a new job",
            errors=[
                FieldError("Idempotency-Key", "Idempotency-Key: used before for another request")
            ],
        )
    status_url, events_url = _links(job.job_id)
    ticket = JobTicket(
        job_id=job.job_id,
        status=admitted.record.status,
        created_at=job.created_at,
        status_url=status_url,
        events_url=events_url,
    )
    headers = {"Location": status_url}
    if admitted.created:
        metrics.admissions.labels(job.lane, job.workflow).inc()
        return json_response(ticket, 202, headers)
    metrics.replays.inc()
    headers["Idempotent-Replayed"] = "true"
    return json_response(ticket, 200, headers)


def _query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        message = f"{name}: {raw!r} is not allowed (allowed: {low} to {high})"
        raise invalid([FieldError(name, message)])
    return value


@routes.get("/v1/jobs")
async def list_jobs(request: web.Request) -> web.Response:
    api = state(request)
    principal = await tenant(request)
    limit = _query_int(request, "limit", 20, 1, MAX_LIST)
    raw_status = request.query.get("status")
    status = None
    if raw_status is not None:
        try:
            status = JobStatus(raw_status)
        except ValueError as exc:
            allowed = ", ".join(s.value for s in JobStatus)
            message = f"status: {raw_status!r} is not allowed (allowed: {allowed})"
            raise invalid([FieldError("status", message)]) from exc
    records = await api.services.ledger.recent(
        principal.tenant, frontend="api", limit=limit, status=status
    )
    return json_response(JobList(jobs=[await job_view(api, record) for record in records]))


@routes.get("/v1/jobs/{job_id}")
async def get_job(request: web.Request) -> web.Response:
    principal = await tenant(request)
    record = await _own_job(request, principal)
    return json_response(await job_view(state(request), record))


@routes.delete("/v1/jobs/{job_id}")
async def cancel_job(request: web.Request) -> web.Response:
    api = state(request)
    principal = await tenant(request)
    record = await _own_job(request, principal)
    job_id = record.job.job_id
    try:
        outcome = await api.services.control.cancel(job_id, requested_by=f"api:{principal.key_id}")
    except JobsError as exc:
        raise unavailable(f"The cancel was not sent: {exc}") from exc
    if outcome is CancelOutcome.ALREADY_FINISHED:
        raise ApiProblem(
            409,
            "job-finished",
            "The job has already finished",
            f"Job {job_id} is {record.status.value}; there is nothing to cancel.",
        )
    if outcome is CancelOutcome.NOT_FOUND:  # pragma: no cover - _own_job found it
        raise not_found(f"No job {job_id!r} for this key's tenant.")
    current = await api.services.ledger.get(job_id) or record
    return json_response(await job_view(api, current))


# No HEAD: it would hold a stream open until the job ends, to send nothing.
@routes.get("/v1/jobs/{job_id}/events", allow_head=False)
async def job_events(request: web.Request) -> web.StreamResponse:
    api = state(request)
    principal = await tenant(request)
    record = await _own_job(request, principal)

    async def view(current: JobRecord) -> JobView:
        return await job_view(api, current)

    return await events.stream(request, api, record, view)


@routes.get("/v1/workflows")
async def workflows(request: web.Request) -> web.Response:
    await tenant(request)
    catalog = state(request).services.catalog
    listed = [Workflow.model_validate(template.describe()) for template in catalog]
    return json_response(WorkflowList(workflows=sorted(listed, key=lambda w: w.name)))


@routes.get("/v1/queue")
async def queue(request: web.Request) -> web.Response:
    await tenant(request)
    return json_response(await read_queue(state(request)))


async def read_queue(api: ApiState) -> Queue:
    """Depth per lane (the broker) and this frontend's jobs per lane (the ledger)."""
    bus = api.services.bus
    counts = await api.services.ledger.counts()
    lanes = []
    for lane in bus.topology.lanes:
        try:
            depth = await bus.depth(lane)
        except Exception as exc:  # an adapter may raise its library's own errors
            raise unavailable(f"The broker did not answer: {exc}") from exc
        lanes.append(
            Lane(
                name=lane,
                depth=depth,
                queued=counts.get((lane, JobStatus.QUEUED.value), 0),
                running=counts.get((lane, JobStatus.RUNNING.value), 0),
            )
        )
    return Queue(lanes=lanes)


def read_workers(api: ApiState) -> WorkerList:
    return WorkerList(
        workers=[
            WorkerView(
                worker_id=beat.worker_id,
                backend=beat.backend,
                lanes=list(beat.lanes),
                state=beat.state,
                job_id=beat.job_id,
                device=beat.device,
                vram_total=beat.vram_total,
                vram_free=beat.vram_free,
                models=list(beat.models),
                healthy=beat.healthy,
                completed=beat.completed,
                seen_at=beat.at,
            )
            for beat in api.services.workers.workers()
        ]
    )


@routes.get("/v1/workers")
async def workers(request: web.Request) -> web.Response:
    await tenant(request)
    return json_response(read_workers(state(request)))


@routes.get("/v1/quota")
async def quota(request: web.Request) -> web.Response:
    api = state(request)
    principal = await tenant(request)
    defaults = api.services.quota_defaults
    limits = await api.services.ledger.quota(principal.tenant, defaults)
    usage = await api.services.ledger.usage(principal.tenant, principal.key_id, defaults)
    return json_response(
        QuotaUsage(
            tenant=principal.tenant,
            limits=limits,
            tenant_images_today=usage.tenant_images_today,
            user_images_today=usage.user_images_today,
            user_in_flight=usage.user_in_flight,
            tenant_pending=usage.tenant_pending,
            tenant_images_left=usage.tenant_images_left,
            user_images_left=usage.user_images_left,
            user_in_flight_left=usage.user_in_flight_left,
            resets_at=usage.resets_at,
        )
    )
