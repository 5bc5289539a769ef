"""A restarted renderer and what its killed predecessor left in ComfyUI
(``renderer.comfyui.backend``): the predecessor's waiting prompts are deleted at once,
its running prompt is left a grace for its job to come back (then adopted), and is
interrupted after it. Another renderer's prompts on the same ComfyUI are left alone.
Against the ComfyUI emulator, over real sockets."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from renderer.backends.base import RenderTask
from renderer.comfyui.backend import ComfyUIBackend, default_client_id
from renderer.comfyui.client import ComfyUIClient
from renderer.settings import ComfyUISettings, RendererSettings
from tests.emulators.comfyui import ComfyUIEmulator
from tests.fixtures.comfyui import ComfyUIFactory
from tests.test_comfyui_backend import RecordingReporter, task


@pytest.fixture
async def comfyui(comfyui_factory: ComfyUIFactory) -> ComfyUIEmulator:
    # 20 steps of 0.1 s: a prompt runs 2 s, long enough to find it running.
    return await comfyui_factory(step_seconds=0.1)


@pytest.fixture
def worker_id() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def predecessor(comfyui: ComfyUIEmulator, worker_id: str) -> AsyncIterator[ComfyUIClient]:
    """The client of the worker's process before the restart: same worker id, so the same
    client id. Closing it submits nothing more and stops nothing, as a kill would."""
    client = ComfyUIClient(
        comfyui.url, default_client_id(worker_id), connect_timeout=2, request_timeout=5
    )
    await client.connect()
    yield client
    await client.close()


def _successor(url: str, worker_id: str, grace: float) -> ComfyUIBackend:
    """The restarted worker's backend (same worker id), not started yet."""
    return ComfyUIBackend(
        RendererSettings(worker_id=worker_id),
        ComfyUISettings(
            url=url,
            connect_timeout_seconds=2,
            request_timeout_seconds=5,
            stall_seconds=10,
            orphan_grace_seconds=grace,
        ),
    )


async def _restarted(url: str, worker_id: str, grace: float) -> ComfyUIBackend:
    backend = _successor(url, worker_id, grace)
    await backend.start()
    return backend


async def _left_behind(
    comfyui: ComfyUIEmulator, predecessor: ComfyUIClient, stranger: ComfyUIClient
) -> tuple[RenderTask, RenderTask, RenderTask]:
    """The predecessor's running and waiting prompts, and a stranger's waiting one."""
    running, waiting, theirs = task(steps=20), task(steps=20), task(steps=20)
    await predecessor.submit(running.graph, running.job_id)
    await predecessor.submit(waiting.graph, waiting.job_id)
    await stranger.submit(theirs.graph, theirs.job_id)
    while (await stranger.queue()).place(running.job_id) != "running":
        await asyncio.sleep(0.01)
    await predecessor.close()  # the process dies; ComfyUI goes on
    return running, waiting, theirs


async def test_a_predecessors_prompts_are_deleted_and_interrupted_after_the_grace(
    comfyui: ComfyUIEmulator,
    predecessor: ComfyUIClient,
    other_client: ComfyUIClient,
    worker_id: str,
) -> None:
    running, waiting, theirs = await _left_behind(comfyui, predecessor, other_client)

    backend = await _restarted(comfyui.url, worker_id, grace=0.3)
    try:
        queue = await other_client.queue()
        assert queue.place(waiting.job_id) is None  # deleted at start
        assert queue.place(running.job_id) == "running"  # its grace
        assert queue.place(theirs.job_id) == "pending"
        async with asyncio.timeout(5):
            while (await other_client.queue()).place(running.job_id) is not None:
                await asyncio.sleep(0.02)
        assert {"prompt_id": running.job_id} in comfyui.interrupts
        # Interrupted, not rendered to its end; the stranger's prompt runs next.
        assert (await other_client.queue()).place(theirs.job_id) == "running"
        assert running.job_id not in comfyui.executed or (
            (await other_client.history(running.job_id) or {}).get("status", {}).get("status_str")
            == "error"
        )
        assert waiting.job_id not in comfyui.executed
    finally:
        await backend.close()


async def test_a_job_that_comes_back_within_the_grace_attaches_to_its_prompt(
    comfyui: ComfyUIEmulator,
    predecessor: ComfyUIClient,
    other_client: ComfyUIClient,
    worker_id: str,
) -> None:
    running, waiting, _ = await _left_behind(comfyui, predecessor, other_client)

    backend = await _restarted(comfyui.url, worker_id, grace=0.5)
    try:
        # Both jobs were redelivered here (attempt 2).
        again = RenderTask(running.job_id, 2, running.workflow, running.graph, running.params)
        result = await backend.render(again, RecordingReporter())
        assert len(result.images) == 1
        await asyncio.sleep(0.6)  # past the grace: nothing of its is stopped
        assert {"prompt_id": running.job_id} not in comfyui.interrupts
        back = RenderTask(waiting.job_id, 2, waiting.workflow, waiting.graph, waiting.params)
        assert len((await backend.render(back, RecordingReporter())).images) == 1
    finally:
        await backend.close()
    # The running prompt rendered once; the waiting one was deleted, then submitted again.
    assert comfyui.executed.count(running.job_id) == 1
    assert [body["prompt_id"] for body in comfyui.submitted].count(running.job_id) == 1
    assert [body["prompt_id"] for body in comfyui.submitted].count(waiting.job_id) == 2


async def test_a_first_start_with_nothing_left_behind_touches_nothing(
    comfyui: ComfyUIEmulator, other_client: ComfyUIClient, worker_id: str
) -> None:
    theirs = task(steps=20)
    await other_client.submit(theirs.graph, theirs.job_id)
    backend = await _restarted(comfyui.url, worker_id, grace=0.05)
    try:
        await asyncio.sleep(0.2)
        assert (await other_client.queue()).place(theirs.job_id) is not None
        assert comfyui.interrupts == []
    finally:
        await backend.close()


@pytest.mark.parametrize("early", [False, True], ids=["after-start", "before-start"])
async def test_a_job_back_but_waiting_for_a_slot_past_the_grace_keeps_its_prompt(
    comfyui: ComfyUIEmulator,
    predecessor: ComfyUIClient,
    other_client: ComfyUIClient,
    worker_id: str,
    early: bool,
) -> None:
    """The redelivered job reached the restarted renderer (the worker calls ``held``)
    but waits behind other jobs for a slot until after the grace: its prompt goes on,
    and the render attaches to it, as within the grace. ``early``: the delivery came
    before the backend's takeover."""
    running, _, _ = await _left_behind(comfyui, predecessor, other_client)
    backend = _successor(comfyui.url, worker_id, grace=0.3)
    try:
        if early:
            backend.held(running.job_id)
        await backend.start()
        if not early:
            backend.held(running.job_id)
        await asyncio.sleep(0.6)  # past the grace, still waiting for a slot
        assert {"prompt_id": running.job_id} not in comfyui.interrupts
        assert (await other_client.queue()).place(running.job_id) == "running"
        again = RenderTask(running.job_id, 2, running.workflow, running.graph, running.params)
        assert len((await backend.render(again, RecordingReporter())).images) == 1
    finally:
        await backend.close()
    assert comfyui.executed.count(running.job_id) == 1
    assert [body["prompt_id"] for body in comfyui.submitted].count(running.job_id) == 1
