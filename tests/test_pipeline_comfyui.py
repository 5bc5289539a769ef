"""The whole pipeline on the ComfyUI backend: RabbitMQ, a renderer worker, the emulated
ComfyUI over real sockets, SeaweedFS; and what ComfyUI does in production (dropped
sockets, crashes, hangs, out of memory, bad graphs), as the frontend sees it."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from jobs.models import Event, Failed, FailureReason, Preview, Progress, Succeeded
from renderer.comfyui.backend import ComfyUIBackend
from renderer.comfyui.supervisor import ComfyUISupervisor, SupervisorConfig
from renderer.settings import ComfyUISettings
from storage.settings import S3Settings
from tests.emulators.comfyui import ComfyUIEmulator
from tests.fixtures.comfyui import ComfyUIFactory
from tests.fixtures.pipeline import Rig, renderer_settings, start_renderer_process, stop_process

pytestmark = [
    pytest.mark.s3,
    pytest.mark.rabbitmq,
    pytest.mark.parametrize("brokers", ["rabbitmq"], indirect=True),
]
REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = "tiny_sd15_random.safetensors"


def comfyui_settings(url: str, **overrides: Any) -> ComfyUISettings:
    fields: dict[str, Any] = {
        "url": url,
        "connect_timeout_seconds": 2.0,
        "request_timeout_seconds": 5.0,
        "stall_seconds": 10.0,
        "reconnect_max_seconds": 0.5,
        "start_timeout_seconds": 20.0,
        "preview_method": "latent2rgb",
        **overrides,
    }
    return ComfyUISettings(_env_file=None, **fields)


async def comfy_renderer(
    rig: Rig,
    url: str,
    *,
    supervisor: ComfyUISupervisor | None = None,
    comfy: dict[str, Any] | None = None,
    **settings: Any,
) -> Any:
    config = renderer_settings(**settings)
    backend = ComfyUIBackend(config, comfyui_settings(url, **(comfy or {})), supervisor)
    return await rig.renderer(backend=backend, **settings)


async def submit(rig: Rig, key: str = "k", **fields: Any) -> str:
    values = {
        "workflow": "sd15-txt2img",
        "checkpoint": CHECKPOINT,
        "steps": 4,
        "width": 64,
        "height": 64,
        **fields,
    }
    return await rig.submit(key, **values)


def types(events: list[Event]) -> list[str]:
    return [event.type.value for event in events]


async def test_a_job_renders_through_comfyui_with_previews(
    rig: Rig, comfyui: ComfyUIEmulator
) -> None:
    await comfy_renderer(rig, comfyui.url)

    job_id = await submit(rig, steps=6, width=96, height=64)
    events = await rig.events(job_id)

    assert types(events)[0] == "accepted" and types(events)[-1] == "succeeded"
    assert [e.step for e in events if isinstance(e, Progress)] == [1, 2, 3, 4, 5, 6]
    previews = [e for e in events if isinstance(e, Preview)]
    assert previews and all(p.mime in ("image/webp", "image/jpeg") for p in previews)
    result = events[-1]
    assert isinstance(result, Succeeded)
    assert [(o.width, o.height) for o in result.outputs] == [(96, 64)]
    assert comfyui.executed == [job_id]  # the job id is the prompt id


async def test_a_dropped_websocket_mid_run_still_completes_once(
    rig: Rig, comfyui_factory: ComfyUIFactory
) -> None:
    comfyui = await comfyui_factory(step_seconds=0.03)
    comfyui.faults.drop_ws_at_step = 3
    await comfy_renderer(rig, comfyui.url)

    job_id = await submit(rig, steps=12)
    events = await rig.events(job_id)

    assert types(events).count("succeeded") == 1
    assert comfyui.executed == [job_id]


async def test_a_hang_is_interrupted_and_the_job_retried(
    rig: Rig, comfyui: ComfyUIEmulator
) -> None:
    comfyui.faults.hang_next = 1
    await comfy_renderer(rig, comfyui.url, comfy={"stall_seconds": 0.5})

    job_id = await submit(rig)
    result = await rig.front.tracker.wait(job_id, timeout=30)

    assert isinstance(result, Succeeded) and result.attempt == 2
    assert comfyui.interrupts == [{"prompt_id": job_id}]


async def test_out_of_memory_once_frees_and_succeeds(rig: Rig, comfyui: ComfyUIEmulator) -> None:
    comfyui.faults.oom_next = 1
    await comfy_renderer(rig, comfyui.url)

    result = await rig.front.tracker.wait(await submit(rig), timeout=30)

    assert isinstance(result, Succeeded) and result.attempt == 1
    assert comfyui.free_calls == 1


async def test_out_of_memory_twice_fails_with_oom(rig: Rig, comfyui: ComfyUIEmulator) -> None:
    comfyui.faults.oom_next = 2
    await comfy_renderer(rig, comfyui.url)

    result = await rig.front.tracker.wait(await submit(rig), timeout=30)

    assert isinstance(result, Failed) and result.reason is FailureReason.OOM
    assert "too large for this GPU's memory" in result.message


async def test_a_graph_comfyui_refuses_fails_for_good_naming_the_input(
    rig: Rig, comfyui: ComfyUIEmulator
) -> None:
    await comfy_renderer(rig, comfyui.url)

    result = await rig.front.tracker.wait(await submit(rig, checkpoint="nope.ckpt"), timeout=30)

    assert isinstance(result, Failed) and result.reason is FailureReason.INVALID
    assert 'ckpt_name "nope.ckpt"' in result.message
    assert "Traceback" not in result.message and "/" not in result.message.split(":")[0]
    assert comfyui.executed == []


async def test_cancel_only_touches_that_job(rig: Rig, comfyui_factory: ComfyUIFactory) -> None:
    """Two jobs in ComfyUI at once (prefetch 2): cancelling the waiting one removes it
    from ComfyUI's queue; cancelling the running one interrupts exactly that prompt."""
    comfyui = await comfyui_factory(step_seconds=0.05)
    await comfy_renderer(rig, comfyui.url, prefetch=2)
    started = asyncio.Event()
    running_id = await submit(rig, "a", steps=40)
    waiting_id = await submit(rig, "b", steps=40, seed=2)
    third_id = await submit(rig, "c", steps=2, seed=3)

    async def listen(event: Event) -> None:
        if isinstance(event, Progress) and event.job_id == running_id and event.step >= 2:
            started.set()

    rig.front.tracker.add_listener(listen)
    async with asyncio.timeout(30):
        await started.wait()
    await rig.front.control.cancel(waiting_id)
    await rig.front.control.cancel(running_id)
    third = await rig.front.tracker.wait(third_id, timeout=30)

    assert isinstance(third, Succeeded)
    assert waiting_id not in comfyui.executed
    assert comfyui.interrupts == [{"prompt_id": running_id}]
    for job_id in (running_id, waiting_id):
        result = await rig.front.tracker.wait(job_id, timeout=5)
        assert isinstance(result, Failed) and result.reason is FailureReason.CANCELLED


async def test_a_crashed_comfyui_is_brought_back_and_the_job_completes(
    rig: Rig, tmp_path: Path
) -> None:
    """ComfyUI (run by the renderer's supervisor) dies mid-job: the supervisor starts it
    again, and the job's next attempt renders on the new process."""
    (tmp_path / "main.py").write_text(
        "import runpy, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "sys.argv = ['comfyui', *sys.argv[1:], '--step-seconds', '0.05']\n"
        "runpy.run_module('tests.emulators.comfyui', run_name='__main__')\n"
    )
    config = SupervisorConfig(
        path=tmp_path,
        port=free_port(),
        start_timeout=30,
        health_interval=0.2,
        health_timeout=1,
        stop_timeout=5,
    )
    supervisor = ComfyUISupervisor(config)
    await comfy_renderer(rig, config.url, supervisor=supervisor)
    progressed = asyncio.Event()

    async def listen(event: Event) -> None:
        if isinstance(event, Progress) and event.step >= 2:
            progressed.set()

    rig.front.tracker.add_listener(listen)
    job_id = await submit(rig, steps=20)
    async with asyncio.timeout(60):
        await progressed.wait()
    first = supervisor.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)

    result = await rig.front.tracker.wait(job_id, timeout=60)

    assert isinstance(result, Succeeded) and result.attempt >= 2
    assert supervisor.restarts >= 1 and supervisor.pid != first


async def test_sigterm_mid_job_lets_the_comfyui_job_finish(
    rig: Rig,
    comfyui_factory: ComfyUIFactory,
    amqp_url: str,
    s3_settings: S3Settings,
    tmp_path: Path,
) -> None:
    comfyui = await comfyui_factory(step_seconds=0.05)
    process = start_renderer_process(
        rig, amqp_url, s3_settings, tmp_path, "gpu-7", COMFYUI_URL=comfyui.url
    )
    try:
        started = asyncio.Event()

        async def listen(event: Event) -> None:
            if isinstance(event, Progress):
                started.set()

        rig.front.tracker.add_listener(listen)
        job_id = await submit(rig, steps=30)
        async with asyncio.timeout(60):
            await started.wait()
        process.send_signal(signal.SIGTERM)
        result = await rig.front.tracker.wait(job_id, timeout=30)
        code = await asyncio.to_thread(process.wait, 30)
    finally:
        stop_process(process)

    assert isinstance(result, Succeeded) and result.worker_id == "gpu-7"
    assert code == 0
    assert comfyui.executed == [job_id]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_heartbeats_carry_the_gpu_and_the_models_last_used(
    rig: Rig, comfyui: ComfyUIEmulator
) -> None:
    await comfy_renderer(rig, comfyui.url, worker_id="gpu-3", heartbeat_seconds=0.1)
    result = await rig.front.tracker.wait(await submit(rig), timeout=30)
    assert isinstance(result, Succeeded)

    async with asyncio.timeout(10):
        while not (beats := [b for b in rig.front.workers.workers() if b.models]):
            await asyncio.sleep(0.05)

    (beat,) = beats
    assert beat.worker_id == "gpu-3" and beat.backend == "comfyui"
    assert beat.device is not None and beat.vram_total == 24 * 2**30
    assert beat.models == [CHECKPOINT]
    assert set(beat.model_load_seconds) == {CHECKPOINT}  # the emulator's first load
    assert beat.model_load_seconds[CHECKPOINT] >= 0
    assert CHECKPOINT in beat.available_models["checkpoints"]  # what it can load
    assert beat.healthy


async def test_a_comfyui_renderer_keeps_the_next_prompt_queued_in_comfyui(
    rig: Rig, comfyui_factory: ComfyUIFactory
) -> None:
    """Prefetch defaults to 2 on ComfyUI: while one job renders, the next is already
    waiting in ComfyUI's own queue, so the GPU never waits on us between jobs."""
    comfyui = await comfyui_factory(step_seconds=0.05)
    worker = await comfy_renderer(rig, comfyui.url)
    first = await submit(rig, "a", steps=20)
    second = await submit(rig, "b", steps=2, seed=2)

    async with asyncio.timeout(30):
        while len(comfyui.submitted) < 2:
            await asyncio.sleep(0.02)
    assert comfyui.executed == []  # both handed to ComfyUI before the first finished

    for job_id in (first, second):
        assert isinstance(await rig.front.tracker.wait(job_id, timeout=30), Succeeded)
    assert worker.prefetch == 2
    assert comfyui.executed == [first, second]
