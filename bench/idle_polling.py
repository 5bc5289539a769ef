"""What idle renderers cost the broker: their looks at the model queues, counted.

Run from the repository root, with RabbitMQ at ``AMQP_URL`` (default: guest on loopback)::

    .venv/bin/python -m bench.idle_polling [--renderers 3] [--models 20] [--seconds 30]

``--renderers`` renderers' model affinity (``renderer/affinity.py``, each on its own
connection, with the default ``RENDERER_AFFINITY_POLL_SECONDS`` and
``RENDERER_AFFINITY_IDLE_POLL_SECONDS``) sit idle for ``--seconds`` with ``--models``
loadable models and no job anywhere. Every look asks the broker for each model's queue
(a passive declare); the bench counts them and prints the rate per renderer.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import uuid

from bench.common import quiet_logs
from jobs.broker import Delivery, QueueInfo
from jobs.bus import JobBus
from jobs.rabbitmq import RabbitBroker
from jobs.topology import build_topology
from renderer.affinity import ModelAffinity
from renderer.settings import RendererSettings
from tests.fixtures.rabbitmq import delete_topology

URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


class CountingBus(JobBus):
    """A renderer's bus that counts the queue inspections its looks make."""

    inspections = 0

    async def inspect_model(self, lane: str, model: str) -> QueueInfo:
        CountingBus.inspections += 1
        return await super().inspect_model(lane, model)


async def main(renderers: int, models: int, seconds: float) -> None:
    topology = build_topology(
        ["fast"], prefix=f"bench{uuid.uuid4().hex[:8]}", affinity_wait_ms=30_000
    )
    names = [f"model{n:03}_sd15.safetensors" for n in range(models)]
    settings = RendererSettings(_env_file=None)
    front = RabbitBroker(URL, topology, name="front")
    await front.connect()
    await front.declare()
    brokers = [RabbitBroker(URL, topology, name=f"renderer-{n}") for n in range(renderers)]

    async def hold(lane: str, delivery: Delivery) -> None:
        raise AssertionError("no job is published in this bench")

    affinities = []
    try:
        for broker in brokers:
            await broker.connect()
            affinity = ModelAffinity(
                CountingBus(broker),
                ["fast"],
                hold,
                models=lambda: names,
                idle=lambda: True,
                poll_seconds=settings.affinity_poll_seconds,
                idle_poll_seconds=settings.affinity_idle_poll_seconds,
                prefetch=1,
            )
            await affinity.start()
            affinities.append(affinity)
        await asyncio.sleep(seconds)
    finally:
        for affinity in affinities:
            await affinity.stop()
        for broker in brokers:
            await broker.close()
        await front.close()
        # The lane's queues and the models' (the looks declared them).
        models_queues = [topology.model_queue("fast", model).name for model in names]
        await delete_topology(URL, topology, models_queues)
    rate = CountingBus.inspections / seconds / renderers
    print(
        f"{renderers} idle renderers, {models} models, {seconds:.0f} s "
        f"(poll {settings.affinity_poll_seconds} s, idle poll "
        f"{settings.affinity_idle_poll_seconds} s): {CountingBus.inspections} queue "
        f"inspections, {rate:.1f} per renderer per second"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--renderers", type=int, default=3)
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    quiet_logs()
    asyncio.run(main(args.renderers, args.models, args.seconds))
