"""The fixtures' own cleanup of the shared broker: what a test or bench declared there
goes with it, the model queues renderers declare as they go included (they would stay
a day: ``MODEL_QUEUE_EXPIRES_MS``)."""

from __future__ import annotations

import aio_pika
import pytest

from jobs.rabbitmq import RabbitBroker
from jobs.topology import build_topology
from tests.emulators.comfyui import DEFAULT_CHECKPOINTS, DEFAULT_DIFFUSION_MODELS
from tests.fixtures.rabbitmq import delete_topology

pytestmark = pytest.mark.rabbitmq


async def test_delete_topology_removes_the_model_queues_declared_on_the_way(
    amqp_url: str, test_prefix: str
) -> None:
    # Without affinity here: a renderer's own settings turn it on (the fault stages').
    topology = build_topology(["fast", "slow"], prefix=test_prefix)
    declared = (
        topology.model_queue("fast", DEFAULT_CHECKPOINTS[0]),
        topology.model_queue("slow", DEFAULT_DIFFUSION_MODELS[-1]),
    )
    broker = RabbitBroker(amqp_url, topology, name="cleanup", timeout=10)
    await broker.connect()
    try:
        await broker.declare()
        await broker.declare(declared)
    finally:
        await broker.close()

    await delete_topology(amqp_url, topology, [])

    connection = await aio_pika.connect(amqp_url)
    async with connection:
        for name in [spec.name for spec in (*topology.queues, *declared)]:
            channel = await connection.channel()
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await channel.declare_queue(name, passive=True)
        for exchange in topology.exchanges:
            channel = await connection.channel()
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await channel.declare_exchange(exchange.name, passive=True)
