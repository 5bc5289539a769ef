"""Discord answering 5xx, then 429, for a while, as jobs finish: the jobs are not
affected, and every message still ends showing its result, once."""

from __future__ import annotations

import asyncio

import pytest

from jobs.models import JobStatus, Progress
from tests.fixtures.comfyui import ComfyUIFactory
from tests.fixtures.faults import StageFactory, discord_storm

pytestmark = [pytest.mark.rabbitmq, pytest.mark.s3]

EDIT = "PATCH /channels/{channel_id}/messages/{message_id}"
JOBS = 6
OUTAGE_SECONDS = 8.0


@pytest.mark.timeout(120)
async def test_discord_5xx_then_429_for_a_while_still_shows_every_result_once(
    fault_stage: StageFactory, comfyui_factory: ComfyUIFactory
) -> None:
    stage = await fault_stage()
    side = await stage.bot()
    for n in range(2):
        comfyui = await comfyui_factory(step_seconds=0.1)
        await stage.renderer(f"storm-{n}", comfyui=comfyui)
    interactions = [await side.imagine(f"storm number {n}") for n in range(JOBS)]
    async with asyncio.timeout(30):
        while not any(isinstance(e, Progress) for e in stage.events):
            await asyncio.sleep(0.05)

    # Every progress and final edit meets the storm, as the jobs finish: first 503
    # (discord.py does not retry it), then 429 (it sleeps and retries), then 500 (it
    # retries, sleeping longer each time). discord.py sends one channel's edits one at
    # a time, so each phase has its own window.
    server_errors = await discord_storm(side.emulator, EDIT, OUTAGE_SECONDS, status=503)
    limited = await discord_storm(side.emulator, EDIT, 4.0, status=429, retry_after=1.0)
    retried_errors = await discord_storm(side.emulator, EDIT, 4.0, status=500)
    ended_during_storm = len(stage.terminal_events())
    messages = await side.finals(interactions, timeout=60)
    await asyncio.sleep(1.5)  # a second final edit would arrive now

    assert min(server_errors, retried_errors, limited) > 0, (server_errors, retried_errors, limited)
    assert ended_during_storm > 0  # some final edits had to get through the storm
    for interaction, message in zip(interactions, messages, strict=True):
        job_id = message.custom_ids()[0].split(":")[2]
        record = await stage.front.ledger.get(job_id)
        assert record is not None and record.status is JobStatus.SUCCEEDED
        finals = [e for e in message.edits if "✅ Done" in e.content]
        assert finals == [message.edits[-1]], [e.content for e in message.edits]
        assert message.attachment("result.png").image().size == (64, 64)
        assert not interaction.followups
    assert len(side.emulator.messages_in(side.channel_id)) == JOBS
