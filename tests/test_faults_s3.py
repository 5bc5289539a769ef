"""The S3 server stopped for 30 s under a job, then started again: the renderer keeps
retrying its upload with backoff, the job is not finished (acked) without its image, and
it completes once, with its image, when the server is back."""

from __future__ import annotations

import asyncio
import io
import itertools

import pytest
from PIL import Image

from jobs.models import JobStatus, Progress, Succeeded
from jobs.topology import DEFAULT_DELIVERY_LIMIT
from renderer.worker import MAX_BACKOFF_SECONDS
from storage import StorageError
from tests.fixtures.comfyui import ComfyUIFactory
from tests.fixtures.faults import S3_PREFIX, RecordingStore, RestartableS3, StageFactory
from tests.fixtures.s3server import settings_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.s3]

OUTAGE_SECONDS = 30.0


@pytest.mark.timeout(150)
async def test_an_s3_outage_of_thirty_seconds_delays_the_job_and_loses_nothing(
    restartable_s3: RestartableS3,
    fault_stage: StageFactory,
    comfyui_factory: ComfyUIFactory,
    capfd: pytest.CaptureFixture[str],
) -> None:
    s3 = settings_for(restartable_s3.server, S3_PREFIX)
    # The production delivery limit and backoff: the defaults must ride out the outage.
    stage = await fault_stage(s3=s3, delivery_limit=DEFAULT_DELIVERY_LIMIT)
    side = await stage.bot()
    comfyui = await comfyui_factory(step_seconds=0.1)
    store = RecordingStore(s3)
    await store.start()
    stage.stack.push_async_callback(store.close)
    await stage.renderer("s3-0", comfyui=comfyui, store=store, retry_backoff_seconds=1.0)
    loop = asyncio.get_running_loop()

    interaction = await side.imagine("a lighthouse in the fog")
    async with asyncio.timeout(30):
        while not any(isinstance(e, Progress) and e.step >= 2 for e in stage.events):
            await asyncio.sleep(0.05)
    await asyncio.to_thread(restartable_s3.stop)
    down_at = loop.time()
    await asyncio.sleep(OUTAGE_SECONDS)
    job_id = interaction.original.custom_ids()[0].split(":")[2] if interaction.original else ""
    during = await stage.front.ledger.get(job_id)
    ends_during = stage.terminal_events()
    back_at = loop.time()
    await asyncio.to_thread(restartable_s3.start)
    [message] = await side.finals([interaction], timeout=90)
    await asyncio.sleep(1.0)  # a second result would arrive now

    # While it was down: uploads failed and were tried again, spaced out; the job stayed
    # open (not finished, not failed).
    assert during is not None and during.status is JobStatus.RUNNING
    assert ends_during == {}
    failures = [at for at, error in store.uploads if error is not None and at < back_at]
    stored = [at for at, error in store.uploads if error is None]
    assert stored, store.uploads
    assert all(isinstance(e, StorageError) for _, e in store.uploads if e is not None)
    assert len(failures) >= 3, store.uploads
    assert len(failures) < 40, "retried in a tight loop"
    assert failures[0] - down_at < 15, "the first upload failed long after the outage began"
    gaps = [b - a for a, b in itertools.pairwise(failures)]
    assert max(gaps) > 1.0, gaps
    # It never stopped trying: from the first failure to the stored image, no two uploads
    # lie further apart than the longest backoff and one slow upload. (How far apart the
    # failures before the restart spread is up to the full jitter: one draw may wait 16 s.)
    attempts = [at for at, _ in store.uploads if at <= min(stored)]
    pauses = [b - a for a, b in itertools.pairwise(attempts)]
    assert max(pauses) < MAX_BACKOFF_SECONDS + 15, pauses
    # When it came back: one stored image, one success, one final message with the image.
    assert min(stored) > back_at > down_at + OUTAGE_SECONDS
    ends = stage.terminal_events()
    assert list(ends) == [job_id]
    (end,) = ends[job_id]
    assert isinstance(end, Succeeded)
    (output,) = end.outputs
    image = Image.open(io.BytesIO(await stage.store.get(output.key)))
    assert image.format == "PNG" and image.size == (64, 64)
    history = [status for status, _, _ in await stage.front.ledger.history(job_id)]
    assert [s for s in history if s.terminal] == [JobStatus.SUCCEEDED]
    assert [e for e in message.edits if "✅ Done" in e.content] == [message.edits[-1]]
    assert message.attachment("result.png").image().size == (64, 64)
    # Acked once its image was stored: nothing is left in the queue.
    depth = await stage.broker.depth(stage.topology.lane_queue("fast"))
    assert depth == 0
    # The failed uploads were logged, with their errors, and without the credentials.
    logged = "".join(capfd.readouterr())
    assert "job.retry" in logged and "storage.put_failed" in logged
    assert restartable_s3.server.secret_key not in logged
