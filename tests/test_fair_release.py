"""Fair release through a real broker and real workers: a heavy user does not hold a
lane, and the queue positions users are shown are the order jobs start in."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest

from brigade.app import frontend
from jobs.bus import JobBus
from jobs.models import Accepted, Event, JobRequest, Origin, Succeeded
from tests.fixtures.brokers import BrokerFactory
from tests.fixtures.pipeline import Rig
from tests.fixtures.s3server import S3StoreFactory
from workflows import Catalog

FRONTEND = "front-fair"
HEAVY = ("a", "heavy")
OTHERS = [(guild, f"{guild}{n}") for guild in ("a", "b", "c") for n in range(3)]

Factory = Callable[[], "asyncio.Future[Rig]"]


@pytest.fixture
def fair_rig(
    brokers: BrokerFactory,
    test_prefix: str,
    tmp_path: Path,
    s3_store_factory: S3StoreFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[[int], AsyncIterator[Rig]]:
    @asynccontextmanager
    async def start(window: int) -> AsyncIterator[Rig]:
        monkeypatch.setenv("FAIR_WINDOW_MIN", str(window))
        monkeypatch.setenv("FAIR_RELEASE_SECONDS", "0.2")
        for limit in ("CONCURRENT_PER_USER", "PENDING_PER_TENANT", "IMAGES_PER_USER_PER_DAY"):
            monkeypatch.setenv(f"QUOTA_{limit}", "1000")
        topology = brokers.topology(test_prefix, frontends=(FRONTEND,))
        broker = await brokers.connect(topology, "frontend")
        await broker.declare()
        store = await s3_store_factory()
        catalog = Catalog.load()
        async with AsyncExitStack() as stack:
            front = await frontend(stack, JobBus(broker), catalog, tmp_path / "ledger.db", FRONTEND)
            yield Rig(brokers, topology, front, store, stack, catalog)

    return start  # type: ignore[return-value]


async def _submit(rig: Rig, tenant: str, user: str, n: int) -> str:
    request = JobRequest(workflow="demo", prompt=f"{user} {n}", steps=2, width=64, height=64)
    origin = Origin(frontend="cli", reply_to=FRONTEND, tenant=tenant, user=user)
    admitted = await rig.front.admission.submit(
        request, idempotency_key=f"{user}-{n}", origin=origin
    )
    return admitted.job.job_id


async def _heavy_and_nine_others(rig: Rig) -> tuple[list[str], dict[str, str]]:
    """The heavy user queues 50 jobs, then nine others (three guilds) 2 each, while the
    GPUs are busy elsewhere (no worker yet); then two workers come up. Returns the users
    in the order their jobs started. (With workers already idle, the heavy user's jobs
    would start as they arrive, before the others exist: nothing to be fair about.)"""
    owner: dict[str, str] = {}
    started: list[str] = []
    finished = asyncio.Event()

    async def listen(event: Event) -> None:
        if isinstance(event, Accepted) and event.job_id in owner:
            started.append(owner[event.job_id])
        if isinstance(event, Succeeded) and len(started) == len(owner) == 68:
            finished.set()

    rig.front.tracker.add_listener(listen)
    for n in range(50):
        owner[await _submit(rig, *HEAVY, n)] = HEAVY[1]
    for n in range(2):
        for tenant, user in OTHERS:
            owner[await _submit(rig, tenant, user, n)] = user
    for worker in ("w1", "w2"):
        await rig.renderer(worker_id=worker, demo_step_seconds=0.02, heartbeat_seconds=0.2)
    async with asyncio.timeout(50):
        while len(started) < 68:
            await asyncio.sleep(0.05)
    return started, owner


@pytest.mark.timeout(120)
async def test_every_other_users_first_job_starts_before_the_heavy_users_sixth(
    fair_rig: Callable[[int], AsyncIterator[Rig]],
) -> None:
    async with fair_rig(2) as rig:  # type: ignore[attr-defined]
        started, _ = await _heavy_and_nine_others(rig)

    heavy_sixth = [i for i, user in enumerate(started) if user == "heavy"][5]
    for _, user in OTHERS:
        assert started.index(user) < heavy_sixth, started


@pytest.mark.timeout(120)
async def test_without_fair_release_the_heavy_user_holds_the_lane(
    fair_rig: Callable[[int], AsyncIterator[Rig]],
) -> None:
    """The same load with a window large enough to release everything at once (FIFO):
    what the test above checks does not hold, so it checks something."""
    async with fair_rig(1000) as rig:  # type: ignore[attr-defined]
        started, _ = await _heavy_and_nine_others(rig)

    heavy_sixth = [i for i, user in enumerate(started) if user == "heavy"][5]
    assert any(started.index(user) > heavy_sixth for _, user in OTHERS)


async def test_positions_shown_are_the_order_jobs_start_in(
    fair_rig: Callable[[int], AsyncIterator[Rig]],
) -> None:
    async with fair_rig(2) as rig:  # type: ignore[attr-defined]
        jobs = [await _submit(rig, *HEAVY, n) for n in range(8)]
        for n in range(2):
            jobs += [await _submit(rig, tenant, user, n) for tenant, user in OTHERS[:4]]
        positions = {job: await rig.front.ledger.position(job) for job in jobs}
        started: list[str] = []

        async def listen(event: Event) -> None:
            if isinstance(event, Accepted):
                started.append(event.job_id)

        rig.front.tracker.add_listener(listen)
        await rig.renderer(worker_id="only", heartbeat_seconds=0.2)  # one worker: one order
        async with asyncio.timeout(30):
            while len(started) < len(jobs):
                await asyncio.sleep(0.05)

    assert sorted(positions.values()) == list(range(1, len(jobs) + 1))
    assert started == sorted(jobs, key=lambda job: positions[job] or 0)
