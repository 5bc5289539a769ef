"""Admission: the only way a job enters the system.

``submit`` validates a request against the workflow's manifest and the tenant's quota
rules, then writes the ledger row and reserves the tenant's quota in one transaction
(:class:`~jobs.quotas.QuotaExceeded` when a counted limit is reached: nothing written),
then publishes with a publisher confirm, then marks the row published. The idempotency
key (a Discord interaction id, an HTTP ``Idempotency-Key``) makes a retried submit return
the job already admitted instead of a second one.

Nothing is written or queued for a request that fails validation. A publish that fails
removes the row again, so the caller can simply retry. A crash between the write and
the confirm leaves an unpublished row: a retried submit with the same key, or
:meth:`Admission.recover` at start-up, publishes it (the renderer is idempotent by job
id, so a job published twice renders once for the user).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass

import structlog

from jobs.affinity import AFFINITY_FOLDERS
from jobs.bus import JobBus
from jobs.exceptions import InvalidRequest, JobsError
from jobs.ledger import Claim, JobRecord, Ledger
from jobs.models import Job, JobRequest, Origin
from jobs.quotas import QuotaExceeded, QuotaSettings, check_paused, check_request
from jobs.settings import FairSettings
from workflows import Catalog, FieldError, ParameterError, Template, UnknownWorkflow

log = structlog.get_logger(__name__)

#: Longest idempotency key we store: Discord snowflakes and UUIDs are far shorter.
MAX_IDEMPOTENCY_KEY = 200


@dataclass(frozen=True, slots=True)
class Admitted:
    job: Job
    #: False when the idempotency key was seen before and this is the earlier job.
    created: bool
    record: JobRecord


class Admission:
    def __init__(
        self,
        catalog: Catalog,
        ledger: Ledger,
        bus: JobBus,
        *,
        backends: Sequence[str] | None = None,
        quota_defaults: QuotaSettings | None = None,
        fair: FairSettings | None = None,
        workers: Callable[[str], int] | None = None,
    ) -> None:
        self._catalog = catalog
        #: Limits of tenants without their own; None turns quotas off (the CLI).
        self._quota_defaults = quota_defaults
        self._ledger = ledger
        self._bus = bus
        #: Backends some renderer runs; None = do not check (workers may come later).
        self._backends = set(backends) if backends is not None else None
        self._fair = fair or FairSettings(_env_file=None)
        self._workers = workers
        self._wake = asyncio.Event()
        self._releaser: asyncio.Task[None] | None = None

    @property
    def lanes(self) -> tuple[str, ...]:
        return self._bus.topology.lanes

    async def depths(self) -> dict[str, int]:
        """Jobs waiting in each lane's queue at the broker, every frontend's included
        (not those a renderer already holds)."""
        return {lane: await self._bus.depth(lane) for lane in self.lanes}

    def validate(
        self,
        request: JobRequest,
        *,
        idempotency_key: str,
        origin: Origin,
        quota: QuotaSettings | None = None,
        templates: Mapping[str, Template] | None = None,
    ) -> Job:
        """Check ``request`` (against ``quota``'s rules too, when given) and build the job
        it asks for. Raises :class:`InvalidRequest` naming every bad field and what is
        allowed there. ``templates``: the tenant's own workflows (a guild's), looked up
        before the catalog; a job for one carries its template to the renderer."""
        errors: list[FieldError] = []
        if not idempotency_key or len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
            errors.append(
                FieldError(
                    "idempotency_key",
                    f"idempotency_key: must be 1 to {MAX_IDEMPOTENCY_KEY} characters",
                )
            )
        lane = request.lane or self.lanes[0]
        if lane not in self.lanes:
            errors.append(
                FieldError(
                    "lane", f"lane: {lane!r} is not a lane (allowed: {', '.join(self.lanes)})"
                )
            )
        own = (templates or {}).get(request.workflow)
        try:
            template = own or self._catalog.get(request.workflow)
        except UnknownWorkflow as exc:
            errors.append(FieldError("workflow", f"workflow: {exc}"))
            raise InvalidRequest(errors) from exc
        if own is not None and quota is not None and quota.workflows is not None:
            quota = quota.model_copy(update={"workflows": None})  # its admins added it
        manifest = template.manifest
        if manifest.lanes is not None and lane in self.lanes and lane not in manifest.lanes:
            errors.append(
                FieldError(
                    "lane",
                    f"lane: workflow {manifest.name!r} does not run on {lane!r} "
                    f"(allowed: {', '.join(manifest.lanes)})",
                )
            )
        if self._backends is not None and not self._backends & set(manifest.backends):
            errors.append(
                FieldError(
                    "workflow",
                    f"workflow: {manifest.name!r} needs a {' or '.join(manifest.backends)} "
                    f"renderer and none is configured here",
                )
            )
        try:
            params = template.resolve(request.role_values())
        except ParameterError as exc:
            errors.extend(exc.errors)
            raise InvalidRequest(errors) from exc
        job = Job(
            workflow=manifest.name,
            lane=lane,
            params=params,
            origin=origin,
            idempotency_key=idempotency_key,
            template=own.documents() if own is not None else None,
            model=next(
                (
                    value
                    for name, param in manifest.params.items()
                    if param.folder in AFFINITY_FOLDERS
                    and isinstance(value := params.get(name), str)
                ),
                None,
            ),
        )
        if quota is not None:
            folders = {
                name: param.folder
                for name, param in manifest.params.items()
                if param.folder is not None
            }
            errors.extend(check_request(quota, job, folders))
        if errors:
            raise InvalidRequest(errors)
        return job

    async def quota_for(self, origin: Origin) -> QuotaSettings | None:
        """The limits that apply to ``origin``'s tenant, or None (no tenant, no quotas)."""
        if origin.tenant is None or self._quota_defaults is None:
            return None
        return await self._ledger.quota(origin.tenant, self._quota_defaults)

    async def submit(
        self,
        request: JobRequest,
        *,
        idempotency_key: str,
        origin: Origin,
        templates: Mapping[str, Template] | None = None,
    ) -> Admitted:
        """Admit ``request`` once per ``idempotency_key``. See the module docstring.
        ``templates``: the tenant's own workflows (see :meth:`validate`)."""
        started = time.perf_counter()
        quota = await self.quota_for(origin)
        try:
            if quota is not None:
                check_paused(quota)
            job = self.validate(
                request,
                idempotency_key=idempotency_key,
                origin=origin,
                quota=quota,
                templates=templates,
            )
        except (InvalidRequest, QuotaExceeded):
            # A retry of a submit that was admitted before (the rules may have changed,
            # or admissions been paused, since) still gets its job.
            existing = await self._ledger.get_by_key(idempotency_key)
            if existing is None:
                raise
            return await self._again(existing)
        record, created, claim = await self._ledger.admit(job, quota, window=self.window(job.lane))
        if not created:  # this key was admitted before: that job is the answer
            return await self._again(record)
        try:
            released = await self._publish_claimed(claim)
            if claim.more:
                released += await self.release(job.lane)
        except JobsError:
            # The broker is not there: not admitted, nothing left behind (a job released
            # before it failed stays). A cancelled submit keeps its row instead: the broker
            # may have taken it, and a later release decides. This job may itself have been
            # published before another one's publish failed: then it is admitted.
            current = await self._ledger.get(job.job_id)
            if current is None or not current.published:
                await self._ledger.forget(job.job_id)
                raise
            released = [job.job_id]
        published = job.job_id in released
        log.info(
            "job.admitted",
            job_id=job.job_id,
            workflow=job.workflow,
            lane=job.lane,
            frontend=origin.frontend,
            held=not published,
            seconds=round(time.perf_counter() - started, 4),
        )
        return Admitted(job, True, record.as_published() if published else record)

    async def _again(self, record: JobRecord) -> Admitted:
        # Held, or its first submit died before the confirm: release what has room.
        if not record.published and record.job.job_id in await self.release(record.job.lane):
            record = record.as_published()
        return Admitted(record.job, False, record)

    def window(self, lane: str) -> int:
        """How many of this frontend's jobs may wait in ``lane``'s queue at once."""
        workers = self._workers(lane) if self._workers is not None else 0
        return max(self._fair.window_min, self._fair.window_per_worker * workers)

    async def release(self, lane: str) -> list[str]:
        """Publish held jobs of ``lane`` in fair order while the window has room; the ids
        published. Raises :class:`JobsError` when the broker refuses (the job that failed
        and those after it stay held)."""
        # No lock: each claim is one SQLite transaction, so concurrent releases (submits
        # in parallel, the releaser) take different jobs and their publishes overlap.
        published: list[str] = []
        while True:
            claim = await self._ledger.release(lane, self.window(lane))
            published += await self._publish_claimed(claim)
            if not claim.more:
                return published

    async def _publish_claimed(self, claim: Claim) -> list[str]:
        """Publish what a release claimed, in order; the ids published. On a refusal the
        job and those after it are unclaimed and the error raised."""
        published: list[str] = []
        claimed = claim.records
        for index, record in enumerate(claimed):
            try:
                await self._bus.submit(record.job)
            except BaseException:
                for rest in claimed[index:]:
                    await self._ledger.unclaim(rest.job.job_id)
                raise
            self._ledger.confirmed(record.job.job_id)  # written in the background
            published.append(record.job.job_id)
        return published

    def wake(self) -> None:
        """Something changed (a job started or ended): release what now has room."""
        self._wake.set()

    async def start(self) -> None:
        """Release held jobs when woken and every ``FAIR_RELEASE_SECONDS`` (workers come
        and go, other frontends' jobs leave the queue, a claim may have lapsed)."""
        self._releaser = asyncio.create_task(self._release_forever(), name="fair-release")

    async def stop(self) -> None:
        task, self._releaser = self._releaser, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _release_forever(self) -> None:
        while True:
            with suppress(TimeoutError):
                async with asyncio.timeout(self._fair.release_seconds):
                    await self._wake.wait()
            self._wake.clear()
            for lane in self.lanes:
                try:
                    await self.release(lane)
                except JobsError as exc:
                    log.warning("admission.release_failed", lane=lane, error=str(exc))

    async def recover(self) -> int:
        """Publish what a crash left unpublished, and held jobs, as the windows allow.
        Returns how many."""
        count = 0
        for lane in self.lanes:
            try:
                count += len(await self.release(lane))
            except JobsError as exc:
                log.warning("admission.release_failed", lane=lane, error=str(exc))
        return count
