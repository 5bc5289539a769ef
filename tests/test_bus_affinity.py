"""Routing by model (``JobBus.route``), the lane depth that counts the models' queues, and
the wake a job for a model sends the renderers, on both brokers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from jobs.broker import Delivery
from jobs.bus import JobBus
from jobs.models import Control, ControlAction
from tests.fixtures.brokers import BrokerFactory
from tests.fixtures.jobs import job

MODEL = "v1-5-pruned-emaonly.safetensors"


async def _front(brokers: BrokerFactory, prefix: str, *, affinity: bool) -> JobBus:
    """A frontend's bus, its topology declared, that knows some renderer can load MODEL
    (with ``affinity``, a bound of a minute)."""
    topology = (
        brokers.topology(prefix, affinity_wait_ms=60_000, models=(MODEL,))
        if affinity
        else brokers.topology(prefix)
    )
    broker = await brokers.connect(topology)
    await broker.declare()
    bus = JobBus(broker)
    bus.models = lambda lane: {MODEL}
    return bus


async def test_jobs_for_a_model_some_renderer_can_load_wait_in_its_queue(
    brokers: BrokerFactory, test_prefix: str
) -> None:
    bus = await _front(brokers, test_prefix, affinity=True)
    topology, broker = bus.topology, bus.broker

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
    bus = await _front(brokers, test_prefix, affinity=False)
    topology, broker = bus.topology, bus.broker

    await bus.submit(job(0, MODEL))

    assert await broker.depth(topology.lane_queue("fast")) == 1
    assert await bus.depth("fast") == 1


async def test_a_job_for_a_model_wakes_the_renderers_once_per_burst(
    brokers: BrokerFactory, test_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bus = await _front(brokers, test_prefix, affinity=True)
    renderer = JobBus(await brokers.connect(bus.topology, "renderer"))
    heard: list[Control] = []

    async def on_control(delivery: Delivery) -> None:
        heard.append(Control.model_validate_json(delivery.body))
        await delivery.ack()

    await renderer.consume_control("w0", on_control)
    # A long interval, so that the burst below certainly falls inside it.
    monkeypatch.setattr("jobs.bus.WAKE_INTERVAL_SECONDS", 60.0)

    for n in range(3):  # a burst for one model: one wake
        await bus.submit(job(n, MODEL))
    await bus.submit(job(3, None))  # to the lane's queue: every renderer takes those
    await bus.submit(job(4, "nobody-has-this.safetensors"))  # to the lane's queue too
    async with asyncio.timeout(10):
        while not heard:
            await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)  # room for a wrong second wake to arrive

    assert [(c.action, c.lane, c.model) for c in heard] == [(ControlAction.WAKE, "fast", MODEL)]

    # Past the interval the next job for the model wakes them again.
    monkeypatch.setattr("jobs.bus.WAKE_INTERVAL_SECONDS", 0.0)
    await bus.submit(job(5, MODEL))
    async with asyncio.timeout(10):
        while len(heard) < 2:
            await asyncio.sleep(0.02)
    assert heard[1].action is ControlAction.WAKE and heard[1].model == MODEL


async def test_callers_at_once_share_one_read_of_the_depth(
    brokers: BrokerFactory, test_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bus = await _front(brokers, test_prefix, affinity=True)
    broker = bus.broker
    await bus.submit(job(0, MODEL))
    await bus.submit(job(1, None))
    calls: list[str] = []
    for name in ("depth", "inspect"):
        real = getattr(broker, name)

        async def counted(queue: str, real: Any = real, name: str = name) -> Any:
            calls.append(name)
            return await real(queue)

        monkeypatch.setattr(broker, name, counted)

    assert await bus.depth("fast") == 2
    one_read = len(calls)
    assert one_read >= 2  # the lane's queue and the model's

    # A status page's viewers and an admin's /queue status, all at once, within the
    # freshness: one read answers them all.
    calls.clear()
    assert await asyncio.gather(*(bus.depth("fast") for _ in range(20))) == [2] * 20
    assert calls == []  # the read above is still fresh
    monkeypatch.setattr("jobs.bus.DEPTH_FRESH_SECONDS", 0.0)
    await bus.submit(job(2, MODEL))
    assert await asyncio.gather(*(bus.depth("fast") for _ in range(20))) == [3] * 20
    assert len(calls) == one_read
