"""A ComfyUI client: its HTTP API, one persistent WebSocket, and a prompt's whole run.

One :class:`ComfyUIClient` per ComfyUI, with a fixed ``clientId``: ComfyUI sends a
prompt's execution frames only to the WebSocket whose ``clientId`` matches the prompt's
``client_id``, so the socket and every prompt use the same id. A background reader task
owns the socket: it sends ``feature_flags`` (so previews come as type-4 frames naming
their prompt), hands each frame to the run waiting for that ``prompt_id`` (type-1 frames
name none: they go to the prompt executing on this client), and reconnects after a drop
with exponential backoff and full jitter, each attempt bounded by the connect timeout.
After :data:`RECONNECT_ATTEMPTS` failures in a row it stops; the next call that needs
the socket starts it again.

A run (:meth:`ComfyUIClient.run`) submits the graph under the caller's ``prompt_id``
and follows its frames. ``executing`` with ``node: null`` is the end (``execution_success``
comes earlier, before the history is written). Then it reads ``/history``, fetches every
stored output image through ``/view`` and deletes the history entry. If the socket drops
mid-run, the run reconciles on the new socket: in the history means done, in the queue
means keep waiting, in neither means ComfyUI restarted and lost it (:class:`PromptLost`).
A watchdog interrupts the prompt when nothing happens for ``stall_seconds``.

Every HTTP call has its own timeout; what each answer means lives in
:mod:`renderer.comfyui.exceptions`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import structlog
from yarl import URL

from jobs.recent import RecentIds
from renderer.comfyui.exceptions import (
    ComfyUIUnavailable,
    PromptInterrupted,
    PromptLost,
    PromptStalled,
    UnexpectedResponse,
    execution_failure,
    for_status,
    rejection,
)
from renderer.comfyui.frames import FrameError, PreviewFrame, parse_binary_frame
from renderer.exceptions import RenderError

log = structlog.get_logger(__name__)

#: Jitter for backoffs, apart from the global ``random`` (tests and libraries share that).
_JITTER = random.Random()

#: First reconnection pause; it doubles per failed attempt (with full jitter) up to the cap.
RECONNECT_BASE_SECONDS = 0.25
#: Failed connection attempts in a row before the reader stops (and waits to be needed).
RECONNECT_ATTEMPTS = 10
#: A connection that dies sooner than this counts as a failed attempt: a server that
#: accepts and drops at once must not make the reader spin.
STABLE_CONNECTION_SECONDS = 5.0
#: WebSocket ping interval: a half-open connection is noticed within about this long.
HEARTBEAT_SECONDS = 15.0
#: How long closing the WebSocket may wait for the server's close frame.
WS_CLOSE_SECONDS = 2.0
#: Largest WebSocket frame accepted: previews are ~80 KB at 512 px; leave room for more.
MAX_FRAME_BYTES = 64 * 1024 * 1024
#: How long a prompt that left the queue may take to show up in /history.
HISTORY_WAIT_SECONDS = 2.0
#: Pause between two looks at /history while waiting for an entry.
HISTORY_POLL_SECONDS = 0.05
#: How long the end frame may take after an error, an interrupt, or our own stop.
END_GRACE_SECONDS = 10.0
#: Previews queued for one run before newer ones are dropped (they are only hints).
QUEUED_PREVIEWS = 2
#: Prompts remembered as interrupted by this client for a run it gave up (the latest).
ABANDONED_REMEMBERED = 1000

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: Everything aiohttp and the OS raise when a connection fails, resets or times out.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, OSError, TimeoutError)

ProgressCallback = Callable[[int, int, str | None], Awaitable[None]]
"""``on_progress(step, total, node)``; ``node`` is the node's title or class."""
PreviewCallback = Callable[[PreviewFrame, int | None], Awaitable[None]]
"""``on_preview(frame, step)``; ``step`` is the last progress step seen, if any."""
Place = Literal["pending", "running"]


@dataclass(frozen=True, slots=True)
class QueueState:
    """``GET /queue``: prompt ids running and waiting, in ComfyUI's order."""

    running: tuple[str, ...]
    pending: tuple[str, ...]
    #: Each listed prompt's ``client_id`` (None when it was queued without one).
    clients: Mapping[str, str | None] = field(default_factory=dict)

    def place(self, prompt_id: str) -> Place | None:
        if prompt_id in self.running:
            return "running"
        if prompt_id in self.pending:
            return "pending"
        return None

    def of(self, client_id: str) -> QueueState:
        """The prompts ``client_id`` queued."""
        return QueueState(
            tuple(p for p in self.running if self.clients.get(p) == client_id),
            tuple(p for p in self.pending if self.clients.get(p) == client_id),
            {p: c for p, c in self.clients.items() if c == client_id},
        )


@dataclass(frozen=True, slots=True)
class OutputFile:
    """One file a prompt's output node reported."""

    node_id: str
    filename: str
    subfolder: str
    type: str


@dataclass(frozen=True, slots=True)
class RunResult:
    """A finished prompt: its stored PNG images, in output order."""

    prompt_id: str
    images: list[bytes]
    files: list[OutputFile]
    #: The outputs came from an earlier run of this prompt id (found in the history).
    reused: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    #: Seconds each model file took to load in this prompt (a loader node that ComfyUI
    #: ran; a cached one loaded nothing and is not here).
    loads: dict[str, float] = field(default_factory=dict)


def model_files(node: object) -> list[str]:
    """The model files a loader node (``CheckpointLoaderSimple``, ``LoraLoader``, ...)
    reads: its literal ``*_name`` inputs. Empty for any other node."""
    if not isinstance(node, Mapping) or "Loader" not in str(node.get("class_type", "")):
        return []
    inputs = node.get("inputs")
    if not isinstance(inputs, Mapping):
        return []
    return [v for k, v in inputs.items() if str(k).endswith("_name") and isinstance(v, str)]


class _Signal(enum.Enum):
    """What the reader (or a cancel) tells every waiting run besides frames."""

    DOWN = "down"
    UP = "up"
    GONE = "gone"
    CANCEL = "cancel"


@dataclass(frozen=True, slots=True)
class _Message:
    type: str
    data: Mapping[str, Any]


_Event = _Message | PreviewFrame | _Signal


class _Inbox:
    """One run's frames, in arrival order; previews beyond a couple are dropped."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[_Event] = asyncio.Queue()
        self._previews = 0
        self.previews_dropped = 0
        self.cancel_requested = False

    def put(self, event: _Event) -> None:
        if isinstance(event, PreviewFrame):
            if self._previews >= QUEUED_PREVIEWS:
                self.previews_dropped += 1
                return
            self._previews += 1
        self._queue.put_nowait(event)

    async def get(self, timeout: float) -> _Event:
        """The next event; raises ``TimeoutError`` when none comes within ``timeout``."""
        if self._queue.empty():
            if timeout <= 0:
                raise TimeoutError
            event = await asyncio.wait_for(self._queue.get(), timeout)
        else:
            event = self._queue.get_nowait()
        if isinstance(event, PreviewFrame):
            self._previews -= 1
        return event


class ComfyUIClient:
    """HTTP calls and the WebSocket of one ComfyUI at ``url``, as ``client_id``.

    ``connect_timeout`` bounds each TCP connect and WebSocket handshake,
    ``request_timeout`` each HTTP call, ``reconnect_max_seconds`` one pause between
    reconnection attempts. With ``preview_metadata`` off the client does not negotiate
    type-4 previews and gets type-1 frames.
    """

    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        connect_timeout: float = 10.0,
        request_timeout: float = 30.0,
        reconnect_max_seconds: float = 30.0,
        preview_metadata: bool = True,
    ) -> None:
        base = URL(url)
        if base.scheme not in ("http", "https") or not base.host:
            raise ValueError(f"ComfyUI URL must be http(s)://host[:port][/path], got {url!r}")
        self._base = (
            base.with_path(base.path.rstrip("/") + "/").with_query(None).with_fragment(None)
        )
        self.client_id = client_id
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.reconnect_max_seconds = reconnect_max_seconds
        self.preview_metadata = preview_metadata
        self.server_features: dict[str, Any] = {}
        self._session: aiohttp.ClientSession | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._connected = asyncio.Event()
        self._closing = False
        self._last_error = "not connected yet"
        self._inboxes: dict[str, _Inbox] = {}
        self._executing: str | None = None
        self._cleanups: set[asyncio.Task[None]] = set()
        #: Prompts this client interrupted because their run was given up (cancelled, a
        #: callback failed). A later run of the same id waits for such a prompt to end
        #: instead of following it: ComfyUI applies an interrupt only at its next check.
        self._abandoned = RecentIds(ABANDONED_REMEMBERED)

    @property
    def url(self) -> str:
        return str(self._base)

    @property
    def connected(self) -> bool:
        """Whether the WebSocket is open now."""
        return self._connected.is_set()

    # -- lifecycle ---------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the WebSocket (starting the reader when it is not running) and wait until
        it is up. Raises :class:`ComfyUIUnavailable` after ``connect_timeout``."""
        if self._closing:
            raise RuntimeError("this ComfyUI client is closed")
        if self._connected.is_set():
            return
        reader = self._start_reader()
        waiter = asyncio.ensure_future(self._connected.wait())
        try:
            await asyncio.wait(
                {waiter, reader}, timeout=self.connect_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waiter.cancel()
        if not self._connected.is_set():
            raise ComfyUIUnavailable(
                f"no WebSocket to {self._ws_url()} within {self.connect_timeout:g}s: "
                f"{self._last_error}"
            )

    async def close(self) -> None:
        """Let pending interrupts go out, stop the reader, close the session. Safe twice."""
        if self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)
        self._closing = True
        ws, reader = self._ws, self._reader
        self._reader = None
        if ws is not None and not ws.closed:
            with contextlib.suppress(*CONNECTION_ERRORS):
                await ws.close()
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        self._connected.clear()
        self._broadcast(_Signal.GONE)  # runs still waiting end now, not at their stall limit
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- HTTP API ----------------------------------------------------------------------

    async def submit(
        self,
        graph: Mapping[str, Any],
        prompt_id: str,
        extra_data: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """``POST /prompt`` under ``prompt_id`` (a lowercase UUID); returns ComfyUI's answer
        (``prompt_id``, ``number``, ``node_errors``). Raises :class:`PromptRejected` when
        ComfyUI's validation fails."""
        body = {
            "prompt": graph,
            "client_id": self.client_id,
            "prompt_id": prompt_id,
            "extra_data": dict(extra_data or {}),
        }
        status, raw = await self._request("POST", "prompt", json_body=body, allow=(400,))
        if status == 400:
            rejected = rejection(_loads(raw), graph)
            if rejected is None:
                raise for_status(status, "POST", "/prompt", raw.decode("utf-8", "replace"))
            raise rejected
        answer = self._json_object(raw, "POST /prompt")
        if answer.get("prompt_id") not in (None, prompt_id):
            raise UnexpectedResponse(
                f"POST /prompt queued {answer.get('prompt_id')!r} instead of {prompt_id!r}"
            )
        if answer.get("node_errors"):
            log.warning(
                "comfyui.partial_prompt",
                prompt_id=prompt_id,
                node_errors=list(answer["node_errors"]),
            )
        return answer

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        """``GET /history/{prompt_id}``: the prompt's entry, or ``None`` when ComfyUI has none."""
        _, raw = await self._request("GET", f"history/{prompt_id}")
        entry = self._json_object(raw, "GET /history").get(prompt_id)
        return entry if isinstance(entry, dict) else None

    async def view(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:
        """``GET /view``: the bytes of one file ComfyUI stored."""
        params = {"filename": filename, "subfolder": subfolder, "type": type}
        _, raw = await self._request("GET", "view", params=params)
        return raw

    async def upload_image(
        self, filename: str, data: bytes, *, subfolder: str = "", overwrite: bool = True
    ) -> str:
        """``POST /upload/image`` (multipart ``image``, ``type=input``, ``subfolder``,
        ``overwrite``) and return the name a ``LoadImage`` node takes: ``subfolder/name``
        as ComfyUI answered it (it renames ``x.png`` to ``x (1).png`` when it holds
        another file under that name and ``overwrite`` is off)."""
        form = aiohttp.FormData()
        form.add_field("image", data, filename=filename, content_type="application/octet-stream")
        form.add_field("type", "input")
        form.add_field("subfolder", subfolder)
        form.add_field("overwrite", "true" if overwrite else "false")
        _, raw = await self._request("POST", "upload/image", form=form)
        answer = self._json_object(raw, "POST /upload/image")
        name, folder = answer.get("name"), answer.get("subfolder", "")
        if not isinstance(name, str) or not name or not isinstance(folder, str):
            raise UnexpectedResponse(f"POST /upload/image answered {raw[:200]!r}")
        return f"{folder.strip('/')}/{name}" if folder.strip("/") else name

    async def delete_history(self, prompt_ids: Iterable[str]) -> None:
        """``POST /history {"delete": [...]}``."""
        await self._request("POST", "history", json_body={"delete": list(prompt_ids)})

    async def interrupt(self, prompt_id: str) -> None:
        """``POST /interrupt {"prompt_id": ...}``: interrupts that prompt only if it runs
        (never a global interrupt, which would stop someone else's job)."""
        await self._request("POST", "interrupt", json_body={"prompt_id": prompt_id})

    async def free(self, *, unload_models: bool = True, free_memory: bool = True) -> None:
        """``POST /free``: unload models and/or free cached memory before the next prompt."""
        body = {"unload_models": unload_models, "free_memory": free_memory}
        await self._request("POST", "free", json_body=body)

    async def system_stats(self) -> dict[str, Any]:
        """``GET /system_stats``: versions, RAM, and each device's name and VRAM."""
        _, raw = await self._request("GET", "system_stats")
        return self._json_object(raw, "GET /system_stats")

    async def object_info(self, node_class: str | None = None) -> dict[str, Any]:
        """``GET /object_info[/{node_class}]``: node definitions (empty for unknown classes)."""
        path = "object_info" if node_class is None else f"object_info/{node_class}"
        _, raw = await self._request("GET", path)
        return self._json_object(raw, f"GET /{path}")

    async def queue(self) -> QueueState:
        """``GET /queue``: which prompts run and which wait."""
        _, raw = await self._request("GET", "queue")
        answer = self._json_object(raw, "GET /queue")
        running, pending = answer.get("queue_running"), answer.get("queue_pending")
        return QueueState(
            running=_queue_ids(running),
            pending=_queue_ids(pending),
            clients={**_queue_clients(running), **_queue_clients(pending)},
        )

    async def delete_from_queue(self, prompt_ids: Iterable[str]) -> None:
        """``POST /queue {"delete": [...]}``: removes pending prompts (never a running one)."""
        await self._request("POST", "queue", json_body={"delete": list(prompt_ids)})

    async def stop(self, prompt_id: str) -> Place | None:
        """Stop ``prompt_id`` wherever it is: deleted when pending, interrupted (by its id)
        when running. Returns where it was, or ``None`` when ComfyUI has it in neither."""
        place = (await self.queue()).place(prompt_id)
        if place == "pending":
            await self.delete_from_queue([prompt_id])
            # It may have started between the two calls; a delete never stops a running one.
            if (await self.queue()).place(prompt_id) != "running":
                return "pending"
        elif place is None:
            return None
        await self.interrupt(prompt_id)
        return "running"

    async def cancel(self, prompt_id: str) -> bool:
        """Cancel ``prompt_id``. A run of it on this client stops it and ends with
        :class:`PromptInterrupted`; otherwise it is stopped in ComfyUI if found there.
        Returns whether there was anything to cancel."""
        inbox = self._inboxes.get(prompt_id)
        if inbox is not None:
            inbox.cancel_requested = True
            inbox.put(_Signal.CANCEL)
            return True
        return await self.stop(prompt_id) is not None

    # -- a prompt's run ----------------------------------------------------------------

    async def run(
        self,
        prompt_id: str,
        graph: Mapping[str, Any],
        *,
        extra_data: Mapping[str, Any] | None = None,
        on_progress: ProgressCallback | None = None,
        on_preview: PreviewCallback | None = None,
        stall_seconds: float = 120.0,
        reuse: bool = True,
    ) -> RunResult:
        """Run ``graph`` as ``prompt_id`` to the end and return its stored images.

        With ``reuse``, a finished entry for ``prompt_id`` already in the history is
        returned without running again, and a prompt still queued or running is followed
        instead of submitted twice (a redelivered job). Raises the errors listed in
        :mod:`renderer.comfyui.exceptions`. If cancelled, the prompt is stopped (shielded,
        bounded) before the cancellation goes on.
        """
        await self.connect()
        if prompt_id in self._inboxes:
            raise RuntimeError(f"prompt {prompt_id} already has a run on this client")
        inbox = _Inbox()
        self._inboxes[prompt_id] = inbox
        run = _Run(self, prompt_id, graph, inbox, on_progress, on_preview, stall_seconds)
        try:
            return await run.execute(extra_data=extra_data, reuse=reuse)
        except BaseException as exc:
            # Cancelled, or a callback failed: the prompt must not run on unwatched. (The
            # run's own errors have stopped it already, or ComfyUI cannot be reached.)
            if run.submitted and not run.ended and not isinstance(exc, RenderError):
                why = "cancelled" if isinstance(exc, asyncio.CancelledError) else "failed"
                await asyncio.shield(self._spawn(self._stop_quietly(prompt_id, why)))
            raise
        finally:
            del self._inboxes[prompt_id]
            if inbox.previews_dropped:
                log.debug(
                    "comfyui.previews_dropped", prompt_id=prompt_id, count=inbox.previews_dropped
                )

    def output_files(self, prompt_id: str, outputs: Mapping[str, Any]) -> list[OutputFile]:
        """The files among ``outputs`` (a history entry's) worth storing, in output order:
        images of type ``output``. What is left out (temp previews, text, audio, video
        entries, ...) is logged."""
        files: list[OutputFile] = []
        skipped: list[str] = []
        for node_id, output in outputs.items():
            if not isinstance(output, Mapping):
                continue
            for key, items in output.items():
                if key == "animated":
                    continue
                if key != "images" or not isinstance(items, list):
                    skipped.append(f"node {node_id}: {key}")
                    continue
                for item in items:
                    if not isinstance(item, Mapping) or not isinstance(item.get("filename"), str):
                        skipped.append(f"node {node_id}: unreadable image entry")
                    elif item.get("type", "output") != "output":
                        skipped.append(f"node {node_id}: {item['filename']} ({item.get('type')})")
                    else:
                        files.append(
                            OutputFile(
                                node_id=str(node_id),
                                filename=item["filename"],
                                subfolder=str(item.get("subfolder") or ""),
                                type="output",
                            )
                        )
        if skipped:
            log.info("comfyui.outputs_not_stored", prompt_id=prompt_id, skipped=skipped)
        return files

    # -- internals ---------------------------------------------------------------------

    def _ws_url(self) -> URL:
        scheme = "wss" if self._base.scheme == "https" else "ws"
        return self._base.with_scheme(scheme).join(URL("ws"))

    def _open_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(
                    total=self.request_timeout, sock_connect=self.connect_timeout
                )
            )
        return self._session

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json_body: object = None,
        params: Mapping[str, str] | None = None,
        allow: tuple[int, ...] = (),
        timeout: float | None = None,
        form: aiohttp.FormData | None = None,
    ) -> tuple[int, bytes]:
        """The one way to call ComfyUI's HTTP API: ``(status, body)`` for a 2xx or an
        ``allow``-ed status; any other status, a timeout or a connection failure raises
        the error :mod:`renderer.comfyui.exceptions` assigns to it."""
        if self._closing:
            raise RuntimeError("this ComfyUI client is closed")
        seconds = self.request_timeout if timeout is None else timeout
        data: str | aiohttp.FormData | None = (
            form if json_body is None else json.dumps(json_body, default=_plain)
        )
        headers = {"Content-Type": "application/json"} if json_body is not None else {}
        try:
            async with self._open_session().request(
                method,
                self._base.join(URL(path)),
                data=data,
                headers=headers,
                params=params,
                timeout=aiohttp.ClientTimeout(total=seconds, sock_connect=self.connect_timeout),
            ) as response:
                status = response.status
                body = await response.read()
        except TimeoutError as exc:
            raise ComfyUIUnavailable(f"{method} /{path}: no answer within {seconds:g}s") from exc
        except aiohttp.ClientError as exc:
            raise ComfyUIUnavailable(f"{method} /{path}: {_describe(exc)}") from exc
        if status >= 300 and status not in allow:
            raise for_status(status, method, f"/{path}", body.decode("utf-8", "replace"))
        return status, body

    @staticmethod
    def _json_object(raw: bytes, what: str) -> dict[str, Any]:
        value = _loads(raw)
        if not isinstance(value, dict):
            raise UnexpectedResponse(f"{what} answered {raw[:200]!r}, not a JSON object")
        return value

    def _start_reader(self) -> asyncio.Task[None]:
        reader = self._reader
        if reader is not None and not reader.done():
            return reader
        self._reader = asyncio.create_task(self._read(), name=f"comfyui-reader:{self.url}")
        self._reader.add_done_callback(self._reader_done)
        return self._reader

    def _reader_done(self, reader: asyncio.Task[None]) -> None:
        # A reader that died of a bug must not leave runs waiting for frames that never come.
        if not reader.cancelled() and reader.exception() is not None:
            log.error("comfyui.reader_crashed", error=repr(reader.exception()))
            self._connected.clear()
            self._broadcast(_Signal.GONE)

    def _backoff(self, failures: int) -> float:
        ceiling = min(self.reconnect_max_seconds, RECONNECT_BASE_SECONDS * 2 ** (failures - 1))
        return _JITTER.uniform(0, ceiling)

    async def _read(self) -> None:
        """Own the WebSocket: connect, pump frames, reconnect; give up after
        :data:`RECONNECT_ATTEMPTS` failures in a row."""
        loop = asyncio.get_running_loop()
        failures = 0
        first = True
        while failures < RECONNECT_ATTEMPTS:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    ws = await self._open_ws()
            except CONNECTION_ERRORS as exc:
                failures += 1
                self._last_error = _describe(exc)
                log.warning(
                    "comfyui.connect_failed",
                    url=self.url,
                    attempt=failures,
                    error=self._last_error,
                )
                if failures < RECONNECT_ATTEMPTS:
                    await asyncio.sleep(self._backoff(failures))
                continue
            opened = loop.time()
            self._ws = ws
            self._connected.set()
            log.info("comfyui.connected", url=self.url, client_id=self.client_id)
            if not first:
                self._broadcast(_Signal.UP)
            first = False
            try:
                await self._pump(ws)
            except CONNECTION_ERRORS as exc:
                self._last_error = _describe(exc)
            finally:
                self._ws = None
                self._connected.clear()
                self._executing = None
                if not ws.closed:
                    with contextlib.suppress(*CONNECTION_ERRORS):
                        await ws.close()
            if self._closing:
                return
            log.warning("comfyui.disconnected", url=self.url, error=self._last_error)
            self._broadcast(_Signal.DOWN)
            # The first reconnection is immediate (runs are waiting); a server that keeps
            # dropping young connections gets the growing pauses of failed attempts.
            failures = failures + 1 if loop.time() - opened < STABLE_CONNECTION_SECONDS else 0
            if 1 < failures < RECONNECT_ATTEMPTS:
                await asyncio.sleep(self._backoff(failures - 1))
        log.error("comfyui.gave_up", url=self.url, attempts=failures, error=self._last_error)
        self._broadcast(_Signal.GONE)

    async def _open_ws(self) -> aiohttp.ClientWebSocketResponse:
        ws = await self._open_session().ws_connect(
            self._ws_url(),
            params={"clientId": self.client_id},
            heartbeat=HEARTBEAT_SECONDS,
            max_msg_size=MAX_FRAME_BYTES,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=WS_CLOSE_SECONDS),
        )
        if self.preview_metadata:
            try:
                await ws.send_json(
                    {"type": "feature_flags", "data": {"supports_preview_metadata": True}}
                )
            except BaseException:
                await ws.close()
                raise
        return ws

    async def _pump(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for message in ws:
            if message.type is aiohttp.WSMsgType.TEXT:
                self._on_text(message.data)
            elif message.type is aiohttp.WSMsgType.BINARY:
                self._on_binary(message.data)
            elif message.type is aiohttp.WSMsgType.ERROR:
                error = ws.exception()
                self._last_error = _describe(error) if error else "WebSocket error"
                return
        self._last_error = f"WebSocket closed (code {ws.close_code})"

    def _on_text(self, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            log.warning("comfyui.bad_frame", frame=text[:200])
            return
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            return
        kind: str = message["type"]
        data = message.get("data")
        if not isinstance(data, dict):
            return
        if kind == "feature_flags":
            self.server_features = data
            return
        prompt_id = data.get("prompt_id")
        if not isinstance(prompt_id, str):
            return
        if kind == "executing" and data.get("node") is None:
            if self._executing == prompt_id:
                self._executing = None
        elif kind in ("execution_start", "executing", "progress", "executed"):
            self._executing = prompt_id
        inbox = self._inboxes.get(prompt_id)
        if inbox is not None:
            inbox.put(_Message(kind, data))

    def _on_binary(self, data: bytes) -> None:
        try:
            frame = parse_binary_frame(data)
        except FrameError as exc:
            log.warning("comfyui.bad_frame", error=str(exc))
            return
        if frame is None:
            return
        prompt_id = frame.prompt_id or self._executing
        inbox = self._inboxes.get(prompt_id) if prompt_id else None
        if inbox is not None:
            inbox.put(frame)

    async def _recycle(self) -> None:
        """Close the WebSocket; the reader opens a new one at once."""
        ws = self._ws
        if ws is not None and not ws.closed:
            with contextlib.suppress(*CONNECTION_ERRORS):
                await ws.close()

    def _broadcast(self, signal: _Signal) -> None:
        for inbox in self._inboxes.values():
            inbox.put(signal)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A task that ``close()`` waits for: clean-up that must outlive a cancelled run."""
        task = asyncio.create_task(work)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        return task

    async def _stop_quietly(self, prompt_id: str, why: str) -> None:
        """:meth:`stop`, bounded, logging instead of raising: used where a failure to stop
        must not hide the error that made us stop."""
        try:
            async with asyncio.timeout(2 * self.request_timeout):
                place = await self.stop(prompt_id)
        except (RenderError, TimeoutError) as exc:
            log.warning("comfyui.stop_failed", prompt_id=prompt_id, why=why, error=str(exc))
        else:
            if place == "running":
                self._abandoned.add(prompt_id)
            log.info("comfyui.stopped", prompt_id=prompt_id, why=why, was=place)

    async def _abandoned_ended(
        self, prompt_id: str, seconds: float
    ) -> tuple[Literal["done", "pending", "running"], dict[str, Any] | None] | None:
        """Where ``prompt_id`` is once the interrupt we sent it has stopped it (see
        ``_abandoned``): in the history, or nowhere. Raises :class:`PromptStalled` when
        it still runs after ``seconds``."""
        deadline = time.monotonic() + seconds
        while True:
            found = await self._locate(prompt_id, settle=True)
            if found is None or found[0] == "done":
                self._abandoned.discard(prompt_id)
                return found
            if time.monotonic() >= deadline:
                raise PromptStalled(prompt_id, seconds, None)
            await asyncio.sleep(HISTORY_POLL_SECONDS)

    async def _forget(self, prompt_id: str) -> None:
        """Delete the prompt's history entry; a failure is logged, never raised."""
        try:
            await self.delete_history([prompt_id])
        except RenderError as exc:
            log.warning("comfyui.history_not_deleted", prompt_id=prompt_id, error=str(exc))

    async def _settled_history(self, prompt_id: str) -> dict[str, Any] | None:
        """The history entry of a prompt that ended, waiting a moment for it to be written."""
        deadline = time.monotonic() + HISTORY_WAIT_SECONDS
        while True:
            entry = await self.history(prompt_id)
            if entry is not None or time.monotonic() >= deadline:
                return entry
            await asyncio.sleep(HISTORY_POLL_SECONDS)

    async def _locate(
        self, prompt_id: str, *, settle: bool
    ) -> tuple[Literal["done", "pending", "running"], dict[str, Any] | None] | None:
        """Where ComfyUI has ``prompt_id``: its history entry, its queue, or ``None``.
        With ``settle``, looks again for a moment in case the history is being written."""
        deadline = time.monotonic() + (HISTORY_WAIT_SECONDS if settle else 0.0)
        while True:
            entry = await self.history(prompt_id)
            if entry is not None:
                return "done", entry
            place = (await self.queue()).place(prompt_id)
            if place is not None:
                return place, None
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(HISTORY_POLL_SECONDS)

    async def _fetch(self, prompt_id: str, files: list[OutputFile]) -> list[bytes]:
        images: list[bytes] = []
        for file in files:
            blob = await self.view(file.filename, file.subfolder, file.type)
            if blob.startswith(PNG_SIGNATURE):
                images.append(blob)
            else:
                log.info(
                    "comfyui.outputs_not_stored",
                    prompt_id=prompt_id,
                    skipped=[f"node {file.node_id}: {file.filename} (not a PNG)"],
                )
        return images


class _Run:
    """One prompt from submit (or attach) to its images: the frames' state machine."""

    def __init__(
        self,
        client: ComfyUIClient,
        prompt_id: str,
        graph: Mapping[str, Any],
        inbox: _Inbox,
        on_progress: ProgressCallback | None,
        on_preview: PreviewCallback | None,
        stall_seconds: float,
    ) -> None:
        self._client = client
        self._prompt_id = prompt_id
        self._graph = graph
        self._inbox = inbox
        self._on_progress = on_progress
        self._on_preview = on_preview
        self._stall_seconds = stall_seconds
        self._node: str | None = None
        self._step: int | None = None
        #: The loader node running now and when it began, and what loads took.
        self._loading: tuple[list[str], float] | None = None
        self.loads: dict[str, float] = {}
        self._outputs: dict[str, Any] = {}
        self._failure: RenderError | None = None
        self._interrupted = False
        #: Frames are an earlier prompt's under this id until ``execution_start``.
        self._stale = False
        self._stalled = False
        self._disconnected = False
        self._closing = False
        self._deadline = 0.0
        self.submitted = False
        self.ended = False

    async def execute(self, *, extra_data: Mapping[str, Any] | None, reuse: bool) -> RunResult:
        client, prompt_id = self._client, self._prompt_id
        began = time.monotonic()
        if reuse:
            found = await client._locate(prompt_id, settle=False)
            if found is not None and found[1] is None and prompt_id in client._abandoned:
                # An earlier run here gave it up and interrupted it; following it would
                # end this run as interrupted. Let it end, then reuse or submit afresh.
                log.info("comfyui.waiting_for_interrupt", prompt_id=prompt_id, place=found[0])
                found = await client._abandoned_ended(prompt_id, self._stall_seconds)
                # Its last frames (the end frame comes after its history entry) may
                # still arrive, under the same id: skip frames until this run's start.
                self._stale = True
            if found is not None and found[1] is not None and _outcome(found[1])[0] == "success":
                log.info("comfyui.reused", prompt_id=prompt_id)
                self.submitted = self.ended = True
                return await self._finish(found[1], began, reused=True)
            if found is not None and found[1] is not None:
                # An earlier attempt failed; its entry would shadow this one's.
                await client.delete_history([prompt_id])
            elif found is not None:
                log.info("comfyui.attached", prompt_id=prompt_id, place=found[0])
                self.submitted = True
        client._abandoned.discard(prompt_id)  # this run decides its fate now
        if not self.submitted:
            if self._inbox.cancel_requested:
                raise PromptInterrupted(prompt_id, requested=True)
            # Set first: a cancel during the POST must still stop a prompt that got queued.
            self.submitted = True
            await client.submit(self._graph, prompt_id, extra_data)
        entry = await self._follow()
        self.ended = True
        return await self._finish(entry, began, reused=False)

    def _touch(self) -> None:
        if not self._closing:
            self._deadline = time.monotonic() + self._stall_seconds

    def _expect_end(self) -> None:
        """The prompt is over in all but its end frame: wait only a grace period for it."""
        self._closing = True
        self._deadline = time.monotonic() + END_GRACE_SECONDS

    async def _follow(self) -> dict[str, Any] | None:
        """Consume frames until the end; returns a history entry when reconciliation
        found the prompt finished (its end frame lost with the old socket)."""
        self._touch()
        while True:
            try:
                event = await self._inbox.get(self._deadline - time.monotonic())
            except TimeoutError:
                if self._closing:
                    log.warning("comfyui.no_end_frame", prompt_id=self._prompt_id)
                    return None
                if self._disconnected:
                    raise ComfyUIUnavailable(
                        f"WebSocket down for {self._stall_seconds:g}s during prompt "
                        f"{self._prompt_id}"
                    ) from None
                entry = await self._stall()
                if entry is not None:
                    return entry
                continue
            if self._stale and isinstance(event, _Message | PreviewFrame):
                if not (isinstance(event, _Message) and event.type == "execution_start"):
                    continue
                self._stale = False
            if isinstance(event, _Message):
                if self._on_message(event):
                    return None
                if event.type == "progress" and self._on_progress is not None:
                    total = _int(event.data.get("max")) or 1
                    await self._on_progress(self._step or 0, max(total, 1), self._node_name())
            elif isinstance(event, PreviewFrame):
                self._touch()
                if self._on_preview is not None:
                    await self._on_preview(event, self._step)
            elif event is _Signal.DOWN:
                self._disconnected = True
            elif event is _Signal.UP:
                self._disconnected = False
                entry = await self._reconcile()
                if entry is not None:
                    return entry
            elif event is _Signal.GONE:
                raise ComfyUIUnavailable(
                    f"WebSocket lost for good during prompt {self._prompt_id}: "
                    f"{self._client._last_error}"
                )
            elif event is _Signal.CANCEL:
                place = await self._client.stop(self._prompt_id)
                log.info("comfyui.cancelling", prompt_id=self._prompt_id, was=place)
                if place == "pending":
                    return None
                self._expect_end()

    def _on_message(self, message: _Message) -> bool:
        """Update the state from one frame; True at the end frame."""
        data = message.data
        if message.type == "executing":
            node = data.get("node")
            self._loaded()
            if node is None:
                return True
            self._node = str(node)
            files = model_files(self._graph.get(self._node))
            if files:
                self._loading = (files, time.monotonic())
            self._touch()
        elif message.type == "progress":
            self._step = _int(data.get("value"))
            node = data.get("node")
            if node is not None:
                self._node = str(node)
            self._touch()
        elif message.type == "executed":
            node = data.get("node")
            output = data.get("output")
            if node is not None and isinstance(output, Mapping):
                self._outputs[str(node)] = output
            self._touch()
        elif message.type == "execution_error":
            self._failure = execution_failure(data, self._graph)
            self._expect_end()
        elif message.type == "execution_interrupted":
            self._interrupted = True
            self._expect_end()
        else:  # execution_start, execution_cached, execution_success, progress_state
            self._touch()
        return False

    def _loaded(self) -> None:
        """The node after a loader began (or the prompt ended): the loader is done."""
        if self._loading is not None:
            files, began = self._loading
            self._loading = None
            seconds = round(time.monotonic() - began, 4)
            for file in files:
                self.loads[file] = seconds

    async def _stall(self) -> dict[str, Any] | None:
        """Nothing for the stall limit. If ComfyUI finished the prompt all the same (its
        frames went elsewhere), returns its history entry; else interrupts it."""
        found = await self._client._locate(self._prompt_id, settle=False)
        if found is not None and found[1] is not None:
            log.warning("comfyui.frames_missed", prompt_id=self._prompt_id)
            return found[1]
        if found is not None and found[0] == "pending":
            # Waiting behind other prompts (the worker keeps ComfyUI's queue fed) is not a
            # stall: the limit counts from the moment this prompt runs.
            log.debug("comfyui.still_queued", prompt_id=self._prompt_id)
            self._touch()
            return None
        log.warning(
            "comfyui.stalled",
            prompt_id=self._prompt_id,
            seconds=self._stall_seconds,
            node=self._node,
        )
        self._stalled = True
        # ComfyUI may have stopped routing frames to this socket (an old connection with
        # the same clientId closing late unregisters the new one): open a fresh one.
        await self._client._recycle()
        await self._client._stop_quietly(self._prompt_id, "stalled")
        self._expect_end()
        return None

    async def _reconcile(self) -> dict[str, Any] | None:
        """After a reconnect: the history entry if the prompt ended meanwhile, ``None`` if
        it is still queued or running. Raises :class:`PromptLost` if ComfyUI forgot it."""
        found = await self._client._locate(self._prompt_id, settle=True)
        log.info(
            "comfyui.reconciled",
            prompt_id=self._prompt_id,
            found=None if found is None else found[0],
        )
        if found is None:
            raise PromptLost(self._prompt_id)
        self._touch()
        return found[1]

    async def _finish(
        self, entry: dict[str, Any] | None, began: float, *, reused: bool
    ) -> RunResult:
        client, prompt_id = self._client, self._prompt_id
        try:
            self._raise_known()
            if entry is None:
                entry = await client._settled_history(prompt_id)
                if entry is None:
                    log.warning("comfyui.history_missing", prompt_id=prompt_id)
            ran = time.monotonic()
            self._raise_recorded(entry)
            outputs = entry.get("outputs") if entry is not None else None
            if not isinstance(outputs, Mapping) or not outputs:
                outputs = self._outputs
            files = client.output_files(prompt_id, outputs)
            images = await client._fetch(prompt_id, files)
            if self._inbox.cancel_requested:
                raise PromptInterrupted(prompt_id, requested=True)
        except RenderError:
            await client._forget(prompt_id)
            raise
        await client._forget(prompt_id)
        timings = {"comfyui": round(ran - began, 4), "fetch": round(time.monotonic() - ran, 4)}
        if self.loads:
            timings["model_load"] = round(max(self.loads.values()), 4)
        return RunResult(
            prompt_id, images, files, reused=reused, timings=timings, loads=dict(self.loads)
        )

    def _raise_known(self) -> None:
        """Raise what the frames already told: a cancel, a stall, an error, an interrupt."""
        prompt_id = self._prompt_id
        if self._inbox.cancel_requested:
            raise PromptInterrupted(prompt_id, requested=True)
        if self._stalled:
            raise PromptStalled(prompt_id, self._stall_seconds, self._node_name())
        if self._failure is not None:
            raise self._failure
        if self._interrupted:
            raise PromptInterrupted(prompt_id, requested=False)

    def _raise_recorded(self, entry: Mapping[str, Any] | None) -> None:
        """Raise the failure a history entry records (frames lost with a dropped socket)."""
        if entry is None:
            return
        prompt_id = self._prompt_id
        outcome, data = _outcome(entry)
        if outcome == "error":
            raise execution_failure(data or {}, self._graph)
        if outcome == "interrupted":
            raise PromptInterrupted(prompt_id, requested=False)

    def _node_name(self) -> str | None:
        return node_name(self._graph, self._node)


def node_name(graph: Mapping[str, Any], node_id: str | None) -> str | None:
    """What a person calls a node: its ``_meta.title``, else its class, else its id."""
    if node_id is None:
        return None
    node = graph.get(node_id)
    if isinstance(node, Mapping):
        meta = node.get("_meta")
        if isinstance(meta, Mapping) and isinstance(meta.get("title"), str) and meta["title"]:
            return str(meta["title"])
        if isinstance(node.get("class_type"), str):
            return str(node["class_type"])
    return node_id


def _outcome(
    entry: Mapping[str, Any],
) -> tuple[Literal["success", "error", "interrupted"], Mapping[str, Any] | None]:
    """How a history entry ended, with the error's data when it failed."""
    status = entry.get("status")
    if not isinstance(status, Mapping):
        return "success", None
    messages = status.get("messages")
    for item in messages if isinstance(messages, list) else []:
        if isinstance(item, list) and len(item) == 2 and isinstance(item[1], Mapping):
            if item[0] == "execution_error":
                return "error", item[1]
            if item[0] == "execution_interrupted":
                return "interrupted", item[1]
    if status.get("status_str") == "error":
        return "error", None
    return "success", None


def _queue_ids(items: object) -> tuple[str, ...]:
    if not isinstance(items, list):
        return ()
    return tuple(str(item[1]) for item in items if isinstance(item, list | tuple) and len(item) > 1)


def _queue_clients(items: object) -> dict[str, str | None]:
    """prompt id -> the ``client_id`` in its ``extra_data`` (a queue item's fourth field)."""
    if not isinstance(items, list):
        return {}
    clients: dict[str, str | None] = {}
    for item in items:
        if isinstance(item, list | tuple) and len(item) > 1:
            extra = item[3] if len(item) > 3 and isinstance(item[3], dict) else {}
            client = extra.get("client_id")
            clients[str(item[1])] = client if isinstance(client, str) else None
    return clients


def _int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


def _loads(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise UnexpectedResponse(f"not JSON: {raw[:200]!r}") from exc


def _plain(value: object) -> object:
    """``json.dumps`` fallback: graphs may hold read-only mappings and tuples."""
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
