"""The ComfyUI emulator against the recordings of a real ComfyUI 0.8.0, and its fault knobs.

The replay tests send the recorded requests to the emulator over real sockets and compare
what comes back with what ComfyUI sent: status codes, content types, JSON bodies and
every WebSocket frame in order, after ``normal`` has replaced what differs from run to
run (ids, timestamps, queue numbers, file counters). Floats stay distinct from ints, and
binary frames are compared by header, metadata and image size. The recordings live in
``shared/comfyui/recordings`` beside the repository (or ``$COMFYUI_RECORDINGS``); the
replay tests fail where they are missing, never skip.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import re
import signal
import struct
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from PIL import Image

from tests.emulators.comfyui import NODES, ComfyUIEmulator
from tests.fixtures.comfyui import ComfyUIFactory
from tests.recordings import recording

REPO = Path(__file__).resolve().parents[1]
TINY = "tiny_sd15_random.safetensors"
XL = "sd_xl_base_1.0.safetensors"


F = TypeVar("F")


def needs_recordings(test: F) -> F:
    """Marks a replay test. Without the recordings it fails (in ``recording``): a test
    that cannot check the emulator against the real server must not pass quietly."""
    return test


# -- what differs from run to run ------------------------------------------------------

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
HEX_RE = re.compile(r"^[0-9a-f]{32}$")
COUNTER_RE = re.compile(r"_\d{5}_\.png$")
# Keys whose values change from run to run: compared by type only.
VOLATILE_KEYS = {
    "timestamp",
    "create_time",
    "number",
    "priority",
    "execution_start_time",
    "execution_end_time",
}
# Lists ComfyUI builds from sets: their order is not part of the protocol.
UNORDERED_KEYS = {"executed", "current_outputs"}


def normal(value: Any, key: str | None = None) -> Any:
    """``value`` with run-specific parts replaced by markers; floats marked as floats."""
    if key in VOLATILE_KEYS and value is not None:
        return f"<{type(value).__name__}>"
    if isinstance(value, dict):
        return {k: normal(v, k) for k, v in value.items()}
    if isinstance(value, list):
        items = [normal(item) for item in value]
        if key in UNORDERED_KEYS:
            items.sort(key=json.dumps)
        return items
    if isinstance(value, float):
        return f"<float {value!r}>"
    if isinstance(value, str):
        if UUID_RE.match(value):
            return "<uuid>"
        if HEX_RE.match(value):
            return "<hex>"
        return COUNTER_RE.sub("_NNNNN_.png", value)
    return value


def normal_entry(entry: list[Any]) -> Any:
    """A queue item or history ``prompt`` ([number, id, prompt, extra_data, outputs])."""
    return [f"<{type(entry[0]).__name__}>", *normal(entry[1:])]


def normal_history(history: dict[str, Any]) -> Any:
    out = {}
    for prompt_id, entry in history.items():
        entry = dict(entry)
        prompt = entry.pop("prompt")
        out[normal(prompt_id)] = {"prompt": normal_entry(prompt), **normal(entry)}
    return out


def normal_queue(queue: dict[str, Any]) -> Any:
    return {part: [normal_entry(item) for item in items] for part, items in queue.items()}


# -- talking to the emulator -----------------------------------------------------------


@dataclass
class Answer:
    status: int
    content_type: str
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


async def call(session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> Answer:
    async with session.request(method, url, **kwargs) as response:
        body = await response.read()
        return Answer(response.status, response.headers.get("Content-Type", ""), body)


def assert_answer(ours: Answer, recorded: dict[str, Any], *, body: bool = True) -> None:
    """Same status and content type; with ``body``, the same (normalised) body too."""
    assert ours.status == recorded["status"]
    assert ours.content_type == recorded["content_type"]
    if not body:
        return
    if recorded.get("text") is not None:
        assert ours.body.decode() == recorded["text"]
    elif recorded.get("json") is None:
        assert len(ours.body) == recorded["len"]
    else:
        assert normal(ours.json) == normal(recorded["json"])


@dataclass
class Frame:
    text: str | None = None
    data: bytes | None = None

    @property
    def msg(self) -> dict[str, Any]:
        assert self.text is not None
        message: dict[str, Any] = json.loads(self.text)
        return message

    @property
    def type(self) -> str:
        return self.msg["type"] if self.text is not None else "binary"

    def describe(self) -> Any:
        """What the replay compares: the normalised message, or a binary frame's layout."""
        if self.text is not None:
            return normal(self.msg)
        assert self.data is not None
        (event_type,) = struct.unpack(">I", self.data[:4])
        if event_type == 1:
            (image_format,) = struct.unpack(">I", self.data[4:8])
            image = self.data[8:]
            described = {"event_type": 1, "image_format": {1: "JPEG", 2: "PNG"}[image_format]}
        else:
            assert event_type == 4
            (length,) = struct.unpack(">I", self.data[4:8])
            metadata = json.loads(self.data[8 : 8 + length])
            image = self.data[8 + length :]
            described = {
                "event_type": 4,
                "metadata": normal(metadata),
                "image_format": metadata["image_type"],
            }
        with Image.open(io.BytesIO(image)) as picture:
            described["image_size"] = list(picture.size)
        described["image_magic"] = image[:4].hex()
        return described


def describe_recorded(frame: dict[str, Any]) -> Any:
    if frame["kind"] == "json":
        return normal(frame["msg"])
    described: dict[str, Any] = {"event_type": frame["event_type"]}
    if frame["event_type"] == 4:
        described["metadata"] = normal(frame["metadata"])
    described["image_format"] = frame["image_format"]
    described["image_size"] = frame["image_size"]
    described["image_magic"] = frame["image_magic"]
    return described


def assert_frames(ours: list[Frame], recorded: list[dict[str, Any]]) -> None:
    assert [frame.type for frame in ours] == [
        f["msg"]["type"] if f["kind"] == "json" else "binary" for f in recorded
    ]
    assert [frame.describe() for frame in ours] == [describe_recorded(f) for f in recorded]


class Socket:
    """A client WebSocket that keeps every frame it reads, in order."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.frames: list[Frame] = []

    async def next(self) -> Frame | None:
        """The next frame, or None once the server closed the socket."""
        message = await self.ws.receive()
        if message.type == aiohttp.WSMsgType.TEXT:
            frame = Frame(text=message.data)
        elif message.type == aiohttp.WSMsgType.BINARY:
            frame = Frame(data=message.data)
        else:
            return None
        self.frames.append(frame)
        return frame

    async def until(self, predicate: Callable[[Frame], bool], timeout: float = 20.0) -> Frame:
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.next()
                assert frame is not None, "the socket closed"
                if predicate(frame):
                    return frame

    async def until_done(self, prompt_id: str) -> list[Frame]:
        """Frames up to and including ``executing`` with ``node: null`` for ``prompt_id``."""
        start = len(self.frames)
        await self.until(lambda f: done(f, prompt_id))
        return self.frames[start:]

    async def silent_for(self, seconds: float) -> bool:
        try:
            async with asyncio.timeout(seconds):
                await self.next()
        except TimeoutError:
            return True
        return False

    async def close(self) -> None:
        await self.ws.close()


def queue_empty(frame: Frame) -> bool:
    return frame.type == "status" and frame.msg["data"]["status"]["exec_info"] == {
        "queue_remaining": 0
    }


def done(frame: Frame, prompt_id: str) -> bool:
    return (
        frame.type == "executing"
        and frame.msg["data"]["node"] is None
        and frame.msg["data"]["prompt_id"] == prompt_id
    )


def is_(kind: str, **data: Any) -> Callable[[Frame], bool]:
    def match(frame: Frame) -> bool:
        if frame.type != kind:
            return False
        return kind == "binary" or all(frame.msg["data"].get(k) == v for k, v in data.items())

    return match


async def connect(
    session: aiohttp.ClientSession,
    emulator: ComfyUIEmulator,
    client_id: str | None = None,
    *,
    metadata: bool = False,
) -> Socket:
    """A socket that has read its first ``status`` frame (and ``feature_flags``)."""
    query = f"?clientId={client_id}" if client_id is not None else ""
    socket = Socket(await session.ws_connect(f"{emulator.url}/ws{query}"))
    await socket.until(is_("status"))
    if metadata:
        flags = {"type": "feature_flags", "data": {"supports_preview_metadata": True}}
        await socket.ws.send_str(json.dumps(flags))
        await socket.until(is_("feature_flags"))
    return socket


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def submit(
    session: aiohttp.ClientSession, emulator: ComfyUIEmulator, body: dict[str, Any]
) -> tuple[Answer, str]:
    answer = await call(session, "POST", f"{emulator.url}/prompt", json=body)
    assert answer.status == 200, answer.body
    prompt_id: str = answer.json["prompt_id"]
    return answer, prompt_id


async def history_of(
    session: aiohttp.ClientSession, emulator: ComfyUIEmulator, prompt_id: str
) -> Answer:
    return await call(session, "GET", f"{emulator.url}/history/{prompt_id}")


# -- graphs ----------------------------------------------------------------------------


def basic_graph(color: int = 3368652) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color},
        },
        "2": {
            "class_type": "ImageBlur",
            "inputs": {"image": ["1", 0], "blur_radius": 3, "sigma": 1.0},
        },
        "3": {
            "class_type": "SaveImage",
            "inputs": {"images": ["2", 0], "filename_prefix": "probe_basic"},
        },
    }


def sampler_graph(
    *,
    seed: int = 1,
    steps: int = 4,
    width: int = 64,
    height: int = 64,
    batch: int = 1,
    ckpt: str = TINY,
    prefix: str = "probe_sampler",
) -> dict[str, Any]:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cube", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": width, "height": height, "batch_size": batch},
        },
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": seed,
                "steps": steps,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {
            "class_type": "SaveImage",
            "inputs": {"images": ["8", 0], "filename_prefix": prefix},
        },
    }


def new_client() -> str:
    return uuid.uuid4().hex


# -- replays ---------------------------------------------------------------------------


@needs_recordings
async def test_basic_and_cached_runs_replay(
    comfyui_factory: ComfyUIFactory, session: aiohttp.ClientSession
) -> None:
    emulator = await comfyui_factory()
    filenames = []
    for name in ("basic.json", "basic_cached.json"):
        recorded = recording(name)
        client_id = new_client()
        socket = await connect(session, emulator, client_id)
        body = {**recorded["request_body"], "client_id": client_id}

        answer, prompt_id = await submit(session, emulator, body)
        frames = [socket.frames[0], *await socket.until_done(prompt_id)]

        assert_answer(answer, recorded["post_prompt"])
        assert_frames(frames, recorded["ws_frames"])
        history = await history_of(session, emulator, prompt_id)
        assert_answer(history, recorded["history"], body=False)
        assert normal_history(history.json) == normal_history(recorded["history"]["json"])
        output = history.json[prompt_id]["outputs"]["3"]["images"][0]
        filenames.append(output["filename"])
        view = await call(session, "GET", f"{emulator.url}/view", params=output)
        assert_answer(view, recorded["views"][0], body=False)
        with Image.open(io.BytesIO(view.body)) as image:
            assert (image.format, image.size) == ("PNG", (64, 64))
        await socket.close()
    # The cached run replays the first run's file name: nothing was saved again.
    assert filenames[0] == filenames[1] == "probe_basic_00001_.png"


@needs_recordings
async def test_sampler_runs_replay_for_plain_and_metadata_clients(
    comfyui_factory: ComfyUIFactory, session: aiohttp.ClientSession
) -> None:
    emulator = await comfyui_factory(checkpoints=[TINY])
    runs = recording("sampler.json")
    for name, metadata in (("legacy_first", False), ("metadata_client", True)):
        recorded = runs[name]
        client_id = new_client()
        socket = await connect(session, emulator, client_id, metadata=metadata)
        body = {**recorded["request_body"], "client_id": client_id}

        answer, prompt_id = await submit(session, emulator, body)
        frames = [*socket.frames, *await socket.until_done(prompt_id)]

        assert_answer(answer, recorded["post_prompt"])
        assert_frames(frames, recorded["ws_frames"])
        assert sum(f.type == "progress" for f in frames) == recorded["progress_count"]
        assert sum(f.type == "binary" for f in frames) == recorded["binary_frames"]
        history = await history_of(session, emulator, prompt_id)
        assert normal_history(history.json) == normal_history(recorded["history"]["json"])
        output = history.json[prompt_id]["outputs"]["9"]["images"][0]
        view = await call(session, "GET", f"{emulator.url}/view", params=output)
        assert_answer(view, recorded["views"][0], body=False)
        with Image.open(io.BytesIO(view.body)) as image:
            assert (image.format, image.size) == ("PNG", (256, 256))
        await socket.close()


def _error_requests() -> dict[str, dict[str, Any]]:
    """Requests that make ComfyUI give each recorded 400 (the bodies name the nodes)."""
    unknown = basic_graph()
    unknown["2"]["class_type"] = "NoSuchNode"
    missing = basic_graph()
    del missing["1"]["inputs"]["width"]
    above_max = basic_graph()
    above_max["2"]["inputs"]["blur_radius"] = 99
    dangling = basic_graph()
    dangling["2"]["inputs"]["image"] = ["77", 0]
    wrong_type = basic_graph()
    wrong_type["1"]["inputs"]["width"] = "abc"
    no_output = basic_graph()
    del no_output["3"]
    no_class = basic_graph()
    del no_class["1"]["class_type"]
    return {
        "unknown_class": {"prompt": unknown},
        "missing_required_input": {"prompt": missing},
        "bad_ckpt_name": {"prompt": sampler_graph(ckpt="nope.safetensors")},
        "value_above_max": {"prompt": above_max},
        "link_to_missing_node": {"prompt": dangling},
        "wrong_type_value": {"prompt": wrong_type},
        "no_output_node": {"prompt": no_output},
        "no_prompt_key": {"client_id": new_client()},
        "missing_class_type": {"prompt": no_class},
    }


ERROR_REQUESTS = _error_requests()


@needs_recordings
@pytest.mark.parametrize("case", sorted(ERROR_REQUESTS))
async def test_invalid_prompts_answer_the_recorded_400(
    case: str, comfyui_factory: ComfyUIFactory, session: aiohttp.ClientSession
) -> None:
    emulator = await comfyui_factory(checkpoints=[TINY])

    answer = await call(session, "POST", f"{emulator.url}/prompt", json=ERROR_REQUESTS[case])

    assert_answer(answer, recording("errors.json")[case])
    assert emulator.submitted == []


@needs_recordings
async def test_other_recorded_errors(
    comfyui_factory: ComfyUIFactory, session: aiohttp.ClientSession
) -> None:
    emulator = await comfyui_factory(checkpoints=[TINY])
    recorded = recording("errors.json")
    url = emulator.url

    not_json = await call(
        session,
        "POST",
        f"{url}/prompt",
        data=b"{this is not json",
        headers={"Content-Type": "application/json"},
    )
    unknown_history = await call(session, "GET", f"{url}/history/does-not-exist")
    missing_file = await call(
        session, "GET", f"{url}/view", params={"filename": "nope.png", "type": "output"}
    )
    unknown_node = await call(session, "GET", f"{url}/object_info/NoSuchNode")

    assert_answer(not_json, recorded["invalid_json_body"])
    assert_answer(unknown_history, recorded["history_unknown_id"])
    assert_answer(missing_file, recorded["view_missing_file"])
    assert_answer(unknown_node, recorded["object_info_unknown"])


@needs_recordings
async def test_runtime_error_replays(
    comfyui_factory: ComfyUIFactory, session: aiohttp.ClientSession
) -> None:
    recorded = recording("errors.json")["runtime_error_run"]
    emulator = await comfyui_factory(checkpoints=[TINY, "junk_not_a_model.safetensors"])
    emulator.faults.error_next = 1
    client_id = new_client()
    socket = await connect(session, emulator, client_id)

    answer, prompt_id = await submit(
        session, emulator, {**recorded["request_body"], "client_id": client_id}
    )
    frames = [socket.frames[0], *await socket.until_done(prompt_id)]

    assert_answer(answer, recorded["post_prompt"])
    assert_frames(frames, recorded["ws_frames"])
    history = await history_of(session, emulator, prompt_id)
    assert normal_history(history.json) == normal_history(recorded["history"]["json"])
    assert emulator.faults.error_next == 0
    assert emulator.executed == [prompt_id]
    await socket.close()


@needs_recordings
async def test_interrupts_replay(
    comfyui_factory: ComfyUIFactory, session: aiohttp.ClientSession
) -> None:
    recorded = recording("interrupt.json")
    graph = next(iter(recorded["history"]["json"].values()))["prompt"][2]
    emulator = await comfyui_factory(checkpoints=[TINY], step_seconds=0.25)
    client_id = new_client()
    socket = await connect(session, emulator, client_id)
    answer, prompt_id = await submit(session, emulator, {"prompt": graph, "client_id": client_id})
    await socket.until(is_("progress", value=3))
    await socket.until(is_("binary"))

    elsewhere = {"prompt_id": str(uuid.uuid4())}
    other = await call(session, "POST", f"{emulator.url}/interrupt", json=elsewhere)
    interrupted_at = time.monotonic()
    interrupt = await call(
        session, "POST", f"{emulator.url}/interrupt", json={"prompt_id": prompt_id}
    )
    frames = [socket.frames[0], *await socket.until_done(prompt_id)]
    took = time.monotonic() - interrupted_at

    assert_answer(answer, recorded["post_prompt"])
    assert_answer(other, recorded["interrupt_with_other_prompt_id"])
    assert_answer(interrupt, recorded["interrupt_response"])
    assert_frames(socket.frames, recorded["ws_frames"])
    assert frames[-3].describe() == describe_recorded(recorded["terminal_frame"])
    assert took < 1.0
    history = await history_of(session, emulator, prompt_id)
    assert normal_history(history.json) == normal_history(recorded["history"]["json"])

    # Without a body, POST /interrupt stops whatever runs.
    graph["3"]["inputs"]["seed"] = 12
    _, second = await submit(session, emulator, {"prompt": graph, "client_id": client_id})
    await socket.until(is_("progress", value=1, prompt_id=second))
    no_body = await call(session, "POST", f"{emulator.url}/interrupt")
    tail = await socket.until_done(second)

    assert_answer(no_body, recorded["interrupt_without_body"])
    assert [frame.type for frame in tail[-3:]] == [
        "execution_interrupted",
        "status",
        "executing",
    ]
    assert emulator.interrupts == [elsewhere, {"prompt_id": prompt_id}, None]
    assert emulator.executed == [prompt_id, second]
    await socket.close()


@needs_recordings
async def test_queue_replays(
    comfyui_factory: ComfyUIFactory, session: aiohttp.ClientSession
) -> None:
    recorded = recording("queue.json")
    running = recorded["queue_before"]["json"]["queue_running"][0]
    front, pending = recorded["queue_before"]["json"]["queue_pending"]
    later = recorded["queue_after_clear"]["json"]["queue_running"][0]
    graphs = {"17": running[2], "18": pending[2], "-19": front[2], "20": later[2]}
    emulator = await comfyui_factory(checkpoints=[TINY], step_seconds=0.3)
    url = emulator.url
    # The recorded session had run this checkpoint, these texts and this latent before.
    warm_up = copy.deepcopy(graphs["17"])
    warm_up["3"]["inputs"].update(steps=1, seed=0)
    await submit(session, emulator, {"prompt": warm_up})
    await emulator.wait_executed(1)
    client_id = new_client()
    socket = await connect(session, emulator, client_id)
    answers = []

    answers.append(
        (await submit(session, emulator, {"prompt": graphs["17"], "client_id": client_id}))[0]
    )
    first = answers[0].json["prompt_id"]
    await socket.until(is_("executing", node="3", prompt_id=first))
    answers.append(
        (await submit(session, emulator, {"prompt": graphs["18"], "client_id": client_id}))[0]
    )
    answers.append(
        (
            await submit(
                session, emulator, {"prompt": graphs["-19"], "client_id": client_id, "front": True}
            )
        )[0]
    )
    deleted, jumped = answers[1].json["prompt_id"], answers[2].json["prompt_id"]
    queue_before = await call(session, "GET", f"{url}/queue")
    prompt_before = await call(session, "GET", f"{url}/prompt")
    await socket.until(is_("binary"))
    delete = await call(session, "POST", f"{url}/queue", json={"delete": [deleted]})
    after_delete = await call(session, "GET", f"{url}/queue")
    delete_running = await call(session, "POST", f"{url}/queue", json={"delete": [first]})
    after_delete_running = await call(session, "GET", f"{url}/queue")
    await call(session, "POST", f"{url}/interrupt", json={"prompt_id": first})
    await socket.until(lambda f: done(f, jumped))
    queue_end = await call(session, "GET", f"{url}/queue")
    deleted_history = await history_of(session, emulator, deleted)
    _, last = await submit(session, emulator, {"prompt": graphs["20"], "client_id": client_id})
    await socket.until(is_("executing", node="3", prompt_id=last))
    await submit(session, emulator, {"prompt": graphs["18"], "client_id": client_id})
    await socket.until(is_("binary"))
    clear = await call(session, "POST", f"{url}/queue", json={"clear": True})
    after_clear = await call(session, "GET", f"{url}/queue")
    await call(session, "POST", f"{url}/interrupt", json={"prompt_id": last})
    await socket.until(lambda f: done(f, last))

    for ours, theirs in zip(answers, recorded["posts"], strict=True):
        assert_answer(ours, theirs)
    assert answers[2].json["number"] < 0
    for ours, name in (
        (queue_before, "queue_before"),
        (after_delete, "queue_after_delete"),
        (after_delete_running, "queue_after_delete_running"),
        (queue_end, "queue_end"),
        (after_clear, "queue_after_clear"),
    ):
        assert_answer(ours, recorded[name], body=False)
        assert normal_queue(ours.json) == normal_queue(recorded[name]["json"]), name
    assert_answer(prompt_before, recorded["get_prompt_before"])
    assert_answer(delete, recorded["delete_resp"])
    assert_answer(delete_running, recorded["delete_running_resp"])
    assert_answer(deleted_history, recorded["history_deleted_prompt"])
    assert_answer(clear, recorded["clear_resp"])
    assert_frames(socket.frames, recorded["ws_frames"])
    await socket.close()


@needs_recordings
async def test_misc_replays(
    comfyui_factory: ComfyUIFactory, session: aiohttp.ClientSession
) -> None:
    recorded = recording("misc.json")
    emulator = await comfyui_factory(checkpoints=[TINY])
    url = emulator.url

    anonymous = await connect(session, emulator)
    assert anonymous.frames[0].describe() == normal(recorded["ws_without_clientId_first_frame"])
    await anonymous.close()

    # A prompt without client_id: other sockets see only what ComfyUI broadcasts.
    observer = await connect(session, emulator, "observer-07fe058a")
    answer, prompt_id = await submit(session, emulator, {"prompt": basic_graph(color=0x123456)})
    await observer.until(queue_empty)
    assert normal(answer.json) == normal(recorded["no_client_id_post"])
    tail = recorded["observer_frames"][-9:]
    assert_frames(observer.frames[1:], tail)
    assert {f.type for f in observer.frames} == set(recorded["observer_frame_types"])
    history = await history_of(session, emulator, prompt_id)
    status = history.json[prompt_id]["status"]["status_str"]
    assert status == recorded["no_ws_client_history_status"]
    await observer.close()

    # extra_data.preview_method "none": progress without previews.
    client_id = new_client()
    socket = await connect(session, emulator, client_id)
    body = {"prompt": sampler_graph(steps=4), "client_id": client_id}
    answer, prompt_id = await submit(
        session, emulator, {**body, "extra_data": {"preview_method": "none"}}
    )
    frames = await socket.until_done(prompt_id)
    assert normal(answer.json) == normal(recorded["preview_none"]["post"])
    assert sum(f.type == "binary" for f in frames) == recorded["preview_none"]["binary_frames"]
    assert sum(f.type == "progress" for f in frames) == recorded["preview_none"]["progress_count"]

    # Upload, view, load.
    picture = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(picture, format="PNG")
    form = aiohttp.FormData()
    form.add_field(
        "image", picture.getvalue(), filename="probe_upload.png", content_type="image/png"
    )
    upload = await call(session, "POST", f"{url}/upload/image", data=form)
    assert_answer(upload, recorded["upload_image"])
    view = await call(
        session,
        "GET",
        f"{url}/view",
        params={"filename": "probe_upload.png", "type": "input", "subfolder": ""},
    )
    assert (view.status, view.content_type) == (
        recorded["view_uploaded"]["status"],
        recorded["view_uploaded"]["content_type"],
    )
    assert view.body == picture.getvalue()
    loader = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "probe_upload.png"}},
        "2": {
            "class_type": "SaveImage",
            "inputs": {"images": ["1", 0], "filename_prefix": "probe_loaded"},
        },
    }
    _, prompt_id = await submit(session, emulator, {"prompt": loader, "client_id": client_id})
    await socket.until_done(prompt_id)
    history = await history_of(session, emulator, prompt_id)
    outputs = history.json[prompt_id]["outputs"]
    assert normal(outputs) == normal(recorded["load_uploaded_outputs"])
    await socket.close()

    # An explicit prompt_id is used as is (and an explicit number comes back a float).
    explicit = str(uuid.uuid4())
    answer, prompt_id = await submit(
        session, emulator, {"prompt": basic_graph(), "prompt_id": explicit, "number": 5}
    )
    assert prompt_id == explicit
    assert normal(answer.json) == normal(recorded["explicit_prompt_id_post"])


@needs_recordings
async def test_server_info_replays(
    comfyui_factory: ComfyUIFactory, session: aiohttp.ClientSession
) -> None:
    recorded = recording("stats.json")
    queue = recording("queue.json")
    emulator = await comfyui_factory(checkpoints=[TINY])
    url = emulator.url
    client_id = new_client()

    # A success, then an interrupt: what the recorded /history and /api/jobs show last.
    succeeded = queue["queue_before"]["json"]["queue_pending"][0][2]
    interrupted = queue["queue_after_clear"]["json"]["queue_running"][0][2]
    socket = await connect(session, emulator, client_id)
    _, first = await submit(session, emulator, {"prompt": succeeded, "client_id": client_id})
    await socket.until_done(first)
    emulator.faults.hang_next = 1
    _, second = await submit(session, emulator, {"prompt": interrupted, "client_id": client_id})
    await socket.until(is_("binary"))
    await call(session, "POST", f"{url}/interrupt")
    await socket.until_done(second)
    await socket.close()

    for path in ("/features", "/prompt", "/queue", "/embeddings", "/models", "/models/checkpoints"):
        assert_answer(await call(session, "GET", url + path), recorded[path])
    for name in ("KSampler", "CheckpointLoaderSimple", "ImageBlur"):
        path = f"/object_info/{name}"
        answer = await call(session, "GET", url + path)
        assert_answer(answer, recorded[path], body=False)
        assert answer.json == recorded[path]["json"]
    everything = await call(session, "GET", f"{url}/object_info")
    assert everything.status == recorded["/object_info"]["status"]
    assert set(everything.json) == set(NODES)
    history = await call(session, "GET", f"{url}/history", params={"max_items": "1"})
    assert_answer(history, recorded["/history?max_items=1"], body=False)
    assert normal_history(history.json) == normal_history(recorded["/history?max_items=1"]["json"])
    jobs = await call(session, "GET", f"{url}/api/jobs", params={"limit": "2"})
    recorded_jobs = recorded["/api/jobs?limit=2"]
    assert_answer(jobs, recorded_jobs, body=False)
    assert normal(jobs.json["jobs"]) == normal(recorded_jobs["json"]["jobs"])
    assert {k: type(v) for k, v in jobs.json["pagination"].items()} == {
        k: type(v) for k, v in recorded_jobs["json"]["pagination"].items()
    }

    stats = await call(session, "GET", f"{url}/system_stats")
    theirs = recorded["/system_stats"]["json"]
    assert_answer(stats, recorded["/system_stats"], body=False)
    assert {k: type(v) for k, v in stats.json["system"].items()} == {
        k: type(v) for k, v in theirs["system"].items()
    }
    assert [set(device) for device in stats.json["devices"]] == [set(theirs["devices"][0])]

    free = await call(session, "POST", f"{url}/free", json={"unload_models": True})
    clear = await call(session, "POST", f"{url}/history", json={"clear": True})
    assert_answer(free, recorded["POST /free"])
    assert_answer(clear, recorded["POST /history clear"])
    assert (await call(session, "GET", f"{url}/history")).json == {}
    assert emulator.free_calls == 1


# -- behaviour the recordings imply, and the knobs -------------------------------------


async def run_to_end(
    session: aiohttp.ClientSession,
    emulator: ComfyUIEmulator,
    graph: dict[str, Any],
    **extra: Any,
) -> tuple[str, list[Frame]]:
    client_id = new_client()
    socket = await connect(session, emulator, client_id)
    _, prompt_id = await submit(
        session, emulator, {"prompt": graph, "client_id": client_id, **extra}
    )
    frames = await socket.until_done(prompt_id)
    await socket.close()
    return prompt_id, frames


async def test_frames_go_only_to_the_prompts_client(
    comfyui: ComfyUIEmulator, session: aiohttp.ClientSession
) -> None:
    owner_id = new_client()
    owner = await connect(session, comfyui, owner_id)
    other = await connect(session, comfyui, new_client())
    body = {"prompt": sampler_graph(ckpt=XL), "client_id": owner_id}

    _, prompt_id = await submit(session, comfyui, body)
    await owner.until_done(prompt_id)
    await other.until(queue_empty)

    assert {frame.type for frame in other.frames} == {"status"}
    assert {"progress", "binary", "executed"} <= {frame.type for frame in owner.frames}
    await owner.close()
    await other.close()


async def test_a_second_socket_with_the_same_client_id_takes_over(
    comfyui: ComfyUIEmulator, session: aiohttp.ClientSession
) -> None:
    client_id = new_client()
    first = await connect(session, comfyui, client_id)
    second = await connect(session, comfyui, client_id)
    _, prompt_id = await submit(session, comfyui, {"prompt": basic_graph(), "client_id": client_id})
    await second.until_done(prompt_id)
    first_heard = await first.silent_for(0.1)

    # As in ComfyUI, sockets are kept by clientId: when the old one closes, it takes the
    # new one's registration with it, and the new one hears nothing more.
    await first.close()
    await asyncio.sleep(0.05)
    _, later = await submit(session, comfyui, {"prompt": basic_graph(1), "client_id": client_id})
    await comfyui.wait_executed(2)
    second_heard = await second.silent_for(0.1)

    assert first_heard and second_heard
    assert len(first.frames) == 1
    assert comfyui.executed == [prompt_id, later]
    await second.close()


async def test_partial_execution_targets(
    comfyui: ComfyUIEmulator, session: aiohttp.ClientSession
) -> None:
    graph = basic_graph()
    graph["4"] = {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}

    prompt_id, frames = await run_to_end(session, comfyui, graph, partial_execution_targets=["4"])

    executing = [f.msg["data"]["node"] for f in frames if f.type == "executing"]
    assert executing == ["1", "4", None]
    history = (await history_of(session, comfyui, prompt_id)).json[prompt_id]
    assert history["prompt"][4] == ["4"]
    image = history["outputs"]["4"]["images"][0]
    assert image["type"] == "temp"
    assert re.fullmatch(r"ComfyUI_temp_[a-z]{5}_00001_\.png", image["filename"])


async def test_history_is_written_after_execution_success(
    comfyui_factory: ComfyUIFactory, session: aiohttp.ClientSession
) -> None:
    emulator = await comfyui_factory(history_delay=0.3)
    client_id = new_client()
    socket = await connect(session, emulator, client_id)
    _, prompt_id = await submit(
        session, emulator, {"prompt": basic_graph(), "client_id": client_id}
    )

    await socket.until(is_("execution_success", prompt_id=prompt_id))
    early = await history_of(session, emulator, prompt_id)
    await socket.until_done(prompt_id)
    late = await history_of(session, emulator, prompt_id)

    assert early.json == {}
    assert late.json[prompt_id]["status"]["status_str"] == "success"
    await socket.close()


async def test_out_of_memory_fault(
    comfyui: ComfyUIEmulator, session: aiohttp.ClientSession
) -> None:
    comfyui.faults.oom_next = 1
    graph = sampler_graph(ckpt=XL)

    prompt_id, frames = await run_to_end(session, comfyui, graph)
    again, after = await run_to_end(session, comfyui, sampler_graph(ckpt=XL, seed=2))

    error = frames[-3].msg["data"]
    assert [frame.type for frame in frames[-3:]] == ["execution_error", "status", "executing"]
    assert error["exception_type"] == "torch.OutOfMemoryError"
    assert error["exception_message"].startswith("Allocation on device ")
    assert "This error means you ran out of memory on your GPU." in error["exception_message"]
    assert (error["node_id"], error["node_type"]) == ("3", "KSampler")
    assert sorted(error["executed"]) == ["4", "5", "6", "7"]
    assert error["current_inputs"]["seed"] == [1]
    assert error["traceback"] and all(line.startswith("  File ") for line in error["traceback"])
    history = (await history_of(session, comfyui, prompt_id)).json[prompt_id]
    assert history["status"]["status_str"] == "error"
    assert after[-3].type == "execution_success"
    assert comfyui.faults.oom_next == 0
    assert comfyui.executed == [prompt_id, again]


async def test_error_fault_fails_the_first_node_that_runs(
    comfyui: ComfyUIEmulator, session: aiohttp.ClientSession
) -> None:
    comfyui.faults.error_next = 1

    _, frames = await run_to_end(session, comfyui, basic_graph())

    error = frames[-3].msg["data"]
    assert (error["node_id"], error["node_type"]) == ("1", "EmptyImage")
    assert error["exception_type"] == "safetensors._safetensors_rust.SafetensorError"
    assert error["current_inputs"] == {
        "width": [64],
        "height": [64],
        "batch_size": [1],
        "color": [3368652],
    }


async def test_hang_fault_stops_after_step_one_until_interrupted(
    comfyui_factory: ComfyUIFactory, session: aiohttp.ClientSession
) -> None:
    emulator = await comfyui_factory(step_seconds=0.01)
    emulator.faults.hang_next = 1
    client_id = new_client()
    socket = await connect(session, emulator, client_id)
    _, prompt_id = await submit(
        session, emulator, {"prompt": sampler_graph(ckpt=XL, steps=50), "client_id": client_id}
    )

    await socket.until(is_("binary"))
    silent = await socket.silent_for(0.3)
    await call(session, "POST", f"{emulator.url}/interrupt", json={"prompt_id": prompt_id})
    frames = await socket.until_done(prompt_id)

    assert silent
    assert [frame.type for frame in frames] == ["execution_interrupted", "status", "executing"]
    assert max(f.msg["data"]["value"] for f in socket.frames if f.type == "progress") == 1
    await socket.close()


async def test_drop_ws_fault_cuts_sockets_and_the_prompt_goes_on(
    comfyui_factory: ComfyUIFactory, session: aiohttp.ClientSession
) -> None:
    emulator = await comfyui_factory(step_seconds=0.05)
    emulator.faults.drop_ws_at_step = 2
    client_id = new_client()
    socket = await connect(session, emulator, client_id)
    _, prompt_id = await submit(
        session, emulator, {"prompt": sampler_graph(ckpt=XL, steps=10), "client_id": client_id}
    )

    while await socket.next() is not None:
        pass
    progress = [f.msg["data"]["value"] for f in socket.frames if f.type == "progress"]
    again = await connect(session, emulator, client_id)
    reconnected = await again.next()
    await again.until_done(prompt_id)

    assert progress == [1, 2]
    assert socket.frames[-1].type == "binary"
    # A client reconnecting while its prompt runs is told the node it is on.
    assert reconnected is not None
    assert reconnected.msg == {"type": "executing", "data": {"node": "3"}}
    assert emulator.faults.drop_ws_at_step is None
    history = (await history_of(session, emulator, prompt_id)).json[prompt_id]
    assert history["status"]["status_str"] == "success"
    await again.close()


async def test_drop_websockets_keeps_the_server_up(
    comfyui: ComfyUIEmulator, session: aiohttp.ClientSession
) -> None:
    first = await connect(session, comfyui, new_client())
    second = await connect(session, comfyui)

    comfyui.drop_websockets()

    assert await first.next() is None
    assert await second.next() is None
    assert (await call(session, "GET", f"{comfyui.url}/system_stats")).status == 200


async def test_crash_fault_stops_the_server_and_a_restart_forgets(
    comfyui_factory: ComfyUIFactory, session: aiohttp.ClientSession
) -> None:
    emulator = await comfyui_factory(step_seconds=0.05)
    emulator.faults.crash_at_step = 2
    port = emulator.port
    client_id = new_client()
    socket = await connect(session, emulator, client_id)
    _, prompt_id = await submit(
        session, emulator, {"prompt": sampler_graph(ckpt=XL, steps=10), "client_id": client_id}
    )

    while await socket.next() is not None:
        pass
    await emulator.stop()
    async with aiohttp.ClientSession() as fresh:
        with pytest.raises(aiohttp.ClientConnectionError):
            await call(fresh, "GET", f"{emulator.url}/system_stats")
    await emulator.start(port=port)
    # A new session: the old one's keep-alive connections died with the "process".
    async with aiohttp.ClientSession() as fresh:
        forgotten = await history_of(fresh, emulator, prompt_id)
        queue = await call(fresh, "GET", f"{emulator.url}/queue")
        after, frames = await run_to_end(fresh, emulator, sampler_graph(ckpt=XL, steps=2))

    assert max(f.msg["data"]["value"] for f in socket.frames if f.type == "progress") == 2
    assert emulator.port == port
    assert forgotten.json == {}
    assert queue.json == {"queue_running": [], "queue_pending": []}
    assert emulator.faults.crash_at_step is None
    assert frames[-3].type == "execution_success"
    assert after in emulator.executed


async def test_free_unloads_models_and_model_load_takes_time(
    comfyui_factory: ComfyUIFactory, session: aiohttp.ClientSession
) -> None:
    emulator = await comfyui_factory(model_load_seconds=0.2)
    graph = sampler_graph(ckpt="flux1-schnell-fp8.safetensors", steps=1)
    started = time.monotonic()
    await run_to_end(session, emulator, graph)
    cold = time.monotonic() - started
    stats = (await call(session, "GET", f"{emulator.url}/system_stats")).json["devices"][0]

    free = await call(
        session, "POST", f"{emulator.url}/free", json={"unload_models": True, "free_memory": True}
    )
    bad = await call(session, "POST", f"{emulator.url}/free")
    freed = (await call(session, "GET", f"{emulator.url}/system_stats")).json["devices"][0]

    assert cold >= 0.2
    assert stats["type"] == "cuda"
    assert stats["vram_total"] == 24 * 2**30
    assert stats["vram_free"] < stats["vram_total"] - 10 * 2**30
    assert free.status == 200 and free.body == b""
    assert bad.status == 500
    assert emulator.free_calls == 1
    assert emulator.loaded_models == {}
    assert freed["vram_free"] > stats["vram_free"]


async def test_previews_fit_preview_size_and_outputs_are_deterministic(
    comfyui_factory: ComfyUIFactory, session: aiohttp.ClientSession
) -> None:
    pixels = []
    for _ in range(2):
        emulator = await comfyui_factory(preview_size=256)
        graph = sampler_graph(ckpt=XL, width=200, height=152, batch=2, steps=2, seed=7)
        prompt_id, frames = await run_to_end(session, emulator, graph)
        previews = [f.describe() for f in frames if f.type == "binary"]
        history = (await history_of(session, emulator, prompt_id)).json[prompt_id]
        images = history["outputs"]["9"]["images"]
        decoded = []
        for image in images:
            view = await call(session, "GET", f"{emulator.url}/view", params=image)
            with Image.open(io.BytesIO(view.body)) as picture:
                assert picture.size == (200, 152)
                assert json.loads(picture.info["prompt"]) == graph
                decoded.append(picture.tobytes())
        pixels.append(decoded)

        assert [p["image_size"] for p in previews] == [[256, 195], [256, 195]]
        assert [image["filename"] for image in images] == [
            "probe_sampler_00001_.png",
            "probe_sampler_00002_.png",
        ]
    assert pixels[0] == pixels[1]
    assert pixels[0][0] != pixels[0][1]


async def test_validation_beyond_the_recordings(
    comfyui: ComfyUIEmulator, session: aiohttp.ClientSession
) -> None:
    url = comfyui.url
    low = sampler_graph(ckpt=XL, steps=0)
    bad_sampler = sampler_graph(ckpt=XL)
    bad_sampler["3"]["inputs"]["sampler_name"] = "nope"
    missing_image = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "missing.png"}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    bad_output_link = basic_graph()
    bad_output_link["3"]["inputs"]["images"] = ["77", 0]

    too_low = await call(session, "POST", f"{url}/api/prompt", json={"prompt": low})
    not_listed = await call(session, "POST", f"{url}/prompt", json={"prompt": bad_sampler})
    no_file = await call(session, "POST", f"{url}/prompt", json={"prompt": missing_image})
    output_link = await call(session, "POST", f"{url}/prompt", json={"prompt": bad_output_link})
    upper_id = await call(
        session,
        "POST",
        f"{url}/prompt",
        json={"prompt": basic_graph(), "prompt_id": str(uuid.uuid4()).upper()},
    )

    assert too_low.status == 400
    error = too_low.json["node_errors"]["3"]["errors"][0]
    assert (error["type"], error["message"]) == (
        "value_smaller_than_min",
        "Value 0 smaller than min of 1",
    )
    error = not_listed.json["node_errors"]["3"]["errors"][0]
    assert error["type"] == "value_not_in_list"
    assert error["details"] == "sampler_name: 'nope' not in (list of length 44)"
    assert error["extra_info"]["input_config"] is None
    error = no_file.json["node_errors"]["1"]["errors"][0]
    assert error["details"] == "image - Invalid image file: missing.png"
    assert output_link.json["error"]["details"] == "Exception when validating node: '77'"
    assert (
        output_link.json["node_errors"]["3"]["errors"][0]["type"] == "exception_during_validation"
    )
    assert upper_id.status == 400
    assert comfyui.submitted == []


async def test_demo_template_runs_and_skips_unconnected_primitives(
    comfyui: ComfyUIEmulator, session: aiohttp.ClientSession
) -> None:
    graph = json.loads((REPO / "workflows" / "templates" / "demo.json").read_text())

    prompt_id, frames = await run_to_end(session, comfyui, graph)

    executing = [f.msg["data"]["node"] for f in frames if f.type == "executing"]
    assert executing == ["1", "2", "3", None]
    history = (await history_of(session, comfyui, prompt_id)).json[prompt_id]
    assert history["outputs"]["3"]["images"] == [
        {"filename": "demo_00001_.png", "subfolder": "brigade", "type": "output"}
    ]


# -- as a process ----------------------------------------------------------------------


async def start_process(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.emulators.comfyui",
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def gui_url(process: asyncio.subprocess.Process) -> str:
    assert process.stderr is not None
    async with asyncio.timeout(20):
        while True:
            line = (await process.stderr.readline()).decode()
            assert line, "the emulator exited before it listened"
            if match := re.search(r"To see the GUI go to: (http://\S+)", line):
                return match.group(1)


async def finish(process: asyncio.subprocess.Process) -> int:
    async with asyncio.timeout(20):
        await process.communicate()
        return await process.wait()


async def test_process_serves_until_sigterm(session: aiohttp.ClientSession) -> None:
    process = await start_process(
        "--listen",
        "127.0.0.1",
        "--port",
        "0",
        "--cpu",
        "--preview-method",
        "auto",
        "--disable-api-nodes",
    )
    try:
        url = await gui_url(process)
        stats = await call(session, "GET", f"{url}/system_stats")
    finally:
        process.send_signal(signal.SIGTERM)
        code = await finish(process)

    assert code == 0
    assert "--disable-api-nodes" in stats.json["system"]["argv"]


async def test_process_exits_after_prompts(session: aiohttp.ClientSession) -> None:
    process = await start_process(
        "--port", "0", "--exit-after-prompts", "1", "--step-seconds", "0.001"
    )
    try:
        url = await gui_url(process)
        await call(session, "POST", f"{url}/prompt", json={"prompt": basic_graph()})
        code = await finish(process)
    finally:
        if process.returncode is None:
            process.kill()
            await finish(process)

    assert code == 1


async def test_process_can_hang_on_start() -> None:
    process = await start_process("--port", "0", "--hang-on-start")
    assert process.stderr is not None
    try:
        async with asyncio.timeout(20):
            first = await process.stderr.readline()
            second = await process.stderr.readline()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await process.stderr.readline()
    finally:
        process.send_signal(signal.SIGTERM)
        code = await finish(process)

    assert first.startswith(b"Total VRAM ")
    assert second.startswith(b"Device: cuda:0 ")
    assert code == 0
