"""The in-process broker for the embedded mode: RabbitMQ's semantics, no server.

A :class:`MemoryHub` plays the server and holds every exchange and queue; each
:class:`MemoryBroker` is one connection to it. Closing a connection returns its
unsettled deliveries to their queues, counting a failed delivery, exactly as RabbitMQ
does for a quorum queue when a consumer's connection drops. Delivery limits and
dead-lettering (reasons ``delivery_limit``, ``rejected`` and ``expired``, with a queue's
dead-letter routing key) and per-queue message TTLs follow RabbitMQ too, so
the contract tests hold for both adapters.

Nothing here survives the process: the embedded mode trades durability for having no
services to run, and says so in the README.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from jobs.broker import (
    DELIVERY_COUNT,
    FIRST_DEATH_REASON,
    Broker,
    Delivery,
    Handler,
    QueueInfo,
    Subscription,
)
from jobs.exceptions import BrokerUnavailable, Unroutable
from jobs.topology import ExchangeKind, QueueSpec, Topology

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class _Message:
    body: bytes
    headers: dict[str, Any]
    message_id: str | None
    exchange: str
    routing_key: str
    delivery_count: int = 0
    #: ``time.monotonic()`` past which its queue's TTL dead-letters it (kept on return).
    expires_at: float | None = None


@dataclass(slots=True)
class _Exchange:
    kind: ExchangeKind
    bindings: list[tuple[str, str]] = field(default_factory=list)  # (queue, routing key)

    def route(self, routing_key: str) -> list[str]:
        if self.kind is ExchangeKind.FANOUT:
            return list(dict.fromkeys(queue for queue, _ in self.bindings))
        return list(dict.fromkeys(q for q, key in self.bindings if key == routing_key))


class _Queue:
    def __init__(self, hub: MemoryHub, spec: QueueSpec, owner: MemoryBroker | None) -> None:
        self.hub = hub
        self.spec = spec
        self.owner = owner
        self.ready: deque[_Message] = deque()
        self.consumers: list[_Consumer] = []
        self._next = itertools.count()

    def put(self, message: _Message, *, front: bool = False) -> None:
        ttl = self.spec.message_ttl_ms
        if ttl is not None:
            now = time.monotonic()
            if message.expires_at is None:
                message.expires_at = now + ttl / 1000
            if message.expires_at <= now:
                self.dead_letter(message, "expired")
                return
            asyncio.get_running_loop().call_later(message.expires_at - now, self._expire, message)
        if front:
            self.ready.appendleft(message)
        else:
            self.ready.append(message)
        self.dispatch()

    def _expire(self, message: _Message) -> None:
        """A message's TTL ran out: dead-letter it if it still waits here (one that was
        delivered meanwhile is left alone, as RabbitMQ does)."""
        for index, waiting in enumerate(self.ready):
            if waiting is message:
                del self.ready[index]
                self.dead_letter(message, "expired")
                return

    def returned(self, message: _Message) -> None:
        """A delivery came back unsettled or requeued: count it, maybe dead-letter it."""
        message.delivery_count += 1
        limit = self.spec.delivery_limit
        if limit is not None and message.delivery_count > limit:
            self.dead_letter(message, "delivery_limit")
        else:
            self.put(message, front=True)

    def dead_letter(self, message: _Message, reason: str) -> None:
        dlx = self.spec.dead_letter_exchange
        if dlx is None:
            if reason != "expired":  # an expired heartbeat is meant to go
                log.warning("broker.dropped", queue=self.spec.name, reason=reason)
            return
        headers = dict(message.headers)
        headers.pop(DELIVERY_COUNT, None)
        headers.setdefault(FIRST_DEATH_REASON, reason)
        headers.setdefault("x-first-death-queue", self.spec.name)
        death = {
            "reason": reason,
            "queue": self.spec.name,
            "count": 1,
            "exchange": message.exchange,
            "routing-keys": [message.routing_key],
            "time": datetime.now(UTC),
        }
        headers["x-death"] = [death, *headers.get("x-death", [])]
        key = self.spec.dead_letter_routing_key or message.routing_key
        self.hub.route(dlx, key, message.body, headers, message.message_id, mandatory=False)

    def dispatch(self) -> None:
        """Hand ready messages to consumers with room, round robin."""
        while self.ready:
            idle = [c for c in self.consumers if c.has_room()]
            if not idle:
                return
            consumer = idle[next(self._next) % len(idle)]
            consumer.deliver(self.ready.popleft())


class MemoryDelivery(Delivery):
    def __init__(
        self, queue: _Queue, owner: MemoryBroker, consumer: _Consumer | None, message: _Message
    ) -> None:
        self._queue = queue
        self._owner = owner
        self._consumer = consumer
        self._message = message
        self._settled = False
        self.body = message.body
        self.headers = {**message.headers, DELIVERY_COUNT: message.delivery_count}
        self.message_id = message.message_id
        self.delivery_count = message.delivery_count

    @property
    def settled(self) -> bool:
        return self._settled

    def _finish(self) -> bool:
        if self._settled:
            raise RuntimeError("delivery already settled")
        self._settled = True
        if self not in self._owner.unsettled:
            # Its connection closed first and gave it back, as RabbitMQ would have.
            log.warning("broker.settle_lost", queue=self._queue.spec.name)
            return False
        self._owner.unsettled.discard(self)
        if self._consumer is not None:
            self._consumer.in_flight -= 1
        return True

    async def ack(self) -> None:
        if self._finish():
            self._queue.dispatch()

    async def requeue(self) -> None:
        if self._finish():
            self._queue.returned(self._message)

    async def dead_letter(self) -> None:
        if self._finish():
            self._queue.dead_letter(self._message, "rejected")
            self._queue.dispatch()

    def give_back(self) -> None:
        """The connection closed with this delivery unsettled."""
        if self._consumer is not None:
            self._consumer.in_flight -= 1
        self._queue.returned(self._message)


class _Consumer(Subscription):
    def __init__(self, broker: MemoryBroker, queue: _Queue, handler: Handler, prefetch: int):
        self.broker = broker
        self.queue = queue
        self.handler = handler
        self.prefetch = prefetch
        self.in_flight = 0
        self.active = True

    def has_room(self) -> bool:
        return self.active and self.in_flight < self.prefetch

    def deliver(self, message: _Message) -> None:
        self.in_flight += 1
        delivery = MemoryDelivery(self.queue, self.broker, self, message)
        self.broker.unsettled.add(delivery)
        self.broker.spawn(self._run(delivery))

    async def _run(self, delivery: MemoryDelivery) -> None:
        try:
            await self.handler(delivery)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("broker.handler_failed", queue=self.queue.spec.name)
            if not delivery.settled:
                await delivery.requeue()

    async def cancel(self) -> None:
        self.active = False
        if self in self.queue.consumers:
            self.queue.consumers.remove(self)


class MemoryHub:
    """The in-process 'server': every exchange and queue of the embedded mode."""

    def __init__(self) -> None:
        self.exchanges: dict[str, _Exchange] = {}
        self.queues: dict[str, _Queue] = {}
        #: Claims (``Broker.claim``) and the connection holding each.
        self.claims: dict[str, MemoryBroker] = {}

    def route(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        headers: Mapping[str, Any],
        message_id: str | None,
        *,
        mandatory: bool,
    ) -> None:
        target = self.exchanges.get(exchange)
        if target is None:
            raise Unroutable(f"no exchange {exchange!r}")
        names = target.route(routing_key)
        if not names and mandatory:
            raise Unroutable(f"no queue took a message for {exchange!r} with key {routing_key!r}")
        for name in names:
            message = _Message(body, dict(headers), message_id, exchange, routing_key)
            self.queues[name].put(message)


class MemoryBroker(Broker):
    """One connection to a :class:`MemoryHub`."""

    def __init__(self, hub: MemoryHub, topology: Topology) -> None:
        self.topology = topology
        self.hub = hub
        self.unsettled: set[MemoryDelivery] = set()
        self._consumers: list[_Consumer] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._connected = False

    def spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _require(self) -> None:
        if not self._connected:
            raise BrokerUnavailable("the in-process broker connection is closed")

    async def connect(self) -> None:
        self._connected = True

    async def reconnected(self, timeout: float) -> bool:
        return self._connected  # closed is closed: nothing reconnects in-process

    async def close(self) -> None:
        if not self._connected:
            return
        self._connected = False
        for consumer in self._consumers:
            await consumer.cancel()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for delivery in list(self.unsettled):
            self.unsettled.discard(delivery)
            delivery.give_back()
        for name, holder in list(self.hub.claims.items()):
            if holder is self:
                del self.hub.claims[name]
        for name, queue in list(self.hub.queues.items()):
            if queue.owner is self:
                del self.hub.queues[name]
                for exchange in self.hub.exchanges.values():
                    exchange.bindings = [b for b in exchange.bindings if b[0] != name]

    async def _declare_exchanges(self) -> None:
        self._require()
        for spec in self.topology.exchanges:
            existing = self.hub.exchanges.get(spec.name)
            if existing is None:
                self.hub.exchanges[spec.name] = _Exchange(spec.kind)
            elif existing.kind is not spec.kind:
                raise BrokerUnavailable(f"exchange {spec.name!r} exists with another type")

    async def declare_queue(self, spec: QueueSpec) -> None:
        self._require()
        queue = self.hub.queues.get(spec.name)
        if queue is None:
            owner = self if spec.exclusive else None
            queue = self.hub.queues[spec.name] = _Queue(self.hub, spec, owner)
        elif queue.spec.arguments() != spec.arguments():
            raise BrokerUnavailable(f"queue {spec.name!r} exists with other arguments")
        for binding in spec.bindings:
            exchange = self.hub.exchanges.get(binding.exchange)
            if exchange is None:
                raise Unroutable(f"no exchange {binding.exchange!r} to bind {spec.name!r} to")
            pair = (spec.name, binding.routing_key)
            if pair not in exchange.bindings:
                exchange.bindings.append(pair)

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
        self._require()
        self.hub.route(exchange, routing_key, body, headers or {}, message_id, mandatory=mandatory)

    def _queue(self, name: str) -> _Queue:
        try:
            return self.hub.queues[name]
        except KeyError:
            raise BrokerUnavailable(f"no queue {name!r}") from None

    async def consume(self, queue: str, handler: Handler, *, prefetch: int) -> Subscription:
        self._require()
        source = self._queue(queue)
        consumer = _Consumer(self, source, handler, prefetch)
        self._consumers.append(consumer)
        source.consumers.append(consumer)
        source.dispatch()
        return consumer

    async def get(self, queue: str) -> Delivery | None:
        self._require()
        source = self._queue(queue)
        if not source.ready:
            return None
        delivery = MemoryDelivery(source, self, None, source.ready.popleft())
        self.unsettled.add(delivery)
        return delivery

    async def inspect(self, queue: str) -> QueueInfo:
        self._require()
        source = self._queue(queue)
        return QueueInfo(len(source.ready), sum(1 for c in source.consumers if c.active))

    async def claim(self, name: str) -> bool:
        self._require()
        return self.hub.claims.setdefault(name, self) is self

    async def release(self, name: str) -> None:
        if self.hub.claims.get(name) is self:
            del self.hub.claims[name]
