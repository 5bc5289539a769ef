"""Typed traffic over a :class:`~jobs.broker.Broker`: jobs go to lanes, events go home.

Every service talks to the broker through this module, so routing (which exchange,
which key, persistent or not, what may be dropped) is decided in one place.
"""

from __future__ import annotations

from collections.abc import Iterable

import structlog

from jobs.broker import Broker, Handler, Subscription
from jobs.exceptions import JobsError
from jobs.models import Control, Event, Heartbeat, Job
from jobs.topology import Topology

log = structlog.get_logger(__name__)


class JobBus:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    @property
    def topology(self) -> Topology:
        return self.broker.topology

    async def submit(self, job: Job) -> None:
        """Publish a job to its lane, persistent and confirmed. Raises on failure."""
        self.topology.lane_queue(job.lane)  # an unknown lane is a bug upstream: fail loudly
        await self.broker.publish(
            self.topology.jobs_exchange,
            job.lane,
            job.to_wire(),
            persistent=True,
            mandatory=True,
            message_id=job.job_id,
        )

    async def emit(self, event: Event, reply_to: str) -> bool:
        """Publish an event to the frontend that owns the job.

        Persistent events raise on failure (the caller must not ack its job); droppable
        ones (progress, previews) are dropped on failure and the call returns False.
        """
        try:
            await self.broker.publish(
                self.topology.events_exchange,
                reply_to,
                event.to_wire(),
                persistent=event.persistent,
                mandatory=True,
                message_id=f"{event.job_id}:{event.attempt}:{event.seq}",
            )
        except JobsError as exc:
            if event.persistent:
                raise
            log.debug("event.dropped", job_id=event.job_id, type=event.type.value, error=str(exc))
            return False
        return True

    async def consume_jobs(
        self, lanes: Iterable[str], handler: Handler, *, prefetch: int
    ) -> list[Subscription]:
        return [
            await self.broker.consume(self.topology.lane_queue(lane), handler, prefetch=prefetch)
            for lane in lanes
        ]

    async def consume_events(
        self, frontend_id: str, handler: Handler, *, prefetch: int = 64
    ) -> Subscription:
        spec = self.topology.events_queue(frontend_id)
        await self.broker.declare_queue(spec)
        return await self.broker.consume(spec.name, handler, prefetch=prefetch)

    async def control(self, message: Control) -> None:
        """Tell every renderer. Nobody listening is fine: there is nothing to control."""
        await self.broker.publish(
            self.topology.control_exchange,
            "",
            message.to_wire(),
            persistent=False,
            mandatory=False,
        )

    async def consume_control(self, worker_id: str, handler: Handler) -> Subscription:
        spec = self.topology.control_queue(worker_id)
        await self.broker.declare_queue(spec)
        return await self.broker.consume(spec.name, handler, prefetch=16)

    async def heartbeat(self, beat: Heartbeat) -> None:
        await self.broker.publish(
            self.topology.heartbeats_exchange,
            "",
            beat.to_wire(),
            persistent=False,
            mandatory=False,
        )

    async def consume_heartbeats(self, frontend_id: str, handler: Handler) -> Subscription:
        spec = self.topology.heartbeats_queue(frontend_id)
        await self.broker.declare_queue(spec)
        return await self.broker.consume(spec.name, handler, prefetch=64)
