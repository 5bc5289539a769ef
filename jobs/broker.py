"""The broker interface: what every service needs from a message broker, and no more.

Two adapters implement it: :class:`jobs.rabbitmq.RabbitBroker` (aio-pika, production) and
:class:`jobs.memory.MemoryBroker` (in-process, the embedded mode). The same contract
tests run against both (``tests/test_broker_contract.py``).

Delivery semantics, shared by both:

* A message is delivered to one consumer of a queue at a time, at most ``prefetch``
  unsettled per consumer.
* The consumer settles each delivery exactly once: :meth:`Delivery.ack` (done),
  :meth:`Delivery.requeue` (try again; counts towards the queue's delivery limit) or
  :meth:`Delivery.dead_letter` (never again; goes to the dead-letter exchange with reason
  ``rejected``).
* A delivery left unsettled when its connection closes is returned to the queue and
  counts as a failed delivery. ``Delivery.delivery_count`` is 0 on the first delivery.
* Past the delivery limit the broker dead-letters the message with reason
  ``delivery_limit`` instead of delivering it again.
* A handler that raises without settling its delivery has it requeued.
* A queue with a message TTL dead-letters (reason ``expired``) each message that waited
  there that long, to its dead-letter exchange with its dead-letter routing key, if any;
  a returned delivery keeps its first expiry.
* ``publish(..., mandatory=True)`` raises :class:`Unroutable` when no queue took the
  message, and returns only once the broker has confirmed it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from jobs.topology import QueueSpec, Topology

#: Header names the broker sets on dead-lettered messages (RabbitMQ's names).
FIRST_DEATH_REASON = "x-first-death-reason"
DELIVERY_COUNT = "x-delivery-count"


class Delivery(ABC):
    """One delivered message, to be settled once."""

    body: bytes
    headers: Mapping[str, Any]
    message_id: str | None
    #: 0 on the first delivery, n on the n-th redelivery.
    delivery_count: int

    @property
    @abstractmethod
    def settled(self) -> bool: ...

    @abstractmethod
    async def ack(self) -> None: ...

    @abstractmethod
    async def requeue(self) -> None: ...

    @abstractmethod
    async def dead_letter(self) -> None: ...

    @property
    def death_reason(self) -> str | None:
        """Why the broker dead-lettered this message last (``delivery_limit``,
        ``rejected``, ``expired``): a job may have expired from its model's queue before
        it died in its lane's. ``x-death`` lists the deaths, the latest first."""
        deaths = self.headers.get("x-death")
        latest = deaths[0] if isinstance(deaths, list) and deaths else None
        reason = latest.get("reason") if isinstance(latest, Mapping) else None
        if reason is None:
            reason = self.headers.get(FIRST_DEATH_REASON)
        if isinstance(reason, bytes):
            return reason.decode()
        return reason if isinstance(reason, str) else None


Handler = Callable[[Delivery], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class QueueInfo:
    #: Messages ready (not counting those delivered and unsettled).
    messages: int
    #: Consumers subscribed now.
    consumers: int


class Subscription(ABC):
    """A running consumer."""

    @abstractmethod
    async def cancel(self) -> None:
        """Stop receiving new deliveries. Deliveries in hand may still be settled."""


class Broker(ABC):
    """A connection to a broker, bound to one :class:`Topology`."""

    topology: Topology

    @abstractmethod
    async def connect(self) -> None: ...

    @abstractmethod
    async def close(self) -> None:
        """Close; unsettled deliveries go back to their queues. Safe to call twice."""

    @abstractmethod
    async def declare_queue(self, spec: QueueSpec) -> None:
        """Declare one queue and its bindings (idempotent)."""

    async def declare(self, extra: Iterable[QueueSpec] = ()) -> None:
        """Declare the whole topology, then ``extra`` queues. Idempotent."""
        await self._declare_exchanges()
        for spec in (*self.topology.queues, *extra):
            await self.declare_queue(spec)

    @abstractmethod
    async def _declare_exchanges(self) -> None: ...

    @abstractmethod
    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        persistent: bool = True,
        mandatory: bool = True,
        message_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> None:
        """Publish and wait for the broker's confirm.

        Raises :class:`Unroutable` (mandatory and no queue matched) or
        :class:`BrokerUnavailable` (not connected, nacked, or no confirm in time).
        """

    async def reconnected(self, timeout: float) -> bool:
        """Wait, at most ``timeout`` seconds, until a connection lost since the last call
        is back with its channels restored; whether it is. True at once when nothing was
        lost (this base: a broker that does not reconnect)."""
        return True

    @abstractmethod
    async def consume(self, queue: str, handler: Handler, *, prefetch: int) -> Subscription:
        """Run ``handler`` for each delivery from ``queue``, each in its own task."""

    @abstractmethod
    async def get(self, queue: str) -> Delivery | None:
        """Take one message without a consumer (dead-letter inspection, admin retry)."""

    @abstractmethod
    async def inspect(self, queue: str) -> QueueInfo:
        """How many messages are ready in ``queue`` and how many consumers it has.
        Raises :class:`BrokerUnavailable` when there is no such queue."""

    async def depth(self, queue: str) -> int:
        """Messages ready in ``queue`` (not counting those delivered and unsettled)."""
        return (await self.inspect(queue)).messages

    @abstractmethod
    async def claim(self, name: str) -> bool:
        """Take the claim ``name`` for this connection, or False when another connection
        holds it. A claim lasts until :meth:`release` or until its connection closes
        (RabbitMQ: an exclusive queue of that name)."""

    @abstractmethod
    async def release(self, name: str) -> None:
        """Give up a claim this connection holds (nothing when it holds none)."""

    async def __aenter__(self) -> Broker:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
