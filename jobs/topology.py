"""The queue topology, declared once as data and applied by a broker's ``declare()``.

::

    brigade.jobs (direct, key = lane) ──▶ brigade.jobs.<lane>   quorum, delivery limit,
                                                                  dead-letters at least once
    brigade.jobs (key = lane.model.<file>) ──▶ brigade.jobs.<lane>.model.<file>   quorum,
                          one per model file (model affinity, renderer/affinity.py); a job
                          waits there at most the affinity wait, then is dead-lettered to
                          its lane's queue, where any renderer takes it
    brigade.dlx (fanout) ──▶ brigade.jobs.dead                   kept for /queue retry
                         └─▶ brigade.jobs.dead.notices           read by every frontend's
                                                                  DeadLetterNotifier
    brigade.events (direct, key = frontend id) ──▶ brigade.events.<frontend id>
    brigade.control (fanout) ──▶ one queue per renderer (expires a minute after it goes)
    brigade.heartbeats (fanout) ──▶ one queue per frontend (short message TTL, expires)

Jobs and their terminal events are persistent messages on durable quorum queues; a
frontend's event queue outlives the frontend (it expires only after a long absence), so
a restarted bot picks up where it stopped.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

#: A quorum queue dead-letters a message once it has been returned more than this many
#: times (a crash mid-job is a return): deliveries = limit + 1.
DEFAULT_DELIVERY_LIMIT = 4
#: An event queue whose frontend has been gone this long is removed by the broker.
DEFAULT_EVENTS_QUEUE_EXPIRES_MS = 7 * 24 * 3600 * 1000
#: A heartbeat nobody read within this long is stale news: dropped by the broker.
HEARTBEAT_TTL_MS = 30_000
#: A renderer's control queue or a frontend's heartbeat queue unused this long goes.
PRIVATE_QUEUE_EXPIRES_MS = 60_000
#: A model queue unused this long (no job, no renderer) is removed by the broker.
MODEL_QUEUE_EXPIRES_MS = 24 * 3600 * 1000


class ExchangeKind(str, Enum):
    DIRECT = "direct"
    FANOUT = "fanout"


@dataclass(frozen=True, slots=True)
class ExchangeSpec:
    name: str
    kind: ExchangeKind
    durable: bool = True


@dataclass(frozen=True, slots=True)
class Binding:
    exchange: str
    routing_key: str = ""


@dataclass(frozen=True, slots=True)
class QueueSpec:
    name: str
    bindings: tuple[Binding, ...] = ()
    durable: bool = True
    quorum: bool = True
    #: Exclusive queues belong to one connection and vanish with it (control queues).
    exclusive: bool = False
    delivery_limit: int | None = None
    dead_letter_exchange: str | None = None
    #: The routing key of dead-lettered messages (None: the key they were published with).
    dead_letter_routing_key: str | None = None
    expires_ms: int | None = None
    #: Messages older than this are dropped unread (heartbeats are news, not history).
    message_ttl_ms: int | None = None

    def arguments(self) -> dict[str, Any]:
        """The ``x-`` arguments RabbitMQ needs for this queue."""
        # Always explicit: a broker whose default queue type is quorum would otherwise
        # make our private queues quorum queues too.
        args: dict[str, Any] = {"x-queue-type": "quorum" if self.quorum else "classic"}
        if self.delivery_limit is not None:
            args["x-delivery-limit"] = self.delivery_limit
        if self.dead_letter_exchange is not None:
            args["x-dead-letter-exchange"] = self.dead_letter_exchange
            if self.quorum:
                # At-most-once dead-lettering can lose a job that hit its limit.
                args["x-dead-letter-strategy"] = "at-least-once"
                args["x-overflow"] = "reject-publish"
            if self.dead_letter_routing_key is not None:
                args["x-dead-letter-routing-key"] = self.dead_letter_routing_key
        if self.expires_ms is not None:
            args["x-expires"] = self.expires_ms
        if self.message_ttl_ms is not None:
            args["x-message-ttl"] = self.message_ttl_ms
        return args


@dataclass(frozen=True, slots=True)
class Topology:
    """Every name the services agree on. Build it with :func:`build_topology`."""

    prefix: str
    lanes: tuple[str, ...]
    delivery_limit: int
    events_queue_expires_ms: int
    #: How long a job waits in its model's queue before any renderer may take it; 0 =
    #: no model affinity (every job goes straight to its lane's queue).
    affinity_wait_ms: int = 0
    exchanges: tuple[ExchangeSpec, ...] = field(default=())
    queues: tuple[QueueSpec, ...] = field(default=())

    @property
    def jobs_exchange(self) -> str:
        return f"{self.prefix}.jobs"

    @property
    def events_exchange(self) -> str:
        return f"{self.prefix}.events"

    @property
    def control_exchange(self) -> str:
        return f"{self.prefix}.control"

    @property
    def heartbeats_exchange(self) -> str:
        return f"{self.prefix}.heartbeats"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.prefix}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.prefix}.jobs.dead"

    @property
    def dead_letter_notices(self) -> str:
        return f"{self.prefix}.jobs.dead.notices"

    def lane_queue(self, lane: str) -> str:
        if lane not in self.lanes:
            raise ValueError(f"unknown lane {lane!r} (lanes: {', '.join(self.lanes)})")
        return f"{self.prefix}.jobs.{lane}"

    @property
    def affinity(self) -> bool:
        return self.affinity_wait_ms > 0

    def model_key(self, lane: str, model: str) -> str:
        """The routing key (and queue name suffix) of ``model``'s jobs in ``lane``."""
        self.lane_queue(lane)
        return f"{lane}.model.{_slug(model)}"

    def model_claim(self, model: str) -> str:
        """The claim (``Broker.claim``) a renderer holds while it is the first to have
        ``model`` loaded, so two idle renderers never switch to the same model at once."""
        return f"{self.prefix}.claims.{_slug(model)}"

    def model_queue(self, lane: str, model: str) -> QueueSpec:
        """The queue where ``lane``'s jobs for ``model`` wait for a renderer that has it
        loaded, at most :attr:`affinity_wait_ms`; then the broker dead-letters them to the
        lane's queue (a job that exhausts its deliveries here goes there too, and meets
        the lane's own delivery limit and dead-letter queue)."""
        key = self.model_key(lane, model)
        return QueueSpec(
            name=f"{self.prefix}.jobs.{key}",
            bindings=(Binding(self.jobs_exchange, key),),
            delivery_limit=self.delivery_limit,
            dead_letter_exchange=self.jobs_exchange,
            dead_letter_routing_key=lane,
            expires_ms=MODEL_QUEUE_EXPIRES_MS,
            message_ttl_ms=self.affinity_wait_ms,
        )

    def events_queue(self, frontend_id: str) -> QueueSpec:
        """The durable event queue of one frontend instance (declared by that frontend)."""
        return QueueSpec(
            name=f"{self.prefix}.events.{frontend_id}",
            bindings=(Binding(self.events_exchange, frontend_id),),
            expires_ms=self.events_queue_expires_ms,
        )

    def control_queue(self, worker_id: str) -> QueueSpec:
        """A renderer's private control queue. Not exclusive: it must outlive a dropped
        connection for the reconnect to find it (with its binding); it expires once
        its renderer has been gone a minute."""
        return QueueSpec(
            name=f"{self.prefix}.control.{worker_id}",
            bindings=(Binding(self.control_exchange),),
            durable=False,
            quorum=False,
            expires_ms=PRIVATE_QUEUE_EXPIRES_MS,
        )

    def heartbeats_queue(self, frontend_id: str) -> QueueSpec:
        """A frontend's private view of the fleet's heartbeats, while it is alive."""
        return QueueSpec(
            name=f"{self.prefix}.heartbeats.{frontend_id}",
            bindings=(Binding(self.heartbeats_exchange),),
            durable=False,
            quorum=False,
            expires_ms=PRIVATE_QUEUE_EXPIRES_MS,
            message_ttl_ms=HEARTBEAT_TTL_MS,
        )


def _slug(model: str) -> str:
    """A model file name made safe for a queue name, with a hash of the exact name so no
    two files share one."""
    digest = hashlib.sha256(model.encode()).hexdigest()[:12]
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", model.rsplit("/", 1)[-1])[:60]
    return f"{readable}.{digest}"


def build_topology(
    lanes: Iterable[str] = ("fast",),
    *,
    prefix: str = "brigade",
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
    events_queue_expires_ms: int = DEFAULT_EVENTS_QUEUE_EXPIRES_MS,
    affinity_wait_ms: int = 0,
) -> Topology:
    """The whole topology for these lanes. Tests pass a uuid ``prefix`` to stay apart."""
    lanes = tuple(dict.fromkeys(lanes))
    if not lanes:
        raise ValueError("at least one lane is needed")
    if delivery_limit < 0:
        raise ValueError("delivery_limit must be >= 0")
    if affinity_wait_ms < 0:
        raise ValueError("affinity_wait_ms must be >= 0")
    base = Topology(prefix, lanes, delivery_limit, events_queue_expires_ms, affinity_wait_ms)
    exchanges = (
        ExchangeSpec(base.jobs_exchange, ExchangeKind.DIRECT),
        ExchangeSpec(base.events_exchange, ExchangeKind.DIRECT),
        ExchangeSpec(base.control_exchange, ExchangeKind.FANOUT),
        ExchangeSpec(base.heartbeats_exchange, ExchangeKind.FANOUT),
        ExchangeSpec(base.dead_letter_exchange, ExchangeKind.FANOUT),
    )
    queues = (
        *(
            QueueSpec(
                name=base.lane_queue(lane),
                bindings=(Binding(base.jobs_exchange, lane),),
                delivery_limit=delivery_limit,
                dead_letter_exchange=base.dead_letter_exchange,
            )
            for lane in lanes
        ),
        QueueSpec(base.dead_letter_queue, (Binding(base.dead_letter_exchange),)),
        QueueSpec(base.dead_letter_notices, (Binding(base.dead_letter_exchange),)),
    )
    return Topology(
        prefix, lanes, delivery_limit, events_queue_expires_ms, affinity_wait_ms, exchanges, queues
    )
