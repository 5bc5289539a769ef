"""``kill -9`` of renderer processes mid-job, again and again, with the real bot, the real
RabbitMQ and the real S3 server in the loop: every job still ends once, with one final
message in Discord, and the user is charged once per image."""

from __future__ import annotations

import asyncio
import subprocess

import pytest
import sqlite_utils

from jobs.models import JobStatus, Progress, Succeeded
from tests.fixtures.comfyui import ComfyUIFactory
from tests.fixtures.faults import Stage, StageFactory, kill_9

pytestmark = [pytest.mark.rabbitmq, pytest.mark.s3]

JOBS = 25
KILLS = 20
RENDERERS = 3


def mid_job(stage: Stage, worker_id: str) -> str | None:
    """The job ``worker_id`` is rendering now, as its last event says (step 2 or later)."""
    for event in reversed(stage.events):
        if event.worker_id == worker_id:
            if isinstance(event, Progress) and event.step >= 2:
                return event.job_id
            return None
    return None


@pytest.mark.timeout(240)
async def test_twenty_kill_9s_mid_job_lose_nothing_and_double_nothing(
    fault_stage: StageFactory, comfyui_factory: ComfyUIFactory
) -> None:
    # Enough deliveries that no job is dead-lettered even if every kill hits it.
    stage = await fault_stage(delivery_limit=KILLS + 2)
    side = await stage.bot()
    front = stage.front
    await front.ledger.set_quota(
        side.tenant, {"images_per_user_per_day": JOBS}, front.quota_defaults
    )
    # One ComfyUI per slot, as on a GPU host: a restarted renderer finds its ComfyUI
    # (and the prompt its predecessor left there) again under the same client id.
    comfyuis = [await comfyui_factory(step_seconds=0.15) for _ in range(RENDERERS)]
    generation = 0
    workers: dict[int, tuple[str, subprocess.Popen[bytes]]] = {}

    def start(slot: int) -> None:
        nonlocal generation
        generation += 1
        worker_id = f"s{slot}g{generation}"
        process = stage.start_renderer(
            worker_id,
            comfyuis[slot],
            COMFYUI_CLIENT_ID=f"faults-slot-{slot}",
            COMFYUI_PREVIEW_METHOD="none",
        )
        workers[slot] = (worker_id, process)

    for slot in range(RENDERERS):
        start(slot)
    interactions = [await side.imagine(f"lighthouse number {n}") for n in range(JOBS)]

    kills: list[tuple[str, str]] = []
    async with asyncio.timeout(180):  # each restart imports for 10-20 s on a busy machine
        while len(kills) < KILLS:
            target = next(
                (
                    (slot, job)
                    for slot, (worker_id, _) in workers.items()
                    if (job := mid_job(stage, worker_id)) is not None
                ),
                None,
            )
            if target is None:
                for _, process in workers.values():
                    stage.check_alive(process)
                await asyncio.sleep(0.05)
                continue
            slot, job = target
            worker_id, process = workers[slot]
            kill_9(process)
            kills.append((worker_id, job))
            start(slot)
    messages = await side.finals(interactions, timeout=90)
    await asyncio.sleep(1.5)  # a second result or edit would arrive now

    # The ledger: one terminal status per job, and it is success.
    job_ids = [m.custom_ids()[0].split(":")[2] for m in messages]
    assert len(set(job_ids)) == JOBS
    for job_id in job_ids:
        record = await front.ledger.get(job_id)
        assert record is not None and record.status is JobStatus.SUCCEEDED
        history = [status for status, _, _ in await front.ledger.history(job_id)]
        assert [s for s in history if s.terminal] == [JobStatus.SUCCEEDED], history
    # The frontend passed on one terminal event per job; every kill hit a job in flight,
    # which another renderer then finished.
    ends = stage.terminal_events()
    assert sorted(ends) == sorted(job_ids)
    assert all(len(events) == 1 for events in ends.values()), ends
    for worker, job_id in kills:
        (end,) = ends[job_id]
        assert isinstance(end, Succeeded)
        assert end.worker_id != worker and end.attempt >= 2, (worker, end)
    # Discord: one message per job, one final edit each, with the picture; no other post.
    posted = [m for m in stage.discord.messages_in(side.channel_id) if not m.deleted]
    assert len(posted) == JOBS
    assert all(not i.followups for i in interactions)
    for message in messages:
        finals = [e for e in message.edits if "✅ Done" in e.content]
        assert len(finals) == 1, [e.content for e in message.edits]
        assert not [e for e in message.edits if "❌ Failed" in e.content]
        assert message.attachment("result.png").image().size == (64, 64)
    # Quota: charged once per image, nothing left reserved.
    usage = await side.usage()
    assert (usage.user_images_today, usage.user_in_flight) == (JOBS, 0)
    db = sqlite_utils.Database(stage.ledger_path)
    try:
        rows = list(db.query("SELECT job_id, images, state FROM reservations"))
    finally:
        db.close()
    assert sorted(r["job_id"] for r in rows) == sorted(job_ids)
    assert {(r["images"], r["state"]) for r in rows} == {(1, "charged")}
