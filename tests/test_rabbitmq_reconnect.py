"""The RabbitMQ adapter when the connection drops (a TCP proxy in front of the broker
cuts every connection): consumers come back by themselves, a renderer's control queue
and its binding too, and a publish during the outage fails fast instead of hanging."""

from __future__ import annotations

import asyncio

import pytest

from jobs.broker import Delivery
from jobs.exceptions import BrokerUnavailable
from jobs.rabbitmq import RabbitBroker
from jobs.topology import build_topology
from tests.fixtures.rabbitmq import delete_topology
from tests.fixtures.tcpproxy import TcpProxy, through

pytestmark = pytest.mark.rabbitmq


async def publish_until_it_goes(broker: RabbitBroker, exchange: str, key: str, body: bytes) -> int:
    """Publish, retrying while the connection comes back; returns how many failed first."""
    failures = 0
    async with asyncio.timeout(20):
        while True:
            try:
                await broker.publish(exchange, key, body)
            except BrokerUnavailable:
                failures += 1
                await asyncio.sleep(0.2)
            else:
                return failures


async def test_consumers_and_private_queues_come_back_after_a_cut(
    amqp_url: str, rabbit_proxy: TcpProxy, test_prefix: str
) -> None:
    topology = build_topology(["fast"], prefix=test_prefix, delivery_limit=5)
    broker = RabbitBroker(through(amqp_url, rabbit_proxy), topology, name="cut", timeout=5)
    jobs: list[bytes] = []
    controls: list[bytes] = []

    async def on_job(delivery: Delivery) -> None:
        jobs.append(delivery.body)
        await delivery.ack()

    async def on_control(delivery: Delivery) -> None:
        controls.append(delivery.body)
        await delivery.ack()

    await broker.connect()
    try:
        await broker.declare([topology.control_queue("w1")])
        await broker.consume(topology.lane_queue("fast"), on_job, prefetch=1)
        await broker.consume(topology.control_queue("w1").name, on_control, prefetch=1)
        await broker.publish(topology.jobs_exchange, "fast", b"before")
        async with asyncio.timeout(10):
            while not jobs:
                await asyncio.sleep(0.01)

        rabbit_proxy.cut()
        await publish_until_it_goes(broker, topology.jobs_exchange, "fast", b"after")
        await publish_until_it_goes(broker, topology.control_exchange, "", b"cancel")

        async with asyncio.timeout(20):
            while b"after" not in jobs or not controls:
                await asyncio.sleep(0.05)
    finally:
        await broker.close()
        await delete_topology(amqp_url, topology, [topology.control_queue("w1").name])
    # At least once: an ack the cut swallowed means "before" comes again, never lost.
    assert set(jobs) == {b"before", b"after"} and jobs[-1] == b"after"
    assert controls == [b"cancel"]


async def test_a_publish_during_the_outage_fails_fast(
    amqp_url: str, rabbit_proxy: TcpProxy, test_prefix: str
) -> None:
    topology = build_topology(["fast"], prefix=test_prefix)
    broker = RabbitBroker(through(amqp_url, rabbit_proxy), topology, name="outage", timeout=2)
    await broker.connect()
    try:
        await broker.declare()
        rabbit_proxy.cut()
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(BrokerUnavailable):
            await broker.publish(topology.jobs_exchange, "fast", b"x")
        assert loop.time() - began < 5
        assert await publish_until_it_goes(broker, topology.jobs_exchange, "fast", b"y") >= 0
        assert await broker.depth(topology.lane_queue("fast")) == 1
    finally:
        await broker.close()
        await delete_topology(amqp_url, topology, [])
