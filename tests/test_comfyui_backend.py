"""The ``comfyui`` backend (``renderer.comfyui.backend``) against the ComfyUI emulator,
over real sockets, with a recording reporter in place of the worker's."""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from PIL import Image

from jobs.models import FailureReason
from renderer.backends.base import Backend, RenderResult, RenderTask, Scalar
from renderer.comfyui import backend as comfyui_backend
from renderer.comfyui.backend import ComfyUIBackend, create, default_client_id
from renderer.comfyui.client import ComfyUIClient
from renderer.exceptions import (
    BackendUnavailable,
    InvalidWorkflow,
    OutOfMemoryExhausted,
    RenderCancelled,
    RenderError,
    RenderTimeout,
)
from renderer.settings import ComfyUISettings, RendererSettings
from tests.emulators.comfyui import ComfyUIEmulator
from tests.fixtures.comfyui import ComfyUIFactory
from workflows import Catalog

SD15 = Catalog.load().get("sd15-txt2img")
PREVIEW_SIDE = 64


def graph(**params: Scalar) -> dict[str, Any]:
    values: dict[str, Scalar] = {
        "prompt": "a lighthouse at dusk",
        "seed": 1,
        "steps": 4,
        "width": 64,
        "height": 72,
    }
    values.update(params)
    return SD15.bind(SD15.resolve(values))


def task(attempt: int = 1, **params: Scalar) -> RenderTask:
    return RenderTask(
        job_id=str(uuid.uuid4()),
        attempt=attempt,
        workflow="sd15-txt2img",
        graph=graph(**params),
        params=params,
    )


class RecordingReporter:
    def __init__(self) -> None:
        self.progress_calls: list[tuple[int, int, str | None]] = []
        self.previews: list[tuple[bytes, str, int | None]] = []
        self.stepped = asyncio.Event()

    async def progress(self, step: int, total: int, node: str | None = None) -> None:
        self.progress_calls.append((step, total, node))
        self.stepped.set()

    async def preview(self, image: bytes, mime: str, step: int | None = None) -> None:
        self.previews.append((image, mime, step))

    def wants_preview(self) -> bool:
        return True

    async def reached(self, step: int) -> None:
        while not any(s >= step for s, _, _ in self.progress_calls):
            self.stepped.clear()
            await self.stepped.wait()


BackendFactory = Callable[..., Awaitable[ComfyUIBackend]]


@pytest.fixture
async def backend_factory() -> AsyncIterator[BackendFactory]:
    made: list[ComfyUIBackend] = []

    async def make(url: str, *, start: bool = True, **options: Any) -> ComfyUIBackend:
        options.setdefault("connect_timeout_seconds", 2.0)
        options.setdefault("request_timeout_seconds", 5.0)
        options.setdefault("stall_seconds", 10.0)
        backend = ComfyUIBackend(
            RendererSettings(
                worker_id=f"test-{uuid.uuid4().hex[:8]}", preview_max_side=PREVIEW_SIDE
            ),
            ComfyUISettings(url=url, **options),
        )
        made.append(backend)
        if start:
            await backend.start()
        return backend

    yield make
    for backend in made:
        await backend.close()


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.size


async def wait_until_pending(client: ComfyUIClient, prompt_id: str) -> None:
    while (await client.queue()).place(prompt_id) != "pending":
        await asyncio.sleep(0.01)


async def test_is_a_backend(comfyui: ComfyUIEmulator, backend_factory: BackendFactory) -> None:
    backend: Backend = await backend_factory(comfyui.url)

    described = backend.describe()

    assert backend.name == "comfyui"
    assert described["backend"] == "comfyui"
    assert described["url"] == comfyui.url
    assert "RTX 4090" in described["device"]
    assert described["vram_total"] == 24 * 2**30
    assert 0 < described["vram_free"] <= described["vram_total"]
    assert described["healthy"] is True


async def test_a_clean_render(comfyui: ComfyUIEmulator, backend_factory: BackendFactory) -> None:
    backend = await backend_factory(comfyui.url)
    reporter = RecordingReporter()
    job = task(batch=2)

    result = await backend.render(job, reporter)

    assert isinstance(result, RenderResult)
    assert [png_size(image) for image in result.images] == [(64, 72), (64, 72)]
    assert reporter.progress_calls == [(step, 4, "KSampler") for step in range(1, 5)]
    assert reporter.previews
    for image, mime, _ in reporter.previews:
        with Image.open(io.BytesIO(image)) as preview:
            assert Image.MIME[preview.format or ""] == mime
            assert max(preview.size) == PREVIEW_SIDE
    assert comfyui.executed == [job.job_id]
    submitted = comfyui.submitted[0]
    assert submitted["prompt_id"] == job.job_id
    assert submitted["client_id"] == backend.client.client_id
    assert submitted["extra_data"] == {"preview_method": "auto"}
    assert await backend.client.history(job.job_id) is None
    assert {"comfyui", "fetch"} <= set(result.timings)


async def test_a_preview_nobody_wants_is_not_prepared(
    comfyui: ComfyUIEmulator, backend_factory: BackendFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's throttle would drop it: no decode, no encode, no call."""
    backend = await backend_factory(comfyui.url)
    reporter = RecordingReporter()
    monkeypatch.setattr(reporter, "wants_preview", lambda: False)
    encoded: list[int] = []

    def encode(*args: object, **kwargs: object) -> tuple[bytes, str]:
        encoded.append(1)
        return b"", "image/webp"

    monkeypatch.setattr("renderer.comfyui.backend.encode_preview", encode)

    await backend.render(task(), reporter)

    assert reporter.previews == [] and encoded == []
    assert len(reporter.progress_calls) == 4


async def test_a_dropped_websocket_still_completes_once(
    comfyui_factory: ComfyUIFactory, backend_factory: BackendFactory
) -> None:
    comfyui = await comfyui_factory(step_seconds=0.02)
    comfyui.faults.drop_ws_at_step = 2
    backend = await backend_factory(comfyui.url)
    job = task(steps=10)

    result = await backend.render(job, RecordingReporter())

    assert len(result.images) == 1
    assert comfyui.executed == [job.job_id]
    assert len(comfyui.submitted) == 1


async def test_a_crashed_and_restarted_server_means_backend_down(
    comfyui_factory: ComfyUIFactory, backend_factory: BackendFactory
) -> None:
    comfyui = await comfyui_factory(step_seconds=0.02)
    comfyui.faults.crash_at_step = 2
    backend = await backend_factory(comfyui.url)
    reporter = RecordingReporter()
    render = asyncio.create_task(backend.render(task(steps=10), reporter))
    await reporter.reached(2)
    await comfyui.stop()
    await comfyui.start(port=comfyui.port)

    with pytest.raises(BackendUnavailable) as caught:
        await render

    assert caught.value.transient and caught.value.reason is FailureReason.BACKEND_DOWN
    # The backend recovers by itself: the next job renders on the restarted server.
    assert len((await backend.render(task(), RecordingReporter())).images) == 1


async def test_a_hang_is_interrupted_and_retried(
    comfyui: ComfyUIEmulator, backend_factory: BackendFactory
) -> None:
    comfyui.faults.hang_next = 1
    backend = await backend_factory(comfyui.url, stall_seconds=0.5)
    job = task()

    with pytest.raises(RenderTimeout) as caught:
        await backend.render(job, RecordingReporter())

    assert caught.value.transient and caught.value.reason is FailureReason.TIMEOUT
    assert comfyui.interrupts == [{"prompt_id": job.job_id}]


async def test_out_of_memory_once_frees_and_retries(
    comfyui: ComfyUIEmulator, backend_factory: BackendFactory
) -> None:
    comfyui.faults.oom_next = 1
    backend = await backend_factory(comfyui.url)
    job = task()

    result = await backend.render(job, RecordingReporter())

    assert len(result.images) == 1
    assert comfyui.free_calls == 1
    assert [body["prompt_id"] for body in comfyui.submitted] == [job.job_id, job.job_id]
    assert await backend.client.history(job.job_id) is None


async def test_out_of_memory_twice_fails_for_good(
    comfyui: ComfyUIEmulator, backend_factory: BackendFactory
) -> None:
    comfyui.faults.oom_next = 2
    backend = await backend_factory(comfyui.url)

    with pytest.raises(OutOfMemoryExhausted) as caught:
        await backend.render(task(), RecordingReporter())

    assert caught.value.reason is FailureReason.OOM and not caught.value.transient
    assert caught.value.user_message == (
        "The image was too large for this GPU's memory. Try a smaller size or fewer images."
    )
    assert comfyui.free_calls == 1


async def test_a_validation_error_is_permanent_and_names_node_and_input(
    comfyui: ComfyUIEmulator, backend_factory: BackendFactory
) -> None:
    backend = await backend_factory(comfyui.url)

    with pytest.raises(InvalidWorkflow) as caught:
        await backend.render(task(checkpoint="x.safetensors"), RecordingReporter())

    assert not caught.value.transient and caught.value.reason is FailureReason.INVALID
    assert caught.value.user_message == (
        'Node 4 (Load Checkpoint, CheckpointLoaderSimple): ckpt_name "x.safetensors" '
        "is not in the list of files on this server"
    )
    assert "Traceback" not in caught.value.user_message


async def test_an_execution_error_is_classified_with_a_safe_message(
    comfyui: ComfyUIEmulator, backend_factory: BackendFactory
) -> None:
    comfyui.faults.error_next = 1
    backend = await backend_factory(comfyui.url)
    job = task()

    with pytest.raises(RenderError) as caught:
        await backend.render(job, RecordingReporter())

    assert not caught.value.transient and caught.value.reason is FailureReason.INTERNAL
    message = caught.value.user_message
    assert message.startswith(
        "The render failed in Node 4 (Load Checkpoint, CheckpointLoaderSimple)"
    )
    assert "SafetensorError" in message
    assert "Traceback" not in message and "File " not in message and "/" not in message
    assert await backend.client.history(job.job_id) is None


async def test_cancel_a_pending_prompt(
    comfyui: ComfyUIEmulator, backend_factory: BackendFactory, other_client: ComfyUIClient
) -> None:
    comfyui.step_seconds = 0.02
    others = str(uuid.uuid4())
    await other_client.submit(graph(steps=150, seed=9), others)
    backend = await backend_factory(comfyui.url)
    job = task()
    render = asyncio.create_task(backend.render(job, RecordingReporter()))
    await wait_until_pending(backend.client, job.job_id)

    assert await backend.cancel(job.job_id)
    with pytest.raises(RenderCancelled) as caught:
        await render

    assert caught.value.reason is FailureReason.CANCELLED
    state = await backend.client.queue()
    assert state.pending == () and state.running == (others,)
    assert comfyui.interrupts == []  # the other renderer's running prompt is not touched
    await other_client.interrupt(others)
    assert await comfyui.wait_executed(1) == [others]
    await asyncio.sleep(0.05)
    assert job.job_id not in comfyui.executed


async def test_cancel_a_running_prompt(
    comfyui: ComfyUIEmulator, backend_factory: BackendFactory, other_client: ComfyUIClient
) -> None:
    comfyui.step_seconds = 0.02
    backend = await backend_factory(comfyui.url)
    reporter = RecordingReporter()
    job = task(steps=150)
    render = asyncio.create_task(backend.render(job, reporter))
    await reporter.reached(1)
    others = str(uuid.uuid4())
    await other_client.submit(graph(seed=9), others)

    assert await backend.cancel(job.job_id)
    with pytest.raises(RenderCancelled):
        await render

    assert comfyui.interrupts == [{"prompt_id": job.job_id}]
    assert await comfyui.wait_executed(2) == [job.job_id, others]
    while (entry := await other_client.history(others)) is None:
        await asyncio.sleep(0.01)
    assert entry["status"]["status_str"] == "success"


async def test_cancel_of_an_unknown_prompt_does_nothing(
    comfyui: ComfyUIEmulator, backend_factory: BackendFactory
) -> None:
    backend = await backend_factory(comfyui.url)

    assert await backend.cancel(str(uuid.uuid4())) is False
    assert comfyui.interrupts == []


async def cancelled_render(backend: ComfyUIBackend, job: RenderTask) -> None:
    """Start rendering ``job``, cancel the render once it made progress, see it end."""
    reporter = RecordingReporter()
    render = asyncio.create_task(backend.render(job, reporter))
    await reporter.reached(1)
    render.cancel()
    with pytest.raises(asyncio.CancelledError):
        await render


async def test_a_cancelled_render_interrupts_its_prompt(
    comfyui: ComfyUIEmulator, backend_factory: BackendFactory
) -> None:
    comfyui.step_seconds = 0.02
    backend = await backend_factory(comfyui.url)
    job = task(steps=150)

    await cancelled_render(backend, job)

    assert comfyui.interrupts == [{"prompt_id": job.job_id}]
    assert await comfyui.wait_executed(1) == [job.job_id]


async def test_a_job_back_while_its_interrupted_prompt_still_runs_renders_again(
    comfyui: ComfyUIEmulator, backend_factory: BackendFactory
) -> None:
    # A worker that loses its broker connection stops its renders and the broker hands
    # the jobs out again at once, here too. ComfyUI may still be running the prompt our
    # interrupt has not reached yet: the new attempt must not attach to it and end as
    # cancelled (CI saw that: "job.failed reason=cancelled" under connection cuts).
    comfyui.step_seconds = 0.02
    comfyui.interrupt_delay = 0.5  # it runs on for 25 of its 60 steps
    backend = await backend_factory(comfyui.url)
    first = task(steps=60)
    await cancelled_render(backend, first)
    again = RenderTask(first.job_id, 2, first.workflow, first.graph, first.params)

    result = await backend.render(again, RecordingReporter())

    assert len(result.images) == 1
    assert comfyui.interrupts == [{"prompt_id": first.job_id}]
    assert len(comfyui.submitted) == 2
    assert comfyui.executed == [first.job_id, first.job_id]


async def test_a_redelivered_job_reuses_the_earlier_result(
    comfyui: ComfyUIEmulator, backend_factory: BackendFactory
) -> None:
    backend = await backend_factory(comfyui.url)
    first = task()
    await backend.client.submit(first.graph, first.job_id)  # an attempt that then died
    await comfyui.wait_executed(1)
    while await backend.client.history(first.job_id) is None:
        await asyncio.sleep(0.01)
    again = RenderTask(first.job_id, 2, first.workflow, first.graph, first.params)

    result = await backend.render(again, RecordingReporter())

    assert len(result.images) == 1
    assert len(comfyui.submitted) == 1
    assert comfyui.executed == [first.job_id]


async def test_connection_refused_at_start(backend_factory: BackendFactory) -> None:
    backend = await backend_factory("http://127.0.0.1:1", start=False, connect_timeout_seconds=0.3)

    with pytest.raises(BackendUnavailable) as caught:
        await backend.start()

    assert caught.value.transient and caught.value.reason is FailureReason.BACKEND_DOWN
    assert backend.describe()["healthy"] is False
    with pytest.raises(BackendUnavailable):
        await backend.render(task(), RecordingReporter())


async def test_create_reads_the_comfyui_settings(
    comfyui: ComfyUIEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMFYUI_URL", comfyui.url)
    monkeypatch.setenv("COMFYUI_PREVIEW_METHOD", "none")
    settings = RendererSettings(worker_id="gpu-host-3")
    backend = create(settings)
    try:
        await backend.start()
        reporter = RecordingReporter()
        await backend.render(task(), reporter)
    finally:
        await backend.close()
        await backend.close()

    assert reporter.previews == []
    assert comfyui.submitted[0]["client_id"] == default_client_id("gpu-host-3")
    assert default_client_id("gpu-host-3") != default_client_id("gpu-host-4")
    assert comfyui_backend.create is create


@pytest.mark.parametrize("url", [None, "localhost:8188"])
async def test_a_missing_or_unusable_url_is_backend_down(url: str | None) -> None:
    backend = ComfyUIBackend(RendererSettings(worker_id="w"), ComfyUISettings(url=url))

    with pytest.raises(BackendUnavailable):
        await backend.start()

    assert backend.describe()["healthy"] is False
    await backend.close()


async def test_model_load_time_is_measured_and_a_cached_loader_loads_nothing(
    comfyui_factory: ComfyUIFactory, backend_factory: BackendFactory
) -> None:
    emulator = await comfyui_factory(model_load_seconds=0.3)
    backend = await backend_factory(emulator.url)
    checkpoint = str(graph()["4"]["inputs"]["ckpt_name"])

    cold = await backend.render(task(seed=1), RecordingReporter())
    warm = await backend.render(task(seed=2), RecordingReporter())  # the loader is cached
    described = backend.describe()

    assert cold.timings["model_load"] >= 0.3
    assert "model_load" not in warm.timings
    assert described["model_load_seconds"][checkpoint] >= 0.3
    assert described["models"][0] == checkpoint


async def test_the_model_files_comfyui_can_load_are_listed_per_folder(
    comfyui: ComfyUIEmulator, backend_factory: BackendFactory
) -> None:
    from tests.emulators.comfyui import DEFAULT_CHECKPOINTS

    backend = await backend_factory(comfyui.url)

    available = backend.describe()["available_models"]

    assert available["checkpoints"] == sorted(DEFAULT_CHECKPOINTS)
    assert available["loras"]  # the emulator's LoRA files, from LoraLoader's value list
    assert set(available) <= {"checkpoints", "loras", "controlnet", "upscale_models"}
