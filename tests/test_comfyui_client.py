"""The ComfyUI client (``renderer.comfyui.client``), its frames and its error table.

The first half checks parsing and classification against the recordings of a real
ComfyUI 0.8.0 (``tests/recordings.py`` finds them; missing, those tests fail); the second
half drives the client over real sockets against the emulator.
"""

from __future__ import annotations

import asyncio
import io
import json
import struct
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from PIL import Image

from jobs.models import FailureReason
from renderer.backends.base import Scalar
from renderer.comfyui import client as client_module
from renderer.comfyui import exceptions as errors
from renderer.comfyui.client import ComfyUIClient, RunResult
from renderer.comfyui.frames import BinaryEventType, FrameError, PreviewFrame, parse_binary_frame
from renderer.exceptions import BackendUnavailable, InvalidWorkflow, OutOfMemory
from tests.emulators.comfyui import ComfyUIEmulator
from tests.fixtures.comfyui import ComfyUIFactory
from tests.recordings import recording, recordings_dir
from workflows import Catalog


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.size


# -- binary frames ---------------------------------------------------------------------


def test_type_1_frame_from_the_recording() -> None:
    jpeg = (recordings_dir() / "sampler_legacy_preview0.jpg").read_bytes()
    frame = bytes.fromhex("0000000100000001") + jpeg

    parsed = parse_binary_frame(frame)

    assert parsed == PreviewFrame(jpeg, "image/jpeg", BinaryEventType.PREVIEW_IMAGE)
    assert parsed.prompt_id is None


def test_type_4_frame_from_the_recording() -> None:
    recorded = recording("sampler.json")["metadata_client"]
    meta = next(f for f in recorded["ws_frames"] if f["kind"] == "binary")
    jpeg = (recordings_dir() / "sampler_meta_preview0.jpg").read_bytes()
    metadata = json.dumps(meta["metadata"]).encode()
    frame = struct.pack(">II", 4, len(metadata)) + metadata + jpeg

    parsed = parse_binary_frame(frame)

    assert parsed is not None
    assert parsed.event_type is BinaryEventType.PREVIEW_IMAGE_WITH_METADATA
    assert parsed.prompt_id == meta["metadata"]["prompt_id"]
    assert parsed.node_id == "3"
    assert parsed.mime == "image/jpeg"
    assert parsed.image == jpeg
    with Image.open(io.BytesIO(parsed.image)) as image:
        assert image.size == (512, 512)


def test_png_type_1_frame_and_other_types() -> None:
    png = parse_binary_frame(struct.pack(">II", 1, 2) + b"\x89PNG...")

    assert png is not None and png.mime == "image/png" and png.image == b"\x89PNG..."
    assert parse_binary_frame(struct.pack(">I", 3) + b"some text") is None


@pytest.mark.parametrize(
    "frame",
    [
        b"\x00\x00",
        struct.pack(">I", 1),
        struct.pack(">II", 1, 7) + b"x",
        struct.pack(">II", 1, 1),
        struct.pack(">II", 4, 100) + b"{}",
        struct.pack(">II", 4, 2) + b"[]" + b"img",
        struct.pack(">II", 4, 3) + b"{x}" + b"img",
    ],
)
def test_malformed_preview_frames_raise(frame: bytes) -> None:
    with pytest.raises(FrameError):
        parse_binary_frame(frame)


# -- what ComfyUI's answers mean ------------------------------------------------------

GRAPH_WITH_TITLES: dict[str, Any] = {
    "4": {
        "class_type": "CheckpointLoaderSimple",
        "inputs": {"ckpt_name": "nope.safetensors"},
        "_meta": {"title": "Load Checkpoint"},
    },
    "1": {"class_type": "EmptyImage", "inputs": {}, "_meta": {"title": "EmptyImage"}},
    "2": {"class_type": "ImageBlur", "inputs": {}},
}


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (
            "bad_ckpt_name",
            'Node 4 (Load Checkpoint, CheckpointLoaderSimple): ckpt_name "nope.safetensors" '
            "is not in the list of files on this server",
        ),
        ("missing_required_input", "Node 1 (EmptyImage): width is missing"),
        ("value_above_max", "Node 2 (ImageBlur): blur_radius 99 is above the maximum of 31"),
        ("wrong_type_value", 'Node 1 (EmptyImage): width "abc" is not a valid INT'),
        (
            "link_to_missing_node",
            "Node 2 (ImageBlur): images is linked to node 77, which is not in the workflow",
        ),
        (
            "unknown_class",
            "Node 2 (ImageBlur): Cannot execute because node NoSuchNode does not exist.",
        ),
        ("no_output_node", "Prompt has no outputs"),
        ("no_prompt_key", "No prompt provided"),
    ],
)
def test_rejections_name_the_node_and_input(case: str, expected: str) -> None:
    body = recording("errors.json")[case]["json"]

    rejected = errors.rejection(body, GRAPH_WITH_TITLES)

    assert isinstance(rejected, InvalidWorkflow)
    assert not rejected.transient
    assert rejected.reason is FailureReason.INVALID
    assert rejected.user_message == expected
    assert "Traceback" not in rejected.user_message and "/opt" not in rejected.user_message


def test_a_400_that_is_not_a_validation_answer_is_not_a_rejection() -> None:
    assert errors.rejection({"unexpected": True}, {}) is None
    assert errors.rejection([1, 2], {}) is None


def test_recorded_execution_error_is_permanent_with_a_safe_message() -> None:
    run = recording("errors.json")["runtime_error_run"]
    data = next(f["msg"]["data"] for f in run["ws_frames"] if f["msg"]["type"] == "execution_error")

    failure = errors.execution_failure(data, run["request_body"]["prompt"])

    assert isinstance(failure, errors.ExecutionFailed)
    assert not failure.transient
    assert failure.reason is FailureReason.INTERNAL
    assert failure.user_message == (
        "The render failed in Node 4 (CheckpointLoaderSimple): SafetensorError: "
        "Error while deserializing header: header too large"
    )
    assert failure.node_id == "4"
    assert "/opt" not in str(failure) and "File " not in str(failure)


@pytest.mark.parametrize(
    ("exception_type", "message"),
    [
        ("torch.OutOfMemoryError", "Allocation on device 0 would exceed allowed memory."),
        ("torch.cuda.OutOfMemoryError", "CUDA out of memory. Tried to allocate 2.00 GiB"),
        ("RuntimeError", "Allocation on device"),
    ],
)
def test_oom_markers_mean_out_of_memory(exception_type: str, message: str) -> None:
    failure = errors.execution_failure(
        {
            "node_id": "3",
            "node_type": "KSampler",
            "exception_type": exception_type,
            "exception_message": message,
        },
        {},
    )

    assert isinstance(failure, OutOfMemory)
    assert failure.reason is FailureReason.OOM
    assert failure.transient


def test_environment_errors_are_transient_and_paths_are_hidden() -> None:
    failure = errors.execution_failure(
        {
            "node_id": "9",
            "node_type": "SaveImage",
            "exception_type": "ConnectionResetError",
            "exception_message": "[Errno 104] reset writing /srv/comfy/output/x.png\nmore",
        },
        {"9": {"class_type": "SaveImage", "_meta": {"title": "Save"}}},
    )

    assert isinstance(failure, errors.ExecutionGlitch)
    assert failure.transient
    assert failure.user_message == (
        "The render failed in Node 9 (Save, SaveImage): ConnectionResetError: "
        "[Errno 104] reset writing <path>"
    )


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (500, BackendUnavailable),
        (503, BackendUnavailable),
        (429, BackendUnavailable),
        (404, errors.UnexpectedResponse),
        (405, errors.UnexpectedResponse),
    ],
)
def test_status_codes(status: int, kind: type[Exception]) -> None:
    error = errors.for_status(status, "GET", "/x", "500 Internal Server Error\n\nServer got")

    assert isinstance(error, kind)
    assert error.transient


# -- over sockets, against the emulator -----------------------------------------------

SD15 = Catalog.load().get("sd15-txt2img")


def graph(**params: Scalar) -> dict[str, Any]:
    """The built-in SD 1.5 workflow, bound: small and quick on the emulator."""
    values: dict[str, Scalar] = {
        "prompt": "a lighthouse at dusk",
        "seed": 1,
        "steps": 4,
        "width": 64,
        "height": 72,
    }
    values.update(params)
    return SD15.bind(SD15.resolve(values))


def job_id() -> str:
    return str(uuid.uuid4())


class Seen:
    """What a run reported through its callbacks."""

    def __init__(self) -> None:
        self.progress: list[tuple[int, int, str | None]] = []
        self.previews: list[tuple[PreviewFrame, int | None]] = []
        self.stepped = asyncio.Event()

    async def on_progress(self, step: int, total: int, node: str | None) -> None:
        self.progress.append((step, total, node))
        self.stepped.set()

    async def on_preview(self, frame: PreviewFrame, step: int | None) -> None:
        self.previews.append((frame, step))

    async def reached(self, step: int) -> None:
        while not any(s >= step for s, _, _ in self.progress):
            self.stepped.clear()
            await self.stepped.wait()


ClientFactory = Callable[..., Awaitable[ComfyUIClient]]


@pytest.fixture
async def client_factory() -> AsyncIterator[ClientFactory]:
    clients: list[ComfyUIClient] = []

    async def make(emulator: ComfyUIEmulator, **options: Any) -> ComfyUIClient:
        options.setdefault("connect_timeout", 2.0)
        options.setdefault("request_timeout", 5.0)
        client = ComfyUIClient(emulator.url, options.pop("client_id", uuid.uuid4().hex), **options)
        clients.append(client)
        await client.connect()
        return client

    yield make
    for client in clients:
        await client.close()


async def run(client: ComfyUIClient, seen: Seen, prompt_id: str, **options: Any) -> RunResult:
    return await client.run(
        prompt_id,
        options.pop("graph", None) or graph(),
        on_progress=seen.on_progress,
        on_preview=seen.on_preview,
        **options,
    )


@pytest.mark.parametrize(
    ("metadata", "frame_type"),
    [
        (True, BinaryEventType.PREVIEW_IMAGE_WITH_METADATA),
        (False, BinaryEventType.PREVIEW_IMAGE),
    ],
)
async def test_a_clean_run(
    comfyui: ComfyUIEmulator,
    client_factory: ClientFactory,
    metadata: bool,
    frame_type: BinaryEventType,
) -> None:
    client = await client_factory(comfyui, preview_metadata=metadata)
    seen = Seen()
    prompt_id = job_id()

    result = await run(client, seen, prompt_id, extra_data={"preview_method": "latent2rgb"})

    assert [png_size(image) for image in result.images] == [(64, 72)]
    assert [file.node_id for file in result.files] == ["9"]
    assert seen.progress == [(step, 4, "KSampler") for step in range(1, 5)]
    assert len(seen.previews) >= 1
    assert {frame.event_type for frame, _ in seen.previews} == {frame_type}
    for frame, _ in seen.previews:
        assert frame.mime == "image/jpeg"
        with Image.open(io.BytesIO(frame.image)) as preview:
            assert max(preview.size) == 512  # scaled to --preview-size
    assert comfyui.executed == [prompt_id]
    body = comfyui.submitted[0]
    assert body["prompt_id"] == prompt_id and body["client_id"] == client.client_id
    assert body["extra_data"] == {"preview_method": "latent2rgb"}
    assert await client.history(prompt_id) is None


async def test_a_batch_comes_back_in_output_order(
    comfyui: ComfyUIEmulator, client_factory: ClientFactory
) -> None:
    client = await client_factory(comfyui)

    result = await run(client, Seen(), job_id(), graph=graph(batch=3))

    assert len(result.images) == 3
    assert [file.filename for file in result.files] == sorted(f.filename for f in result.files)
    assert all(png_size(image) == (64, 72) for image in result.images)


async def test_preview_method_none_sends_no_previews(
    comfyui: ComfyUIEmulator, client_factory: ClientFactory
) -> None:
    client = await client_factory(comfyui)
    seen = Seen()

    await run(client, seen, job_id(), extra_data={"preview_method": "none"})

    assert seen.previews == []
    assert len(seen.progress) == 4


async def test_a_dropped_websocket_mid_run_still_completes_once(
    comfyui_factory: ComfyUIFactory, client_factory: ClientFactory
) -> None:
    comfyui = await comfyui_factory(step_seconds=0.02)
    comfyui.faults.drop_ws_at_step = 2
    client = await client_factory(comfyui)
    seen = Seen()
    prompt_id = job_id()

    result = await run(client, seen, prompt_id, graph=graph(steps=30))

    assert len(result.images) == 1
    assert comfyui.executed == [prompt_id]
    assert len(comfyui.submitted) == 1
    assert seen.progress[-1][0] == 30  # frames resumed on the new socket
    assert client.connected


async def test_a_restarted_server_loses_the_prompt(
    comfyui_factory: ComfyUIFactory, client_factory: ClientFactory
) -> None:
    comfyui = await comfyui_factory(step_seconds=0.02)
    comfyui.faults.crash_at_step = 2
    client = await client_factory(comfyui)
    seen = Seen()
    running = asyncio.create_task(run(client, seen, job_id(), stall_seconds=10.0))
    await seen.reached(2)
    await comfyui.stop()
    await comfyui.start(port=comfyui.port)

    with pytest.raises(errors.PromptLost) as caught:
        await running

    assert isinstance(caught.value, BackendUnavailable)
    assert caught.value.transient


async def test_a_stall_interrupts_only_that_prompt(
    comfyui: ComfyUIEmulator, client_factory: ClientFactory
) -> None:
    comfyui.faults.hang_next = 1
    client = await client_factory(comfyui)
    prompt_id = job_id()

    with pytest.raises(errors.PromptStalled) as caught:
        await run(client, Seen(), prompt_id, stall_seconds=0.5)

    assert caught.value.reason is FailureReason.TIMEOUT and caught.value.transient
    assert comfyui.interrupts == [{"prompt_id": prompt_id}]
    assert await client.history(prompt_id) is None


async def test_waiting_in_comfyuis_queue_is_not_a_stall(
    comfyui_factory: ComfyUIFactory, client_factory: ClientFactory
) -> None:
    """A worker keeps ComfyUI's queue fed: the second prompt waits behind the first for
    longer than the stall limit, and still runs."""
    comfyui = await comfyui_factory(step_seconds=0.05)
    client = await client_factory(comfyui)
    first, second = job_id(), job_id()

    results = await asyncio.gather(
        run(client, Seen(), first, graph=graph(steps=20), stall_seconds=0.5),
        run(client, Seen(), second, graph=graph(steps=2, seed=2), stall_seconds=0.5),
    )

    assert all(len(result.images) == 1 for result in results)
    assert comfyui.executed == [first, second]
    assert comfyui.interrupts == []


async def test_an_out_of_memory_error(
    comfyui: ComfyUIEmulator, client_factory: ClientFactory
) -> None:
    comfyui.faults.oom_next = 1
    client = await client_factory(comfyui)

    with pytest.raises(errors.GPUOutOfMemory) as caught:
        await run(client, Seen(), job_id())

    assert caught.value.reason is FailureReason.OOM
    assert caught.value.node_id == "3"


async def test_a_validation_error_names_node_and_input(
    comfyui: ComfyUIEmulator, client_factory: ClientFactory
) -> None:
    client = await client_factory(comfyui)

    with pytest.raises(errors.PromptRejected) as caught:
        await run(client, Seen(), job_id(), graph=graph(checkpoint="x.safetensors"))

    assert caught.value.user_message == (
        'Node 4 (Load Checkpoint, CheckpointLoaderSimple): ckpt_name "x.safetensors" '
        "is not in the list of files on this server"
    )
    assert comfyui.submitted == []


async def test_reuses_a_finished_prompt_of_an_earlier_attempt(
    comfyui: ComfyUIEmulator, client_factory: ClientFactory
) -> None:
    client = await client_factory(comfyui)
    prompt_id = job_id()
    await client.submit(graph(), prompt_id)
    await comfyui.wait_executed(1)
    while await client.history(prompt_id) is None:
        await asyncio.sleep(0.01)

    result = await run(client, Seen(), prompt_id, reuse=True)

    assert result.reused
    assert len(result.images) == 1
    assert len(comfyui.submitted) == 1
    assert await client.history(prompt_id) is None


async def test_attaches_to_a_prompt_still_running(
    comfyui: ComfyUIEmulator, client_factory: ClientFactory
) -> None:
    client = await client_factory(comfyui)
    prompt_id = job_id()
    await client.submit(graph(steps=20), prompt_id)
    seen = Seen()

    result = await run(client, seen, prompt_id, reuse=True)

    assert not result.reused and len(result.images) == 1
    assert len(comfyui.submitted) == 1
    assert comfyui.executed == [prompt_id]


async def test_cancel_a_running_prompt_leaves_others_alone(
    comfyui_factory: ComfyUIFactory, client_factory: ClientFactory
) -> None:
    comfyui = await comfyui_factory(step_seconds=0.02)
    client = await client_factory(comfyui)
    other = await client_factory(comfyui)
    seen = Seen()
    prompt_id = job_id()
    running = asyncio.create_task(run(client, seen, prompt_id, graph=graph(steps=150)))
    await seen.reached(1)
    other_id = job_id()
    await other.submit(graph(seed=2), other_id)

    assert await client.cancel(prompt_id)
    with pytest.raises(errors.PromptInterrupted) as caught:
        await running

    assert caught.value.requested and caught.value.reason is FailureReason.CANCELLED
    assert comfyui.interrupts == [{"prompt_id": prompt_id}]
    assert await comfyui.wait_executed(2) == [prompt_id, other_id]
    while (entry := await other.history(other_id)) is None:
        await asyncio.sleep(0.01)
    assert entry["status"]["status_str"] == "success"


async def test_http_calls(comfyui: ComfyUIEmulator, client_factory: ClientFactory) -> None:
    client = await client_factory(comfyui)

    stats = await client.system_stats()
    info = await client.object_info("CheckpointLoaderSimple")
    queue = await client.queue()
    await client.free()
    await client.interrupt(job_id())

    assert stats["system"]["comfyui_version"] == "0.8.0"
    assert "CheckpointLoaderSimple" in info
    assert await client.object_info("NoSuchNode") == {}
    assert queue.running == () and queue.pending == ()
    assert comfyui.free_calls == 1
    assert await client.history(job_id()) is None
    with pytest.raises(errors.UnexpectedResponse):
        await client.view("missing.png")


async def test_connection_refused_is_backend_down() -> None:
    client = ComfyUIClient("http://127.0.0.1:1", "c", connect_timeout=0.3, request_timeout=1)
    try:
        with pytest.raises(errors.ComfyUIUnavailable) as caught:
            await client.connect()
        with pytest.raises(errors.ComfyUIUnavailable):
            await client.system_stats()
    finally:
        await client.close()

    assert caught.value.reason is FailureReason.BACKEND_DOWN and caught.value.transient


async def test_a_server_that_never_answers_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = ComfyUIClient(
        f"http://127.0.0.1:{port}", "c", connect_timeout=0.3, request_timeout=0.3
    )
    try:
        with pytest.raises(errors.ComfyUIUnavailable, match=r"within 0\.3s"):
            await client.system_stats()
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


async def test_a_failing_callback_stops_the_prompt(
    comfyui: ComfyUIEmulator, client_factory: ClientFactory
) -> None:
    comfyui.step_seconds = 0.02
    client = await client_factory(comfyui)
    prompt_id = job_id()

    async def broken(step: int, total: int, node: str | None) -> None:
        raise LookupError("the reporter broke")

    with pytest.raises(LookupError):
        await client.run(prompt_id, graph(steps=100), on_progress=broken)

    assert comfyui.interrupts == [{"prompt_id": prompt_id}]
    assert await comfyui.wait_executed(1) == [prompt_id]


async def test_a_prompt_that_ended_while_disconnected_is_read_from_history(
    comfyui_factory: ComfyUIFactory, client_factory: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    comfyui = await comfyui_factory(step_seconds=0.01)
    comfyui.faults.drop_ws_at_step = 2
    client = await client_factory(comfyui)
    finished = asyncio.Event()
    open_ws = ComfyUIClient._open_ws

    async def reconnect_late(self: ComfyUIClient) -> Any:
        await finished.wait()  # the prompt ends (its end frame lost) before we are back
        return await open_ws(self)

    monkeypatch.setattr(ComfyUIClient, "_open_ws", reconnect_late)
    prompt_id = job_id()
    running = asyncio.create_task(run(client, Seen(), prompt_id, graph=graph(steps=6)))
    await comfyui.wait_executed(1)
    finished.set()

    result = await running

    assert len(result.images) == 1 and png_size(result.images[0]) == (64, 72)
    assert comfyui.executed == [prompt_id]
    assert await client.history(prompt_id) is None


async def test_the_reader_gives_up_and_starts_again_when_needed(
    comfyui_factory: ComfyUIFactory, client_factory: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "RECONNECT_ATTEMPTS", 2)
    comfyui = await comfyui_factory(step_seconds=0.02)
    client = await client_factory(comfyui, reconnect_max_seconds=0.05)
    seen = Seen()
    running = asyncio.create_task(run(client, seen, job_id(), graph=graph(steps=100)))
    await seen.reached(1)
    await comfyui.stop()

    with pytest.raises(errors.ComfyUIUnavailable, match="for good"):
        await running
    await comfyui.start(port=comfyui.port)
    result = await run(client, Seen(), job_id())

    assert len(result.images) == 1


async def test_a_prompt_whose_frames_went_astray_is_found_in_history(
    comfyui: ComfyUIEmulator, client_factory: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await client_factory(comfyui)
    # As when ComfyUI unregistered this socket: no frame of the prompt arrives.
    monkeypatch.setattr(client, "_on_text", lambda text: None)
    prompt_id = job_id()

    result = await run(client, Seen(), prompt_id, stall_seconds=0.3)

    assert len(result.images) == 1
    assert comfyui.interrupts == []
    assert await client.history(prompt_id) is None
