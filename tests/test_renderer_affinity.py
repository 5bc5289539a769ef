"""A renderer's side of model affinity (``renderer/affinity.py``) on both brokers: what
it switches to, when, and the claim that keeps two idle renderers off one cold model."""

from __future__ import annotations

import asyncio

import pytest

import renderer.affinity as affinity_module
from jobs.broker import Delivery
from jobs.bus import JobBus
from jobs.models import Job
from renderer.affinity import ModelAffinity
from tests.fixtures.brokers import BrokerFactory
from tests.fixtures.jobs import job

A, B = "a_sd15.safetensors", "b_sd15.safetensors"


async def test_an_idle_renderer_waits_a_load_time_for_its_model_before_switching(
    brokers: BrokerFactory, test_prefix: str
) -> None:
    topology = brokers.topology(test_prefix, affinity_wait_ms=60_000, models=(A, B))
    front = JobBus(await brokers.connect(topology, "front"))
    await front.broker.declare()
    front.models = lambda lane: {A, B}
    taken: list[Delivery] = []

    async def hold(lane: str, delivery: Delivery) -> None:
        taken.append(delivery)

    renderers = [JobBus(await brokers.connect(topology, f"r{n}")) for n in range(2)]
    first, second = (
        ModelAffinity(
            bus,
            ["fast"],
            hold,
            models=lambda: [A, B],
            idle=lambda: True,
            poll_seconds=60,
            prefetch=1,
            load_seconds=lambda: {B: 1.0},
        )
        for bus in renderers
    )
    try:
        await first.follow(A)  # it rendered A last: A is resident
        await front.submit(job(0, B))
        await front.submit(job(1, B))

        # B needs a load of 1 s: idle for less than that, it keeps waiting for A's jobs.
        assert await first.decide(idle_for=0.5) is None
        assert first.resident == A
        # Idle longer than a load would take: the load is worth it now.
        assert await first.decide(idle_for=1.5) == B
        assert first.resident == B
        async with asyncio.timeout(10):  # its consumer on B's queue gets one job
            while not taken:
                await asyncio.sleep(0.02)
        assert len(taken) == 1 and Job.from_wire(taken[0].body).model == B
        # The other renderer sees B's other job waiting, but B resident elsewhere (its
        # consumer, or, while the broker's count lags, its claim) and that one job far
        # inside the bound: it stays idle rather than load B too.
        assert await second.decide() is None
        assert second.resident is None
    finally:
        await first.stop()
        await second.stop()


async def test_an_idle_renderer_looks_less_often_while_every_queue_is_empty(
    brokers: BrokerFactory, test_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(affinity_module._JITTER, "uniform", lambda low, high: 1.0)
    topology = brokers.topology(test_prefix, affinity_wait_ms=60_000, models=(A, B))
    front = JobBus(await brokers.connect(topology, "front"))
    await front.broker.declare()
    front.models = lambda lane: {A, B}

    async def hold(lane: str, delivery: Delivery) -> None:
        pass

    affinity = ModelAffinity(
        JobBus(await brokers.connect(topology, "r0")),
        ["fast"],
        hold,
        models=lambda: [A, B],
        idle=lambda: True,
        poll_seconds=0.05,
        idle_poll_seconds=60,
        prefetch=1,
        load_seconds=lambda: {B: 100.0},  # B's job below is never worth a load
    )
    try:
        await affinity.follow(A)
        await affinity.start()
        # Every queue empty: pauses of 0.05, 0.1, 0.2, 0.4, 0.8 s... A fixed poll would
        # have looked about 24 times by now.
        await asyncio.sleep(1.2)
        assert 1 <= affinity.looks <= 5, affinity.looks

        await front.submit(job(0, B))
        affinity.wake()  # what the renderer does on the frontend's wake
        before = affinity.looks
        await asyncio.sleep(0.5)
        # A job waits (for a model it lingers before loading): it looks every poll again.
        assert affinity.looks - before >= 5, affinity.looks - before
        assert affinity.waiting == 1 and affinity.resident == A
    finally:
        await affinity.stop()
