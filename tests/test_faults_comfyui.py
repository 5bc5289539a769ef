"""ComfyUI failing on several renderers at once: one crashes mid-job (and comes back),
one hangs twice, one runs out of memory three times, while the bot's jobs keep coming.
Every job ends once; only the job that ran out of memory twice fails, says why and costs
nothing; no prompt is left behind in any ComfyUI."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import pytest

from jobs.models import Failed, FailureReason, JobStatus, Succeeded
from tests.emulators.comfyui import ComfyUIEmulator
from tests.fixtures.comfyui import ComfyUIFactory
from tests.fixtures.faults import StageFactory

pytestmark = [pytest.mark.rabbitmq, pytest.mark.s3]

JOBS = 12


async def answers(http: aiohttp.ClientSession, comfyui: ComfyUIEmulator) -> bool:
    try:
        async with http.get(f"{comfyui.url}/system_stats") as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


async def bring_back(comfyui: ComfyUIEmulator, after: float) -> None:
    """Restart ``comfyui`` on its port ``after`` seconds once it went away, as a
    supervisor would."""
    port = comfyui.port
    async with aiohttp.ClientSession() as http:
        while await answers(http, comfyui):
            await asyncio.sleep(0.05)
    await asyncio.sleep(after)
    await comfyui.start(port=port)


async def queue_of(http: aiohttp.ClientSession, comfyui: ComfyUIEmulator) -> list[object]:
    async with http.get(f"{comfyui.url}/queue") as response:
        body = await response.json()
    return [*body["queue_running"], *body["queue_pending"]]


@pytest.mark.timeout(120)
async def test_crash_hang_and_oom_storms_on_three_renderers_at_once(
    fault_stage: StageFactory, comfyui_factory: ComfyUIFactory
) -> None:
    stage = await fault_stage()
    side = await stage.bot()
    crashing, hanging, starving = [await comfyui_factory(step_seconds=0.05) for _ in range(3)]
    crashing.faults.crash_at_step = 3
    hanging.faults.hang_next = 2
    starving.faults.oom_next = 3
    for n, comfyui in enumerate((crashing, hanging, starving)):
        await stage.renderer(
            f"storm-{n}", comfyui=comfyui, comfy={"stall_seconds": 2.0}, retry_backoff_seconds=0.2
        )
    revival = asyncio.create_task(bring_back(crashing, after=1.0))
    try:
        interactions = [await side.imagine(f"storm number {n}") for n in range(JOBS)]
        messages = await side.finals(interactions, timeout=90)
        await revival
    finally:
        revival.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await revival
    await asyncio.sleep(1.5)  # a second result would arrive now

    # Every fault fired.
    assert crashing.faults.crash_at_step is None
    assert (hanging.faults.hang_next, starving.faults.oom_next) == (0, 0)
    # One end per job: the job that met out of memory twice failed with that reason;
    # every other job, crashed, hung or starved once, succeeded.
    ends = stage.terminal_events()
    job_ids = [m.custom_ids()[0].split(":")[2] for m in messages]
    assert sorted(ends) == sorted(job_ids)
    assert all(len(events) == 1 for events in ends.values()), ends
    failed = [e for (e,) in ends.values() if isinstance(e, Failed)]
    assert [f.reason for f in failed] == [FailureReason.OOM]
    assert sum(isinstance(e, Succeeded) for (e,) in ends.values()) == JOBS - 1
    assert max(e.attempt for (e,) in ends.values()) >= 2  # the crash and hangs retried
    for job_id in job_ids:
        history = [status for status, _, _ in await stage.front.ledger.history(job_id)]
        assert len([s for s in history if s.terminal]) == 1, history
    # The hung prompts, and only they, were interrupted; memory was freed after an OOM.
    interrupted = [i["prompt_id"] for i in hanging.interrupts if i is not None]
    assert len(interrupted) == 2 and set(interrupted) <= set(job_ids)
    assert starving.free_calls >= 2
    # Nothing was left running or queued in any ComfyUI.
    async with aiohttp.ClientSession() as http:
        for comfyui in (crashing, hanging, starving):
            assert await queue_of(http, comfyui) == []
    # Discord: one final edit each; the failed job says so and is not charged.
    for message in messages:
        finals = [e for e in message.edits if "✅ Done" in e.content or "❌ Failed" in e.content]
        assert finals == [message.edits[-1]], [e.content for e in message.edits]
    assert sum("❌ Failed" in m.content for m in messages) == 1
    usage = await side.usage()
    assert (usage.user_images_today, usage.user_in_flight) == (JOBS - 1, 0)
    record = await stage.front.ledger.get(failed[0].job_id)
    assert record is not None and record.status is JobStatus.FAILED
