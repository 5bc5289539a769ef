"""The RabbitMQ adapter, on aio-pika. The only module that imports ``aio_pika``.

* One robust connection per :class:`RabbitBroker`; it reconnects by itself and restores
  its channels, declarations and consumers.
* Publishing goes through one channel with publisher confirms and ``on_return_raises``:
  a mandatory message that no queue takes raises, and ``publish`` returns only once the
  broker has confirmed the message.
* Each consumer has its own channel with its own prefetch, and acks manually.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import aio_pika
import aiormq
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustQueue,
)
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, ChannelInvalidStateError

from jobs.broker import DELIVERY_COUNT, Broker, Delivery, Handler, QueueInfo, Subscription
from jobs.exceptions import BrokerUnavailable, Unroutable
from jobs.topology import ExchangeKind, QueueSpec, Topology

log = structlog.get_logger(__name__)

#: AMQP reply code of a mandatory message that matched no queue.
NO_ROUTE = 312
#: Seconds between two reconnection attempts of a robust connection.
RECONNECT_SECONDS = 1.0

_EXCHANGE_TYPES = {
    ExchangeKind.DIRECT: aio_pika.ExchangeType.DIRECT,
    ExchangeKind.FANOUT: aio_pika.ExchangeType.FANOUT,
}


class RabbitDelivery(Delivery):
    def __init__(self, message: AbstractIncomingMessage) -> None:
        self._message = message
        self._settled = False
        self.body = message.body
        self.headers = dict(message.headers or {})
        self.message_id = message.message_id
        count = self.headers.get(DELIVERY_COUNT)
        # Classic queues do not count; a redelivered flag there means "at least once".
        self.delivery_count = (
            int(count) if isinstance(count, int) else int(bool(message.redelivered))
        )

    @property
    def settled(self) -> bool:
        return self._settled

    async def _settle(self, action: str) -> None:
        if self._settled:
            raise RuntimeError("delivery already settled")
        self._settled = True
        try:
            if action == "ack":
                await self._message.ack()
            elif action == "requeue":
                await self._message.nack(requeue=True)
            else:
                await self._message.reject(requeue=False)
        except (ChannelInvalidStateError, *CONNECTION_EXCEPTIONS) as exc:
            # The channel that carried it is gone: the broker has already put the
            # message back, and will deliver it again. Nothing is lost.
            log.warning("broker.settle_lost", action=action, error=str(exc))

    async def ack(self) -> None:
        await self._settle("ack")

    async def requeue(self) -> None:
        await self._settle("requeue")

    async def dead_letter(self) -> None:
        await self._settle("dead_letter")


class _RabbitSubscription(Subscription):
    def __init__(self, channel: AbstractRobustChannel, queue: AbstractQueue, tag: str) -> None:
        self._channel = channel
        self._queue = queue
        self._tag = tag
        self._cancelled = False

    async def cancel(self) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        try:
            await self._queue.cancel(self._tag)
        except (ChannelInvalidStateError, *CONNECTION_EXCEPTIONS) as exc:
            log.warning("broker.cancel_failed", queue=self._queue.name, error=str(exc))


class RabbitBroker(Broker):
    """A robust connection to RabbitMQ bound to one topology."""

    def __init__(
        self,
        url: str,
        topology: Topology,
        *,
        name: str = "brigade",
        timeout: float = 10.0,
    ) -> None:
        self.topology = topology
        self._url = url
        self._name = name
        self._timeout = timeout
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        #: The publisher channel's exchanges by name, made once (each publish looks up the
        #: robust channel's current underlying channel itself).
        self._exchanges: dict[str, AbstractExchange] = {}
        #: A channel for passive declares (queue depths, consumers), opened when first
        #: needed and again after a missing queue closed it: opening a channel per look
        #: races aiormq's channel numbers under load ("expected 'channel.open'").
        self._inspector: AbstractChannel | None = None
        self._inspecting = asyncio.Lock()
        #: Queues declared through this broker, so a consumer's channel can declare them
        #: again itself after a reconnect (an exclusive queue is gone by then).
        self._specs: dict[str, QueueSpec] = {}

    async def connect(self) -> None:
        if self._connection is not None:
            return
        try:
            self._connection = await aio_pika.connect_robust(
                self._url,
                timeout=self._timeout,
                reconnect_interval=RECONNECT_SECONDS,
                client_properties={"connection_name": self._name},
            )
            channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        except (*CONNECTION_EXCEPTIONS, OSError, TimeoutError) as exc:
            await self.close()
            raise BrokerUnavailable(f"cannot connect to RabbitMQ: {exc}") from exc
        assert isinstance(channel, AbstractRobustChannel)
        self._publisher = channel
        self._exchanges = {}
        log.info("broker.connected", broker="rabbitmq", name=self._name)

    async def close(self) -> None:
        connection, self._connection, self._publisher = self._connection, None, None
        self._exchanges = {}
        self._inspector = None
        if connection is not None:
            await connection.close()

    def _channel(self) -> AbstractRobustChannel:
        if self._publisher is None:
            raise BrokerUnavailable("not connected to RabbitMQ")
        return self._publisher

    async def _declare_exchanges(self) -> None:
        channel = self._channel()
        for spec in self.topology.exchanges:
            await channel.declare_exchange(
                spec.name, _EXCHANGE_TYPES[spec.kind], durable=spec.durable
            )

    async def declare_queue(self, spec: QueueSpec) -> None:
        self._specs[spec.name] = spec
        await _declare(self._channel(), spec)

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
        channel = self._channel()
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=(
                aio_pika.DeliveryMode.PERSISTENT
                if persistent
                else aio_pika.DeliveryMode.NOT_PERSISTENT
            ),
            message_id=message_id,
            headers=dict(headers or {}),
        )
        try:
            target = self._exchanges.get(exchange)
            if target is None:
                target = self._exchanges[exchange] = await channel.get_exchange(
                    exchange, ensure=False
                )
            await target.publish(message, routing_key, mandatory=mandatory, timeout=self._timeout)
        except aiormq.exceptions.PublishError as exc:
            frame = exc.frame
            if getattr(frame, "reply_code", None) == NO_ROUTE:
                raise Unroutable(
                    f"no queue took a message for {exchange!r} with key {routing_key!r}"
                ) from exc
            raise BrokerUnavailable(f"the broker refused a message: {exc}") from exc
        except (*CONNECTION_EXCEPTIONS, ChannelInvalidStateError, TimeoutError) as exc:
            raise BrokerUnavailable(f"publish to {exchange!r} was not confirmed: {exc}") from exc

    async def reconnected(self, timeout: float) -> bool:
        channel = self._publisher  # close() may clear it meanwhile
        if channel is None:
            return False
        try:
            async with asyncio.timeout(timeout):
                await channel.ready()  # the connection back, the channel restored
        except TimeoutError:
            return False
        return not channel.is_closed

    async def consume(self, queue: str, handler: Handler, *, prefetch: int) -> Subscription:
        connection = self._connection
        if connection is None:
            raise BrokerUnavailable("not connected to RabbitMQ")
        channel = await connection.channel()
        assert isinstance(channel, AbstractRobustChannel)
        await channel.set_qos(prefetch_count=prefetch)
        # Declared on this channel, the queue and its consumer come back after a reconnect
        # (a robust channel restores only what was declared through it).
        spec = self._specs.get(queue)
        source = (
            await _declare(channel, spec)
            if spec is not None
            else await channel.declare_queue(queue, passive=True)
        )

        async def on_message(message: AbstractIncomingMessage) -> None:
            delivery = RabbitDelivery(message)
            try:
                await handler(delivery)
            except asyncio.CancelledError:
                if not delivery.settled:
                    await asyncio.shield(delivery.requeue())
                raise
            except Exception:
                log.exception("broker.handler_failed", queue=queue)
                if not delivery.settled:
                    await delivery.requeue()

        tag = await source.consume(on_message, no_ack=False)
        return _RabbitSubscription(channel, source, tag)

    async def get(self, queue: str) -> Delivery | None:
        channel = self._channel()
        source = await channel.get_queue(queue, ensure=False)
        message = await source.get(no_ack=False, fail=False, timeout=self._timeout)
        return None if message is None else RabbitDelivery(message)

    async def inspect(self, queue: str) -> QueueInfo:
        connection = self._connection
        if connection is None:
            raise BrokerUnavailable("not connected to RabbitMQ")
        async with self._inspecting:
            try:
                if self._inspector is None or self._inspector.is_closed:
                    self._inspector = await connection.channel()
                # aiormq's own declare: aio-pika's robust channel answers a passive
                # declare of a queue it has seen from its cache, with the first counts.
                underlay = await self._inspector.get_underlay_channel()
                result = await underlay.queue_declare(queue, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity as exc:
                self._inspector = None  # a passive declare of a missing queue closed it
                raise BrokerUnavailable(f"no queue {queue!r}: {exc}") from exc
            except (*CONNECTION_EXCEPTIONS, ChannelInvalidStateError, TimeoutError) as exc:
                self._inspector = None
                raise BrokerUnavailable(f"cannot inspect {queue!r}: {exc}") from exc
        return QueueInfo(int(result.message_count or 0), int(result.consumer_count or 0))

    async def claim(self, name: str) -> bool:
        connection = self._connection
        if connection is None:
            raise BrokerUnavailable("not connected to RabbitMQ")
        try:
            # An exclusive queue is the connection's until it closes; declaring one that
            # another connection holds fails with RESOURCE_LOCKED and closes the channel.
            async with connection.channel() as channel:
                await channel.declare_queue(
                    name, exclusive=True, durable=False, arguments={"x-queue-type": "classic"}
                )
        except aiormq.exceptions.ChannelLockedResource:
            return False
        except (*CONNECTION_EXCEPTIONS, ChannelInvalidStateError, TimeoutError) as exc:
            raise BrokerUnavailable(f"cannot claim {name!r}: {exc}") from exc
        return True

    async def release(self, name: str) -> None:
        connection = self._connection
        if connection is None:
            return
        try:
            async with connection.channel() as channel:
                await channel.queue_delete(name)
        except (*CONNECTION_EXCEPTIONS, ChannelInvalidStateError, TimeoutError) as exc:
            log.warning("broker.release_failed", claim=name, error=str(exc))


async def _declare(channel: AbstractRobustChannel, spec: QueueSpec) -> AbstractRobustQueue:
    queue = await channel.declare_queue(
        spec.name,
        durable=spec.durable,
        exclusive=spec.exclusive,
        arguments=spec.arguments(),
    )
    for binding in spec.bindings:
        await queue.bind(binding.exchange, binding.routing_key)
    return queue
