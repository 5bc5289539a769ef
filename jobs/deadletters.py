"""Tells a job's frontend when the broker gave up on it.

The dead-letter exchange copies every dead job to two queues: ``…jobs.dead`` keeps it for
an admin's retry, ``…jobs.dead.notices`` is read here, by every frontend (competing
consumers, so one of them handles each notice). A job the renderer rejected on purpose
already has its ``failed`` event, with the real reason; a job the broker gave up on
(the delivery limit: renderers crashed or kept failing) gets one now. The tracker drops
the second ``failed`` if both arrive, so the user sees one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from pydantic import ValidationError

from jobs.broker import Delivery, Subscription
from jobs.bus import JobBus
from jobs.exceptions import Unroutable
from jobs.models import Failed, FailureReason, Job

log = structlog.get_logger(__name__)

#: ``worker_id`` of events the system itself publishes, not a renderer.
SYSTEM_WORKER = "brigade"
#: Dead jobs looked at, at most, to find one to retry.
DEAD_SCAN_LIMIT = 10_000


@asynccontextmanager
async def take_dead(
    bus: JobBus, job_id: str, *, limit: int = DEAD_SCAN_LIMIT
) -> AsyncIterator[Job | None]:
    """Find ``job_id`` in the dead-letter queue and hold it while the body runs.

    Yields the dead job (or None when it is not there). The scan holds every message it
    looked at unsettled; when the body returns, the found one is acked (it left the queue
    for good) and the others go back; when the body raises, all go back, so a retry that
    could not be published leaves the job where it was.
    """
    held: list[Delivery] = []
    found: Delivery | None = None
    job: Job | None = None
    try:
        for _ in range(limit):
            delivery = await bus.broker.get(bus.topology.dead_letter_queue)
            if delivery is None:
                break
            held.append(delivery)
            try:
                candidate = Job.from_wire(delivery.body)
            except ValidationError:
                continue
            if candidate.job_id == job_id:
                found, job = delivery, candidate
                break
        yield job
        if found is not None:
            await found.ack()
    finally:
        for delivery in reversed(held):
            if not delivery.settled:
                await delivery.requeue()


class DeadLetterNotifier:
    def __init__(self, bus: JobBus) -> None:
        self._bus = bus
        self._subscription: Subscription | None = None

    async def start(self) -> None:
        queue = self._bus.topology.dead_letter_notices
        self._subscription = await self._bus.broker.consume(queue, self._on_delivery, prefetch=16)

    async def stop(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            await subscription.cancel()

    async def _on_delivery(self, delivery: Delivery) -> None:
        reason = delivery.death_reason
        try:
            job = Job.from_wire(delivery.body)
        except ValidationError as exc:
            log.error("job.dead_unreadable", reason=reason, error=str(exc)[:500])
            await delivery.ack()
            return
        if reason == "rejected":
            await delivery.ack()
            return
        attempts = self._bus.topology.delivery_limit + 1
        event = Failed(
            job_id=job.job_id,
            attempt=job.attempt(attempts - 1, attempts - 1),
            worker_id=SYSTEM_WORKER,
            seq=0,
            reason=FailureReason.INTERNAL,
            message=(
                f"This job could not be rendered after {attempts} attempts and was set "
                "aside. An admin can retry it."
            ),
        )
        try:
            await self._bus.emit(event, job.origin.reply_to)
        except Unroutable:
            log.warning("job.dead_orphaned", job_id=job.job_id, reply_to=job.origin.reply_to)
        log.warning("job.failed", job_id=job.job_id, reason=reason, attempts=attempts)
        await delivery.ack()
