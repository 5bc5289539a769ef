"""Typed traffic over a :class:`~jobs.broker.Broker`: jobs go to lanes, events go home.

Every service talks to the broker through this module, so routing (which exchange,
which key, persistent or not, what may be dropped) is decided in one place.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Collection, Iterable

import structlog

from jobs.broker import Broker, Handler, QueueInfo, Subscription
from jobs.exceptions import BrokerUnavailable, JobsError
from jobs.models import Control, ControlAction, Event, Heartbeat, Job
from jobs.topology import Topology

log = structlog.get_logger(__name__)

#: How long a lane's depth read from the broker answers again (:meth:`JobBus.depth`):
#: status pages and ``/queue status`` asking at once share one read.
DEPTH_FRESH_SECONDS = 1.0

#: At most one wake per lane and model in this long (:meth:`JobBus.submit`): an idle
#: renderer looks at the model queues at most every ``RENDERER_AFFINITY_POLL_SECONDS``
#: anyway, and sees every job waiting when it does.
WAKE_INTERVAL_SECONDS = 0.25

#: A job's publish that failed with the connection (a cut, a broker restart; a nack or
#: a missing confirm too) is tried again once the robust connection is back, for at
#: most this long in all (a confirm's timeout longer than this ends it) and at most
#: :data:`SUBMIT_TRIES` times (:meth:`JobBus.submit`): a short outage costs the user a
#: wait, not a "try again". Safe: a renderer takes a job id once, so a job whose lost
#: confirm hid a publish that did arrive runs once.
SUBMIT_RECONNECT_SECONDS = 5.0
SUBMIT_TRIES = 3


class JobBus:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        #: The model files some renderer of a lane can load, whose jobs may wait for one
        #: that has the model loaded (model affinity). Set by a frontend from the
        #: renderers' heartbeats; None = none: every job goes to its lane's queue.
        self.models: Callable[[str], Collection[str]] | None = None
        #: (lane, model) of the model queues this bus declared.
        self._declared: set[tuple[str, str]] = set()
        #: (lane, model) -> when this bus last sent a wake for it, and the wakes in flight.
        self._woken: dict[tuple[str, str], float] = {}
        self._waking: set[asyncio.Task[None]] = set()
        #: lane -> when its depth read began, and the read (:meth:`depth`).
        self._depths: dict[str, tuple[float, asyncio.Task[int]]] = {}

    @property
    def topology(self) -> Topology:
        return self.broker.topology

    async def submit(self, job: Job) -> None:
        """Publish a job to its lane, persistent and confirmed. Raises on failure.

        A job that goes to a model's queue also wakes the idle renderers (a ``wake`` on
        the control fanout, sent in the background, at most one per lane and model every
        :data:`WAKE_INTERVAL_SECONDS`): they then look at the model queues at once rather
        than at their next poll, which backs off while nothing waits.

        A publish that fails with the connection is tried again when the connection is
        back (:data:`SUBMIT_RECONNECT_SECONDS`, :data:`SUBMIT_TRIES`); then it raises."""
        self.topology.lane_queue(job.lane)  # an unknown lane is a bug upstream: fail loudly
        deadline = time.monotonic() + SUBMIT_RECONNECT_SECONDS
        for tries in itertools.count(1):
            try:
                key = await self.route(job)
                await self.broker.publish(
                    self.topology.jobs_exchange,
                    key,
                    job.to_wire(),
                    persistent=True,
                    mandatory=True,
                    message_id=job.job_id,
                )
                break
            except BrokerUnavailable as exc:
                if tries >= SUBMIT_TRIES:
                    raise
                # The connection may not have seen its loss yet: a moment, then wait for it.
                await asyncio.sleep(0.1 * tries)
                left = deadline - time.monotonic()
                if left <= 0 or not await self.broker.reconnected(left):
                    raise
                log.info("job.publish_again", job_id=job.job_id, tries=tries, error=str(exc))
        if key != job.lane and job.model is not None:
            self._wake(job.lane, job.model)

    def _wake(self, lane: str, model: str) -> None:
        now = time.monotonic()
        last = self._woken.get((lane, model))
        if last is not None and now - last < WAKE_INTERVAL_SECONDS:
            return
        self._woken[(lane, model)] = now
        task = asyncio.create_task(self._send_wake(lane, model), name=f"wake:{lane}:{model}")
        self._waking.add(task)
        task.add_done_callback(self._waking.discard)

    async def _send_wake(self, lane: str, model: str) -> None:
        try:
            await self.control(Control(action=ControlAction.WAKE, lane=lane, model=model))
        except JobsError as exc:  # a hint: renderers still poll
            log.debug("wake.dropped", lane=lane, model=model, error=str(exc))

    async def route(self, job: Job) -> str:
        """The routing key of ``job``: its model's queue when affinity is on and some
        renderer of its lane can load the model (the queue is declared first), else its
        lane's queue."""
        topology = self.topology
        if (
            not topology.affinity
            or job.model is None
            or self.models is None
            or job.model not in self.models(job.lane)
        ):
            return job.lane
        await self._declare_model(job.lane, job.model)
        return topology.model_key(job.lane, job.model)

    async def _declare_model(self, lane: str, model: str) -> str:
        spec = self.topology.model_queue(lane, model)
        if (lane, model) not in self._declared:
            await self.broker.declare_queue(spec)
            self._declared.add((lane, model))
        return spec.name

    async def depth(self, lane: str) -> int:
        """Jobs waiting for ``lane``'s renderers at the broker, every frontend's: in the
        lane's queue and, with model affinity, in the queues of the models its renderers
        can load (and of those this bus published to).

        With affinity that is one broker call per model, one after another, so callers
        share a read: one under way, or one that began less than
        :data:`DEPTH_FRESH_SECONDS` ago, answers them all (a failed read answers only
        those that waited for it)."""
        now = time.monotonic()
        known = self._depths.get(lane)
        if known is None or (
            known[1].done()
            and (known[1].exception() is not None or now - known[0] >= DEPTH_FRESH_SECONDS)
        ):
            known = (now, asyncio.create_task(self._read_depth(lane), name=f"depth:{lane}"))
            self._depths[lane] = known
        # Shielded: a caller that gives up does not cancel the read the others wait for.
        return await asyncio.shield(known[1])

    async def _read_depth(self, lane: str) -> int:
        depth = await self.broker.depth(self.topology.lane_queue(lane))
        if self.topology.affinity:
            models = {model for known, model in self._declared if known == lane}
            if self.models is not None:
                models |= set(self.models(lane))
            for model in sorted(models):
                depth += (await self.inspect_model(lane, model)).messages
        return depth

    async def inspect_model(self, lane: str, model: str) -> QueueInfo:
        """Jobs waiting for ``model`` in ``lane`` and the renderers that have it resident."""
        return await self.broker.inspect(await self._declare_model(lane, model))

    async def claim_model(self, model: str) -> bool:
        """Be the first renderer with ``model`` loaded (``Topology.model_claim``)."""
        return await self.broker.claim(self.topology.model_claim(model))

    async def release_model(self, model: str) -> None:
        await self.broker.release(self.topology.model_claim(model))

    async def consume_model(
        self, lane: str, model: str, handler: Handler, *, prefetch: int
    ) -> Subscription:
        """Take ``lane``'s jobs for ``model`` (a renderer that has it loaded)."""
        name = await self._declare_model(lane, model)
        return await self.broker.consume(name, handler, prefetch=prefetch)

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
