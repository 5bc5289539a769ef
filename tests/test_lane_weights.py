"""A worker serving two lanes shares itself by weight, over both brokers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from brigade.app import frontend
from jobs.bus import JobBus
from jobs.models import Accepted, Event, JobRequest, Origin
from tests.fixtures.brokers import BrokerFactory
from tests.fixtures.pipeline import Rig
from tests.fixtures.s3server import S3StoreFactory
from workflows import Catalog

FRONTEND = "front-lanes"


@pytest.fixture
async def lanes_rig(
    brokers: BrokerFactory, test_prefix: str, tmp_path: Path, s3_store_factory: S3StoreFactory
) -> AsyncIterator[Rig]:
    topology = brokers.topology(test_prefix, lanes=("fast", "relax"), frontends=(FRONTEND,))
    broker = await brokers.connect(topology, "frontend")
    await broker.declare()
    store = await s3_store_factory()
    catalog = Catalog.load()
    async with AsyncExitStack() as stack:
        front = await frontend(stack, JobBus(broker), catalog, tmp_path / "ledger.db", FRONTEND)
        yield Rig(brokers, topology, front, store, stack, catalog)


async def test_both_lanes_waiting_are_served_by_weight(lanes_rig: Rig) -> None:
    rig = lanes_rig
    started: list[str] = []
    done = asyncio.Event()
    jobs: dict[str, str] = {}

    async def listen(event: Event) -> None:
        if isinstance(event, Accepted):
            started.append(jobs[event.job_id])
            if len(started) == 16:
                done.set()

    rig.front.tracker.add_listener(listen)
    origin = Origin(frontend="cli", reply_to=FRONTEND)
    for n in range(8):  # the relax backlog is older: FIFO would serve it first
        for lane in ("relax", "fast"):
            request = JobRequest(
                workflow="demo", prompt="p", steps=1, width=64, height=64, lane=lane
            )
            admitted = await rig.front.admission.submit(
                request, idempotency_key=f"{lane}-{n}", origin=origin
            )
            jobs[admitted.job.job_id] = lane
    await rig.renderer(lanes=["fast", "relax"], lane_weights={"fast": 3, "relax": 1}, prefetch=1)

    async with asyncio.timeout(30):
        await done.wait()

    first_eight = started[:8]
    assert first_eight.count("fast") == 6, started
    assert "relax" in started[:4], started  # never starved, even at 3:1
