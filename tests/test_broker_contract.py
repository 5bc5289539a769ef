"""The broker contract (see ``jobs/broker.py``), run against both adapters."""

from __future__ import annotations

import asyncio

import pytest

from jobs.broker import Broker, Delivery, QueueInfo
from jobs.exceptions import BrokerUnavailable, Unroutable
from tests.fixtures.brokers import BrokerFactory


class Inbox:
    """A handler that records deliveries and settles them as told."""

    def __init__(self, settle: str | None = "ack") -> None:
        self.settle = settle
        self.deliveries: list[Delivery] = []
        self.arrived = asyncio.Condition()

    async def __call__(self, delivery: Delivery) -> None:
        async with self.arrived:
            self.deliveries.append(delivery)
            self.arrived.notify_all()
        if self.settle == "ack":
            await delivery.ack()
        elif self.settle == "requeue":
            await delivery.requeue()
        elif self.settle == "dead_letter":
            await delivery.dead_letter()

    async def wait_for(self, count: int, timeout: float = 10) -> list[Delivery]:
        async with asyncio.timeout(timeout), self.arrived:
            await self.arrived.wait_for(lambda: len(self.deliveries) >= count)
        return self.deliveries


async def get_one(broker: Broker, queue: str) -> Delivery:
    """Poll ``queue`` until a message is there (dead-lettering is asynchronous)."""
    async with asyncio.timeout(10):
        while True:
            delivery = await broker.get(queue)
            if delivery is not None:
                return delivery
            await asyncio.sleep(0.05)


async def until_inspected(broker: Broker, queue: str, expected: QueueInfo) -> None:
    """Wait until ``queue`` looks like ``expected`` (the broker settles asynchronously)."""
    async with asyncio.timeout(10):
        while await broker.inspect(queue) != expected:
            await asyncio.sleep(0.05)


async def test_publish_then_consume_roundtrip(brokers: BrokerFactory, test_prefix: str) -> None:
    topology = brokers.topology(test_prefix)
    broker = await brokers.connect(topology)
    await broker.declare()
    inbox = Inbox()
    await broker.consume(topology.lane_queue("fast"), inbox, prefetch=1)

    await broker.publish(
        topology.jobs_exchange, "fast", b'{"x": 1}', message_id="m1", headers={"h": "v"}
    )

    (delivery,) = await inbox.wait_for(1)
    assert delivery.body == b'{"x": 1}'
    assert delivery.message_id == "m1"
    assert delivery.headers["h"] == "v"
    assert delivery.delivery_count == 0


async def test_mandatory_publish_without_a_queue_raises(
    brokers: BrokerFactory, test_prefix: str
) -> None:
    topology = brokers.topology(test_prefix)
    broker = await brokers.connect(topology)
    await broker.declare()

    with pytest.raises(Unroutable, match="no-such-lane"):
        await broker.publish(topology.jobs_exchange, "no-such-lane", b"{}")
    # Without mandatory, the same message is dropped silently.
    await broker.publish(topology.jobs_exchange, "no-such-lane", b"{}", mandatory=False)
    assert await broker.depth(topology.lane_queue("fast")) == 0


async def test_prefetch_bounds_unsettled_deliveries(
    brokers: BrokerFactory, test_prefix: str
) -> None:
    topology = brokers.topology(test_prefix)
    broker = await brokers.connect(topology)
    await broker.declare()
    for n in range(3):
        await broker.publish(topology.jobs_exchange, "fast", f"{n}".encode())
    inbox = Inbox(settle=None)
    await broker.consume(topology.lane_queue("fast"), inbox, prefetch=1)

    (first,) = await inbox.wait_for(1)
    await asyncio.sleep(0.3)
    assert len(inbox.deliveries) == 1, "a second job arrived while the first was unsettled"
    await first.ack()
    await inbox.wait_for(2)
    assert [d.body for d in inbox.deliveries] == [b"0", b"1"]


async def test_requeue_counts_until_the_delivery_limit_then_dead_letters(
    brokers: BrokerFactory, test_prefix: str
) -> None:
    topology = brokers.topology(test_prefix, delivery_limit=2)
    broker = await brokers.connect(topology)
    await broker.declare()
    inbox = Inbox(settle="requeue")
    await broker.consume(topology.lane_queue("fast"), inbox, prefetch=1)

    await broker.publish(topology.jobs_exchange, "fast", b"poison", message_id="p")

    deliveries = await inbox.wait_for(3)
    assert [d.delivery_count for d in deliveries] == [0, 1, 2]
    for queue in (topology.dead_letter_queue, topology.dead_letter_notices):
        dead = await get_one(broker, queue)
        assert dead.body == b"poison"
        assert dead.death_reason == "delivery_limit"
        await dead.ack()
    await asyncio.sleep(0.3)
    assert len(inbox.deliveries) == 3, "delivered again past its limit"


async def test_dead_letter_is_reason_rejected(brokers: BrokerFactory, test_prefix: str) -> None:
    topology = brokers.topology(test_prefix)
    broker = await brokers.connect(topology)
    await broker.declare()
    inbox = Inbox(settle="dead_letter")
    await broker.consume(topology.lane_queue("fast"), inbox, prefetch=1)

    await broker.publish(topology.jobs_exchange, "fast", b"bad")

    await inbox.wait_for(1)
    dead = await get_one(broker, topology.dead_letter_queue)
    assert dead.body == b"bad"
    assert dead.death_reason == "rejected"
    await dead.ack()


async def test_connection_closed_unsettled_redelivers_and_counts(
    brokers: BrokerFactory, test_prefix: str
) -> None:
    topology = brokers.topology(test_prefix)
    setup = await brokers.connect(topology, "setup")
    await setup.declare()
    crashing = await brokers.connect(topology, "crashing")
    holder = Inbox(settle=None)
    await crashing.consume(topology.lane_queue("fast"), holder, prefetch=1)
    await setup.publish(topology.jobs_exchange, "fast", b"job")
    await holder.wait_for(1)

    await crashing.close()  # the renderer dies holding the job

    survivor = await brokers.connect(topology, "survivor")
    inbox = Inbox()
    await survivor.consume(topology.lane_queue("fast"), inbox, prefetch=1)
    (again,) = await inbox.wait_for(1)
    assert again.body == b"job"
    assert again.delivery_count == 1


async def test_handler_error_requeues(brokers: BrokerFactory, test_prefix: str) -> None:
    topology = brokers.topology(test_prefix, delivery_limit=5)
    broker = await brokers.connect(topology)
    await broker.declare()
    seen: list[int] = []
    done = asyncio.Event()

    async def flaky(delivery: Delivery) -> None:
        seen.append(delivery.delivery_count)
        if len(seen) == 1:
            raise RuntimeError("boom")
        await delivery.ack()
        done.set()

    await broker.consume(topology.lane_queue("fast"), flaky, prefetch=1)
    await broker.publish(topology.jobs_exchange, "fast", b"x")
    async with asyncio.timeout(10):
        await done.wait()
    assert seen == [0, 1]


async def test_control_fanout_reaches_every_renderer(
    brokers: BrokerFactory, test_prefix: str
) -> None:
    topology = brokers.topology(test_prefix)
    inboxes = []
    for worker in ("w1", "w2"):
        broker = await brokers.connect(topology, worker)
        await broker.declare([topology.control_queue(worker)])
        inbox = Inbox()
        await broker.consume(topology.control_queue(worker).name, inbox, prefetch=10)
        inboxes.append(inbox)

    await broker.publish(topology.control_exchange, "", b'{"cancel": "j"}')

    for inbox in inboxes:
        (delivery,) = await inbox.wait_for(1)
        assert delivery.body == b'{"cancel": "j"}'


async def test_events_queue_per_frontend(brokers: BrokerFactory, test_prefix: str) -> None:
    topology = brokers.topology(test_prefix, frontends=("bot-1", "api-1"))
    broker = await brokers.connect(topology)
    await broker.declare([topology.events_queue("bot-1"), topology.events_queue("api-1")])

    await broker.publish(topology.events_exchange, "bot-1", b"for the bot")

    assert await broker.depth(topology.events_queue("bot-1").name) == 1
    assert await broker.depth(topology.events_queue("api-1").name) == 0
    with pytest.raises(Unroutable):
        await broker.publish(topology.events_exchange, "gone-frontend", b"lost")


async def test_depth_of_a_missing_queue_is_broker_unavailable(
    brokers: BrokerFactory, test_prefix: str
) -> None:
    topology = brokers.topology(test_prefix)
    broker = await brokers.connect(topology)
    await broker.declare()

    with pytest.raises(BrokerUnavailable, match="no queue"):
        await broker.depth(f"{test_prefix}.missing")
    assert await broker.depth(topology.lane_queue("fast")) == 0  # the connection survives


async def test_a_job_waits_in_its_model_queue_at_most_the_affinity_wait(
    brokers: BrokerFactory, test_prefix: str
) -> None:
    model = "sd_xl_base_1.0.safetensors"
    topology = brokers.topology(test_prefix, affinity_wait_ms=300, models=(model,))
    broker = await brokers.connect(topology)
    await broker.declare((topology.model_queue("fast", model),))
    model_queue = topology.model_queue("fast", model).name

    await broker.publish(topology.jobs_exchange, topology.model_key("fast", model), b"job")
    assert (await broker.inspect(model_queue)).messages == 1

    # Nobody took it from its model's queue: the broker moves it to the lane's queue.
    delivery = await get_one(broker, topology.lane_queue("fast"))
    assert delivery.body == b"job"
    assert delivery.death_reason == "expired"
    # (A quorum queue counts it until the lane's queue has confirmed it.)
    await until_inspected(broker, model_queue, QueueInfo(messages=0, consumers=0))
    # Rejected there, it dies for that reason, not for its first death.
    await delivery.dead_letter()
    dead = await get_one(broker, topology.dead_letter_queue)
    assert dead.body == b"job"
    assert dead.death_reason == "rejected"
    await dead.ack()


async def test_a_consumed_model_queue_keeps_its_job_and_counts_its_consumer(
    brokers: BrokerFactory, test_prefix: str
) -> None:
    model = "v1-5-pruned-emaonly.safetensors"
    topology = brokers.topology(test_prefix, affinity_wait_ms=60_000, models=(model,))
    broker = await brokers.connect(topology)
    spec = topology.model_queue("fast", model)
    await broker.declare((spec,))
    assert await broker.inspect(spec.name) == QueueInfo(messages=0, consumers=0)
    inbox = Inbox()
    subscription = await broker.consume(spec.name, inbox, prefetch=1)
    assert (await broker.inspect(spec.name)).consumers == 1

    await broker.publish(topology.jobs_exchange, topology.model_key("fast", model), b"job")

    (delivery,) = await inbox.wait_for(1)
    assert delivery.body == b"job"
    assert delivery.death_reason is None
    await subscription.cancel()
    await until_inspected(broker, spec.name, QueueInfo(messages=0, consumers=0))
    assert await broker.depth(topology.lane_queue("fast")) == 0


async def test_a_claim_is_held_by_one_connection_until_released_or_closed(
    brokers: BrokerFactory, test_prefix: str
) -> None:
    topology = brokers.topology(test_prefix)
    first = await brokers.connect(topology, "first")
    second = await brokers.connect(topology, "second")
    await first.declare()
    name = topology.model_claim("sd_xl_base_1.0.safetensors")

    assert await first.claim(name)
    assert await first.claim(name)  # its own: taken again
    assert not await second.claim(name)
    await first.release(name)
    assert await second.claim(name)
    assert not await first.claim(name)
    await second.close()  # a renderer that dies lets go of its claims
    async with asyncio.timeout(10):
        while not await first.claim(name):
            await asyncio.sleep(0.05)
    await first.release(name)
