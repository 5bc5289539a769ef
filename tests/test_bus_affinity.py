"""Routing by model (``JobBus.route``) and the lane depth that counts the models' queues,
on both brokers."""

from __future__ import annotations

from jobs.bus import JobBus
from tests.fixtures.brokers import BrokerFactory
from tests.fixtures.jobs import job

MODEL = "v1-5-pruned-emaonly.safetensors"


async def test_jobs_for_a_model_some_renderer_can_load_wait_in_its_queue(
    brokers: BrokerFactory, test_prefix: str
) -> None:
    topology = brokers.topology(test_prefix, affinity_wait_ms=60_000, models=(MODEL,))
    broker = await brokers.connect(topology)
    await broker.declare()
    bus = JobBus(broker)
    bus.models = lambda lane: {MODEL}

    await bus.submit(job(0, MODEL))
    await bus.submit(job(1, MODEL))
    await bus.submit(job(2, None))  # needs no model
    await bus.submit(job(3, "nobody-has-this.safetensors"))  # no renderer can load it

    assert await broker.depth(topology.model_queue("fast", MODEL).name) == 2
    assert await broker.depth(topology.lane_queue("fast")) == 2
    # What /queue status, /v1/queue and autoscaling read: every job waiting for the lane.
    assert await bus.depth("fast") == 4


async def test_without_affinity_every_job_goes_to_its_lane(
    brokers: BrokerFactory, test_prefix: str
) -> None:
    topology = brokers.topology(test_prefix)
    broker = await brokers.connect(topology)
    await broker.declare()
    bus = JobBus(broker)
    bus.models = lambda lane: {MODEL}

    await bus.submit(job(0, MODEL))

    assert await broker.depth(topology.lane_queue("fast")) == 1
    assert await bus.depth("fast") == 1
