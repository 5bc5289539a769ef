"""One job from admission to a stored image and back, over a real broker and a real S3
server, with the demo backend; and what happens when renderers die or keep failing."""

from __future__ import annotations

import asyncio
import io
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from PIL import Image

from jobs.models import (
    Accepted,
    Event,
    Failed,
    FailureReason,
    Preview,
    Progress,
    Succeeded,
)
from renderer.backends.base import RenderResult, RenderTask, Reporter
from renderer.exceptions import BackendUnavailable
from storage.settings import S3Settings
from tests.fixtures.pipeline import Rig, start_renderer_process, stop_process

pytestmark = pytest.mark.s3


async def test_a_job_renders_and_lands_in_the_bucket(rig: Rig) -> None:
    await rig.renderer()
    job_id = await rig.submit(prompt="a lighthouse at dusk", steps=6, width=128, height=96)

    events = await rig.events(job_id)

    kinds = [type(e) for e in events]
    assert kinds[0] is Accepted
    assert kinds.count(Succeeded) == 1 and kinds[-1] is Succeeded
    steps = [e.step for e in events if isinstance(e, Progress)]
    assert steps == sorted(steps) and steps[-1] == 6
    assert any(isinstance(e, Preview) for e in events)
    result = events[-1]
    assert isinstance(result, Succeeded)
    (output,) = result.outputs
    assert f"/{job_id}/0.png" in output.key
    async with aiohttp.ClientSession() as http, http.get(output.url) as response:
        assert response.status == 200
        body = await response.read()
    image = Image.open(io.BytesIO(body))
    assert image.format == "PNG" and image.size == (128, 96)
    assert image.info["prompt"] == "a lighthouse at dusk"
    record = await rig.front.ledger.get(job_id)
    assert record is not None and record.status.value == "succeeded"


class AlwaysDown:
    """A backend whose engine never answers: every attempt fails transiently."""

    name = "demo"

    def __init__(self) -> None:
        self.attempts = 0

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def describe(self) -> dict[str, Any]:
        return {"backend": "down", "device": "none"}

    async def render(self, task: RenderTask, report: Reporter) -> RenderResult:
        self.attempts += 1
        raise BackendUnavailable("The renderer's engine is not answering.")


async def test_a_job_failing_past_the_delivery_limit_is_dead_lettered_once(rig: Rig) -> None:
    backend = AlwaysDown()
    await rig.renderer(backend=backend)

    job_id = await rig.submit()
    events = await rig.events(job_id)

    failures = [e for e in events if isinstance(e, Failed)]
    assert len(failures) == 1
    assert failures[0].reason is FailureReason.BACKEND_DOWN
    assert backend.attempts == rig.topology.delivery_limit + 1
    broker = await rig.brokers.connect(rig.topology, "inspector")
    async with asyncio.timeout(10):
        while (dead := await broker.get(rig.topology.dead_letter_queue)) is None:
            await asyncio.sleep(0.05)
    assert dead.death_reason == "rejected"
    await dead.ack()
    await asyncio.sleep(0.3)  # a notice would arrive now if it were going to
    assert len([e for e in await rig.events(job_id) if isinstance(e, Failed)]) == 1


@pytest.mark.rabbitmq
@pytest.mark.parametrize("brokers", ["rabbitmq"], indirect=True)
async def test_a_renderer_killed_mid_job_loses_nothing(
    rig: Rig, amqp_url: str, s3_settings: S3Settings, tmp_path: Path
) -> None:
    """``kill -9`` of a real ``brigade renderer`` process while it renders: the broker
    hands the job to the next renderer, and the frontend sees exactly one result."""
    doomed = start_renderer_process(rig, amqp_url, s3_settings, tmp_path, "doomed")
    seen: list[Event] = []
    accepted = asyncio.Event()

    async def listen(event: Event) -> None:
        seen.append(event)
        if isinstance(event, Progress) and event.worker_id == "doomed" and event.step >= 2:
            accepted.set()

    rig.front.tracker.add_listener(listen)
    try:
        job_id = await rig.submit(steps=30, width=64, height=64)
        async with asyncio.timeout(60):
            await accepted.wait()
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=10)
        await rig.renderer(worker_id="survivor")
        result = await rig.front.tracker.wait(job_id, timeout=30)
        await asyncio.sleep(0.5)
    finally:
        stop_process(doomed)

    assert isinstance(result, Succeeded)
    assert (result.worker_id, result.attempt) == ("survivor", 2)
    assert [e.worker_id for e in seen if isinstance(e, Succeeded | Failed)] == ["survivor"]


@pytest.mark.rabbitmq
@pytest.mark.parametrize("brokers", ["rabbitmq"], indirect=True)
async def test_sigterm_lets_the_current_job_finish(
    rig: Rig, amqp_url: str, s3_settings: S3Settings, tmp_path: Path
) -> None:
    renderer = start_renderer_process(rig, amqp_url, s3_settings, tmp_path, "draining")
    started = asyncio.Event()

    async def listen(event: Event) -> None:
        if isinstance(event, Progress):
            started.set()

    rig.front.tracker.add_listener(listen)
    try:
        job_id = await rig.submit(steps=15, width=64, height=64)
        async with asyncio.timeout(60):
            await started.wait()
        renderer.send_signal(signal.SIGTERM)
        result = await rig.front.tracker.wait(job_id, timeout=30)
        code = await asyncio.to_thread(renderer.wait, 30)
    finally:
        stop_process(renderer)

    assert isinstance(result, Succeeded) and result.worker_id == "draining"
    assert code == 0


async def test_cancel_stops_a_running_job_and_it_ends_once(rig: Rig) -> None:
    await rig.renderer(demo_step_seconds=0.2)
    running = asyncio.Event()

    async def listen(event: Event) -> None:
        if isinstance(event, Progress):
            running.set()

    rig.front.tracker.add_listener(listen)
    job_id = await rig.submit(steps=50, width=64, height=64)
    async with asyncio.timeout(30):
        await running.wait()

    outcome = await rig.front.control.cancel(job_id, requested_by="tester")
    result = await rig.front.tracker.wait(job_id, timeout=5)

    assert outcome.value == "cancelled"
    assert isinstance(result, Failed) and result.reason is FailureReason.CANCELLED
    broker = await rig.brokers.connect(rig.topology, "inspector")
    async with asyncio.timeout(10):  # the renderer stops rendering and acks the job
        while (await heartbeat_of(rig, "w-test")).job_id is not None:
            await asyncio.sleep(0.05)
    assert await broker.depth(rig.topology.lane_queue("fast")) == 0
    assert await broker.depth(rig.topology.dead_letter_queue) == 0
    events = await rig.events(job_id)
    assert [type(e) for e in events] == [Failed]


async def test_a_newer_frontends_control_action_is_noted_once_not_called_malformed(
    rig: Rig,
) -> None:
    """A rolling upgrade: a newer frontend sends an action this renderer does not know.
    It is told once (info), not a warning per message; a message that is not a control
    message at all still warns."""
    await rig.renderer()
    newer = await rig.brokers.connect(rig.topology, "newer-frontend")
    future = json.dumps({"schema_version": 1, "action": "defragment", "lane": "fast"})
    with structlog.testing.capture_logs() as logs:
        for body in (future.encode(), future.encode(), b"not json"):
            await newer.publish(
                rig.topology.control_exchange, "", body, persistent=False, mandatory=False
            )
        # Handled in the order sent: the last one logged means all three were seen.
        async with asyncio.timeout(10):
            while not any(entry["event"] == "control.malformed" for entry in logs):
                await asyncio.sleep(0.05)

    noted = [entry for entry in logs if entry["event"] == "control.unknown_action"]
    assert [(entry["action"], entry["log_level"]) for entry in noted] == [("defragment", "info")]
    malformed = [entry for entry in logs if entry["event"] == "control.malformed"]
    assert [entry["log_level"] for entry in malformed] == ["warning"]


async def test_a_cancelled_pending_job_is_skipped_when_delivered(rig: Rig) -> None:
    """Cancelled while it waits in the queue behind another job: the renderer that takes
    it later skips it without rendering."""
    await rig.renderer(demo_step_seconds=0.05)
    seen: list[Event] = []

    async def listen(event: Event) -> None:
        seen.append(event)

    rig.front.tracker.add_listener(listen)
    first = await rig.submit("first", steps=20, width=64, height=64)
    waiting = await rig.submit("second", steps=5, width=64, height=64)

    await rig.front.control.cancel(waiting)
    assert isinstance(await rig.front.tracker.wait(first, timeout=30), Succeeded)
    await asyncio.sleep(0.5)  # the renderer takes the cancelled job now

    assert [type(e) for e in seen if e.job_id == waiting] == [Failed]
    broker = await rig.brokers.connect(rig.topology, "inspector")
    assert await broker.depth(rig.topology.lane_queue("fast")) == 0


async def test_workers_are_known_by_their_heartbeats(rig: Rig) -> None:
    await rig.renderer(worker_id="gpu-0", heartbeat_seconds=0.1)

    beat = await heartbeat_of(rig, "gpu-0")

    assert beat.backend == "demo" and beat.lanes == ["fast"]
    assert beat.device == "cpu" and beat.state.value == "idle"


async def heartbeat_of(rig: Rig, worker_id: str) -> Any:
    async with asyncio.timeout(10):
        while True:
            for beat in rig.front.workers.workers():
                if beat.worker_id == worker_id:
                    return beat
            await asyncio.sleep(0.05)


@pytest.mark.rabbitmq
@pytest.mark.parametrize("brokers", ["rabbitmq"], indirect=True)
async def test_a_renderer_answers_health_readiness_and_metrics(
    rig: Rig, amqp_url: str, s3_settings: S3Settings, tmp_path: Path
) -> None:
    port = free_port()
    renderer = start_renderer_process(
        rig, amqp_url, s3_settings, tmp_path, "probe", RENDERER_HEALTH_PORT=str(port)
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(60):
                while True:
                    try:
                        async with http.get(f"{base}/healthz") as response:
                            if response.status == 200:
                                break
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.2)
            await rig.front.tracker.wait(await rig.submit(steps=2, width=64, height=64), 30)
            async with http.get(f"{base}/readyz") as response:
                ready = (response.status, await response.json())
            async with http.get(f"{base}/metrics") as response:
                metrics = await response.text()
        renderer.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(renderer.wait, 30) == 0
    finally:
        stop_process(renderer)

    assert ready[0] == 200 and set(ready[1]["checks"].values()) == {"ok"}
    assert 'brigade_renderer_jobs_total{outcome="succeeded",worker="probe"} 1.0' in metrics
    assert 'brigade_renderer_state{state="idle",worker="probe"} 1.0' in metrics


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
