"""An admin's retry: a job the broker set aside goes back to its lane from the dead-letter
queue, renders, and ends once more, with its quota held again and charged once."""

from __future__ import annotations

import asyncio
from typing import Any

from jobs.control import RetryOutcome
from jobs.models import Failed, FailureReason, Job, JobRequest, JobStatus, Origin, Succeeded
from renderer.backends.base import RenderResult, RenderTask, Reporter
from renderer.backends.demo import create as create_demo
from renderer.exceptions import BackendUnavailable
from tests.fixtures.pipeline import Rig, renderer_settings

GUILD = "g-retry"


class DownThenUp:
    """Down until ``up`` is set; then the demo backend renders."""

    name = "demo"

    def __init__(self) -> None:
        self.up = False
        self.attempts = 0
        self._demo = create_demo(renderer_settings())

    async def start(self) -> None:
        await self._demo.start()

    async def close(self) -> None:
        await self._demo.close()

    def describe(self) -> dict[str, Any]:
        return self._demo.describe()

    async def render(self, task: RenderTask, report: Reporter) -> RenderResult:
        self.attempts += 1
        if not self.up:
            raise BackendUnavailable("The renderer's engine is not answering.")
        return await self._demo.render(task, report)


async def _submit(rig: Rig, key: str) -> str:
    request = JobRequest(workflow="demo", prompt="a lighthouse", steps=2, width=64, height=64)
    origin = Origin(frontend="cli", reply_to="front-test", tenant=GUILD, user="u1")
    admitted = await rig.front.admission.submit(request, idempotency_key=key, origin=origin)
    return admitted.job.job_id


async def _dead_depth(rig: Rig, expected: int) -> None:
    broker = await rig.brokers.connect(rig.topology, "inspector")
    async with asyncio.timeout(10):
        while await broker.depth(rig.topology.dead_letter_queue) != expected:
            await asyncio.sleep(0.05)


async def test_a_dead_job_retried_renders_and_is_charged_once(rig: Rig) -> None:
    backend = DownThenUp()
    await rig.renderer(backend=backend)
    job_id = await _submit(rig, "one")
    first = await rig.front.tracker.wait(job_id, timeout=30)
    assert isinstance(first, Failed) and first.reason is FailureReason.BACKEND_DOWN
    usage = await rig.front.ledger.usage(GUILD, "u1", rig.front.quota_defaults)
    assert usage.user_images_today == 0  # refunded
    await _dead_depth(rig, 1)

    backend.up = True
    outcome = await rig.front.control.retry(job_id, requested_by="discord:42")

    assert outcome is RetryOutcome.RETRIED
    second = await rig.front.tracker.wait(job_id, timeout=30)
    assert isinstance(second, Succeeded)
    assert second.attempt > first.attempt  # attempts go on counting: nothing looked stale
    record = await rig.front.ledger.get(job_id)
    assert record is not None and record.status is JobStatus.SUCCEEDED
    assert record.job.retries == 1
    history = await rig.front.ledger.history(job_id)
    assert [status for status, _, _ in history].count(JobStatus.QUEUED) == 2
    assert any(detail == "retried by discord:42" for _, _, detail in history)
    usage = await rig.front.ledger.usage(GUILD, "u1", rig.front.quota_defaults)
    assert usage.user_images_today == 1
    await _dead_depth(rig, 0)  # it left the dead-letter queue for good
    assert await rig.front.control.retry(job_id) is RetryOutcome.NOT_FAILED


async def test_retry_of_a_job_not_in_the_dead_letter_queue_touches_nothing(rig: Rig) -> None:
    await rig.renderer(backend=DownThenUp())
    kept = await _submit(rig, "kept")
    taken = await _submit(rig, "taken")
    for job_id in (kept, taken):
        await rig.front.tracker.wait(job_id, timeout=30)
    await _dead_depth(rig, 2)
    # Someone else took ``taken`` out of the dead-letter queue.
    inspector = await rig.brokers.connect(rig.topology, "inspector")
    held = [await inspector.get(rig.topology.dead_letter_queue) for _ in range(2)]
    for delivery in held:
        assert delivery is not None
        if Job.from_wire(delivery.body).job_id == taken:
            await delivery.ack()
        else:
            await delivery.requeue()

    assert await rig.front.control.retry(taken) is RetryOutcome.NOT_DEAD
    assert await rig.front.control.retry("no-such-job") is RetryOutcome.NOT_FOUND

    await _dead_depth(rig, 1)  # the other dead job went back
    record = await rig.front.ledger.get(taken)
    assert record is not None and record.status is JobStatus.FAILED
    assert await rig.front.control.retry(kept) is RetryOutcome.RETRIED


async def test_a_cancelled_job_is_not_retried(rig: Rig) -> None:
    job_id = await _submit(rig, "cancelled")  # no renderer: it waits
    await rig.front.control.cancel(job_id)

    assert await rig.front.control.retry(job_id) is RetryOutcome.CANCELLED
    record = await rig.front.ledger.get(job_id)
    assert record is not None and record.status is JobStatus.FAILED
