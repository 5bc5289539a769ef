"""Model affinity through the real system: a frontend (fair release, ledger) and K
renderers on RabbitMQ, each driving its own emulated ComfyUI that holds one checkpoint
at a time and charges a load for any other (``tests/fixtures/fleet.py``). A mixed
workload is run twice, with affinity and without (FIFO: every job to the lane's queue),
and the loads the emulated GPUs did are counted against the offline optimum."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

import renderer.affinity as affinity_module
from jobs.broker import Broker
from tests.fixtures.brokers import BrokerFactory
from tests.fixtures.comfyui import ComfyUIFactory
from tests.fixtures.fleet import FRONTEND, Fleet, fleet, model_names, offline_optimum, workload
from tests.fixtures.s3server import S3StoreFactory

pytestmark = [
    pytest.mark.s3,
    pytest.mark.rabbitmq,
    pytest.mark.parametrize("brokers", ["rabbitmq"], indirect=True),
    pytest.mark.timeout(240),
]

MODELS = model_names(20)
LOAD_SECONDS = 0.3


@pytest.fixture(autouse=True)
def _generous_quotas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAIR_RELEASE_SECONDS", "0.2")
    for limit in ("CONCURRENT_PER_USER", "PENDING_PER_TENANT", "IMAGES_PER_USER_PER_DAY"):
        monkeypatch.setenv(f"QUOTA_{limit}", "1000")


@asynccontextmanager
async def started(
    brokers: BrokerFactory,
    prefix: str,
    tmp_path: Path,
    s3_store_factory: S3StoreFactory,
    comfyui_factory: ComfyUIFactory,
    *,
    renderers: int,
    wait_ms: int,
    step_seconds: float = 0.01,
    idle_poll_seconds: float = 5.0,
) -> AsyncIterator[Fleet]:
    topology = brokers.topology(
        prefix, affinity_wait_ms=wait_ms, frontends=(FRONTEND,), models=MODELS
    )

    async def connect(name: str) -> Broker:
        return await brokers.connect(topology, name)

    emulators = []
    for _ in range(renderers):
        emulator = await comfyui_factory(
            model_load_seconds=LOAD_SECONDS, step_seconds=step_seconds, checkpoints=MODELS
        )
        emulator.resident_models = 1
        emulators.append(emulator)
    store = await s3_store_factory()
    async with fleet(
        connect, store, emulators, tmp_path / f"{prefix}.db", idle_poll_seconds=idle_poll_seconds
    ) as run:
        yield run


async def test_affinity_loads_each_model_about_once_and_fifo_does_not(
    brokers: BrokerFactory,
    test_prefix: str,
    tmp_path: Path,
    s3_store_factory: S3StoreFactory,
    comfyui_factory: ComfyUIFactory,
) -> None:
    models = workload(100, MODELS, seed=7)
    optimum = offline_optimum(models)
    bound = 30.0
    loads: dict[str, int] = {}
    for mode, wait_ms in (("affinity", int(bound * 1000)), ("fifo", 0)):
        async with started(
            brokers,
            f"{test_prefix}-{mode}",
            tmp_path,
            s3_store_factory,
            comfyui_factory,
            renderers=3,
            wait_ms=wait_ms,
        ) as run:
            # A burst, as when a busy guild's jobs arrive together (a trickle, where a
            # renderer may leave a model before its next job arrives, is in bench.affinity).
            await asyncio.gather(
                *(run.submit(n, model, user=f"u{n % 4}") for n, model in enumerate(models))
            )
            await run.finish(len(models))
            assert all(event.type.value == "succeeded" for event in run.done.values())
            loads[mode] = run.loads
            if mode == "affinity":
                assert max((await run.waits()).values()) <= bound
                # Every renderer took part: affinity did not serialise the work.
                assert all(emulator.executed for emulator in run.emulators)

    assert loads["affinity"] <= 1.1 * optimum, loads
    # The baseline has teeth: without affinity nearly every job reloads.
    assert loads["fifo"] > 3 * optimum, loads


async def test_a_job_for_a_cold_model_starts_within_the_bound_behind_a_backlog(
    brokers: BrokerFactory,
    test_prefix: str,
    tmp_path: Path,
    s3_store_factory: S3StoreFactory,
    comfyui_factory: ComfyUIFactory,
) -> None:
    """One renderer busy with a long backlog of one model; a job for another model that
    nobody has loaded waits in its model's queue for the bound, then goes to the lane's
    queue and is the renderer's next job, long before the backlog is done."""
    bound = 1.5
    async with started(
        brokers,
        test_prefix,
        tmp_path,
        s3_store_factory,
        comfyui_factory,
        renderers=1,
        wait_ms=int(bound * 1000),
        step_seconds=0.05,
    ) as run:
        backlog = [await run.submit(n, MODELS[0], user="heavy") for n in range(40)]
        async with asyncio.timeout(20):
            while not run.started:
                await asyncio.sleep(0.02)
        cold = await run.submit(100, MODELS[1], user="light")
        await run.finish(len(backlog) + 1)

        started_after = sum(1 for job in backlog if run.started[job] > run.started[cold])
        # It went ahead of most of the backlog: it did not wait for the model to change.
        assert started_after > 20, started_after
        # No later than the bound plus the render that was under way when it expired
        # (and a poll's slack on a busy machine).
        waited = (await run.waits())[cold]
        assert waited <= bound + 3.0, waited
        assert run.emulators[0].loads.count(MODELS[1]) == 1


async def test_an_idle_fleet_starts_a_job_for_a_cold_model_at_once(
    brokers: BrokerFactory,
    test_prefix: str,
    tmp_path: Path,
    s3_store_factory: S3StoreFactory,
    comfyui_factory: ComfyUIFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Idle renderers look at the model queues less and less often while they are empty,
    and the frontend's wake brings the look forward: a job for a model nobody has loaded
    starts long before the next look would have come (or the bound)."""
    # No jitter: with the fleet's 0.2 s poll the looks come at 0.2, 0.6, 1.4 and 3.0 s,
    # and the next one 3.2 s after that.
    monkeypatch.setattr(affinity_module._JITTER, "uniform", lambda low, high: 1.0)
    async with started(
        brokers,
        test_prefix,
        tmp_path,
        s3_store_factory,
        comfyui_factory,
        renderers=2,
        wait_ms=60_000,
        idle_poll_seconds=60.0,
    ) as run:
        affinities = [worker.affinity for worker in run.workers]
        async with asyncio.timeout(30):
            while not all(affinity is not None and affinity.looks >= 4 for affinity in affinities):
                await asyncio.sleep(0.02)

        job = await run.submit(0, MODELS[3], user="u")
        await run.finish(1)

        waited = (await run.waits())[job]
        assert waited < 2.0, waited  # without the wake: 3.2 s at least
        assert sum(emulator.loads.count(MODELS[3]) for emulator in run.emulators) == 1
