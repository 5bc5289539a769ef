"""The frontend's event side: ordering, stale frames, one terminal event per job, and
the dead-letter notices."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from jobs.broker import Broker
from jobs.bus import JobBus
from jobs.deadletters import DeadLetterNotifier
from jobs.ledger import Ledger
from jobs.models import (
    Accepted,
    Event,
    Failed,
    FailureReason,
    Job,
    JobStatus,
    Origin,
    Output,
    Progress,
    Succeeded,
)
from jobs.tracker import JobTracker
from tests.fixtures.brokers import BrokerFactory

FRONTEND = "front-1"


@pytest.fixture
async def bus(brokers: BrokerFactory, test_prefix: str) -> JobBus:
    topology = brokers.topology(test_prefix, frontends=(FRONTEND,))
    broker: Broker = await brokers.connect(topology)
    await broker.declare([topology.events_queue(FRONTEND)])
    return JobBus(broker)


@pytest.fixture
async def tracker(bus: JobBus, ledger: Ledger) -> AsyncIterator[JobTracker]:
    tracker = JobTracker(bus, ledger, FRONTEND)
    await tracker.start()
    yield tracker
    await tracker.stop()


async def admitted(ledger: Ledger) -> Job:
    job = Job(
        workflow="demo",
        lane="fast",
        params={"prompt": "p"},
        idempotency_key=f"k-{id(ledger)}",
        origin=Origin(reply_to=FRONTEND),
    )
    await ledger.admit(job)
    return job


def succeeded(job: Job, attempt: int, seq: int) -> Succeeded:
    output = Output(url="http://x/0.png", key="k/0.png", size=1, width=8, height=8)
    return Succeeded(job_id=job.job_id, attempt=attempt, worker_id="w", seq=seq, outputs=[output])


async def collect(tracker: JobTracker, job: Job) -> list[Event]:
    async with asyncio.timeout(10), tracker.watch(job.job_id) as watch:
        return [event async for event in watch]


async def test_events_arrive_in_order_and_end_with_the_terminal_one(
    tracker: JobTracker, bus: JobBus, ledger: Ledger
) -> None:
    job = await admitted(ledger)
    watching = asyncio.create_task(collect(tracker, job))
    await asyncio.sleep(0)
    base: dict[str, Any] = {"job_id": job.job_id, "attempt": 1, "worker_id": "w"}
    await bus.emit(Accepted(**base, seq=0), FRONTEND)
    for step in (1, 2, 3):
        await bus.emit(Progress(**base, seq=step, step=step, total=3), FRONTEND)
    await bus.emit(succeeded(job, 1, 4), FRONTEND)

    events = await watching

    assert [e.type.value for e in events] == [
        "accepted",
        "progress",
        "progress",
        "progress",
        "succeeded",
    ]
    record = await ledger.get(job.job_id)
    assert record is not None and record.status is JobStatus.SUCCEEDED
    assert [status for status, _, _ in await ledger.history(job.job_id)] == [
        JobStatus.QUEUED,
        JobStatus.RUNNING,
        JobStatus.SUCCEEDED,
    ]


async def test_a_second_terminal_event_is_dropped(
    tracker: JobTracker, bus: JobBus, ledger: Ledger
) -> None:
    """A renderer that published ``succeeded`` and died before its ack renders the job
    again; the user still sees one result."""
    job = await admitted(ledger)
    seen: list[Event] = []

    async def listen(event: Event) -> None:
        seen.append(event)

    tracker.add_listener(listen)
    await bus.emit(succeeded(job, 1, 5), FRONTEND)
    await bus.emit(Accepted(job_id=job.job_id, attempt=2, worker_id="w2", seq=0), FRONTEND)
    await bus.emit(succeeded(job, 2, 5), FRONTEND)
    await bus.emit(
        Failed(
            job_id=job.job_id,
            attempt=3,
            worker_id="w",
            seq=0,
            reason=FailureReason.INTERNAL,
            message="late",
        ),
        FRONTEND,
    )
    await asyncio.sleep(0.5)

    assert [(e.type.value, e.attempt) for e in seen] == [("succeeded", 1)]


async def test_stale_progress_is_dropped(tracker: JobTracker, bus: JobBus, ledger: Ledger) -> None:
    job = await admitted(ledger)
    seen: list[tuple[int, int]] = []

    async def listen(event: Event) -> None:
        seen.append((event.attempt, event.seq))

    tracker.add_listener(listen)
    base: dict[str, Any] = {"job_id": job.job_id, "worker_id": "w", "total": 9}
    await bus.emit(Progress(**base, attempt=2, seq=3, step=3), FRONTEND)
    await bus.emit(Progress(**base, attempt=2, seq=2, step=2), FRONTEND)  # reordered
    await bus.emit(Progress(**base, attempt=1, seq=7, step=7), FRONTEND)  # an older attempt
    await bus.emit(Progress(**base, attempt=2, seq=4, step=4), FRONTEND)
    await asyncio.sleep(0.5)

    assert seen == [(2, 3), (2, 4)]


async def test_a_watch_that_starts_late_gets_the_stored_result(
    tracker: JobTracker, bus: JobBus, ledger: Ledger
) -> None:
    job = await admitted(ledger)
    await bus.emit(succeeded(job, 1, 1), FRONTEND)
    async with asyncio.timeout(10):
        while (record := await ledger.get(job.job_id)) is None or not record.status.terminal:
            await asyncio.sleep(0.05)

    result = await tracker.wait(job.job_id, timeout=5)

    assert isinstance(result, Succeeded) and result.outputs[0].key == "k/0.png"


async def test_the_broker_giving_up_on_a_job_reaches_its_frontend_once(
    tracker: JobTracker, bus: JobBus, ledger: Ledger
) -> None:
    """Renderers crash on a job past the delivery limit: the dead-letter notifier tells
    the job's frontend, which shows one ``failed``."""
    notifier = DeadLetterNotifier(bus)
    await notifier.start()
    job = await admitted(ledger)
    await bus.submit(job)
    broker = bus.broker
    for _ in range(broker.topology.delivery_limit + 1):
        async with asyncio.timeout(10):
            while (delivery := await broker.get(broker.topology.lane_queue("fast"))) is None:
                await asyncio.sleep(0.05)
        await delivery.requeue()

    result = await tracker.wait(job.job_id, timeout=10)
    await notifier.stop()

    assert isinstance(result, Failed)
    assert result.reason is FailureReason.INTERNAL
    assert "3 attempts" in result.message


async def test_frames_after_the_end_are_dropped(
    tracker: JobTracker, bus: JobBus, ledger: Ledger
) -> None:
    job = await admitted(ledger)
    seen: list[str] = []

    async def listen(event: Event) -> None:
        seen.append(event.type.value)

    tracker.add_listener(listen)
    await bus.emit(succeeded(job, 1, 3), FRONTEND)
    await bus.emit(
        Progress(job_id=job.job_id, attempt=2, worker_id="w", seq=9, step=1, total=2), FRONTEND
    )
    await asyncio.sleep(0.5)

    assert seen == ["succeeded"]


async def test_a_removed_listener_hears_nothing_more(
    tracker: JobTracker, bus: JobBus, ledger: Ledger
) -> None:
    job = await admitted(ledger)
    heard: list[str] = []

    async def listen(event: Event) -> None:
        heard.append(event.type.value)

    tracker.add_listener(listen)
    tracker.remove_listener(listen)
    tracker.remove_listener(listen)  # twice is fine
    await bus.emit(succeeded(job, 1, 1), FRONTEND)
    await tracker.wait(job.job_id, timeout=10)

    assert heard == []
