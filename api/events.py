"""A job's events as Server-Sent Events (``GET /v1/jobs/{id}/events``).

The stream, in order:

1. ``retry: 3000`` (how long a disconnected ``EventSource`` waits before reconnecting);
2. ``event: state`` — the job as ``GET /v1/jobs/{id}`` shows it now (status, position),
   so a client that connects late starts from the present;
3. while the job waits: ``event: position`` each time its place in its lane changes;
4. the job's own events as they arrive: ``accepted``, ``progress``, ``preview`` (its
   ``image`` a ``data:`` URL, ready for an ``<img src>``), then exactly one terminal
   ``succeeded`` or ``failed``; after it the server ends the stream;
5. between them, a comment line (``: keep-alive``) every ``API_SSE_HEARTBEAT_SECONDS``
   so proxies keep an idle stream open.

``data`` is one line of JSON. The job's own events carry ``id: <attempt>-<seq>``; the
terminal one ``id: end``. A reconnecting client sends ``Last-Event-ID``: events not
newer than that id are not sent again (progress and previews the tracker replays to new
streams), and ``Last-Event-ID: end`` (the client has seen the end) is answered ``204 No
Content``, which tells an ``EventSource`` to stop reconnecting. ``state`` and
``position`` carry no id: they describe the present, not a point in the job's history.

Progress and previews are droppable: a reader slower than the renderer misses some
(``brigade_stream_events_dropped_total``), never the terminal event.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from api.context import STREAM_END, ApiState, StreamEnd, StreamQueue
from api.models import JobView
from jobs.ledger import JobRecord
from jobs.models import Event, JobStatus, Preview, Succeeded
from jobs.tracker import JobWatch

log = structlog.get_logger(__name__)

#: Milliseconds an EventSource waits before reconnecting.
RETRY_MS = 3000
#: Seconds between two reads of a queued job's position (the ledger has no position events).
POSITION_SECONDS = 1.0
END_ID = "end"
_ID = re.compile(r"^(\d{1,9})-(\d{1,12})$")

#: Renders a job as ``GET /v1/jobs/{id}`` shows it.
View = Callable[[JobRecord], Awaitable[JobView]]

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache, no-store",
    # nginx buffers responses unless told not to: a buffered stream arrives all at the end.
    "X-Accel-Buffering": "no",
}


def frame(event: str, data: Any, event_id: str | None = None) -> bytes:
    """One SSE message. ``data`` is compact JSON, so it is always one line."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"{head}event: {event}\ndata: {body}\n\n".encode()


def parse_last_event_id(value: str | None) -> tuple[int, int] | str | None:
    """``(attempt, seq)``, ``"end"``, or None for a missing or foreign id."""
    if value is None:
        return None
    value = value.strip()
    if value == END_ID:
        return END_ID
    match = _ID.match(value)
    return (int(match.group(1)), int(match.group(2))) if match else None


def event_data(event: Event) -> dict[str, Any]:
    """An event as the stream shows it: its fields, a preview as a ``data:`` URL."""
    data = event.model_dump(mode="json", exclude={"schema_version", "type", "image"})
    if isinstance(event, Preview):
        encoded = base64.b64encode(event.image).decode("ascii")
        data["image"] = f"data:{event.mime};base64,{encoded}"
    return data


async def _pump(watch: JobWatch, queue: StreamQueue) -> None:
    try:
        async for event in watch:
            await queue.put(event)
    finally:
        queue.put_nowait(STREAM_END)


async def stream(
    request: web.Request,
    api: ApiState,
    record: JobRecord,
    view: View,
) -> web.StreamResponse:
    """Stream ``record``'s job. ``view(record)`` renders a :class:`JobView` (the state)."""
    last = parse_last_event_id(request.headers.get("Last-Event-ID"))
    if last == END_ID:
        return web.Response(status=204)
    services, metrics = api.services, api.metrics
    job_id = record.job.job_id
    response = web.StreamResponse(status=200, headers=SSE_HEADERS)
    queue: StreamQueue = asyncio.Queue()
    api.streams.add(queue)
    metrics.streams.inc()
    # Watch before reading the state, so nothing falls between the two.
    async with services.tracker.watch(job_id) as watch:
        pump = asyncio.create_task(_pump(watch, queue))
        try:
            await response.prepare(request)
            await response.write(f"retry: {RETRY_MS}\n\n".encode())
            current = await services.ledger.get(job_id) or record
            state: JobView = await view(current)
            await response.write(frame("state", state.model_dump(mode="json")))
            await _relay(response, api, queue, current, state.position, last, view)
            await response.write_eof()
        except ConnectionResetError:
            log.debug("stream.closed_by_client", job_id=job_id)
        except Exception:  # the headers are sent: no problem document can follow
            log.exception("stream.failed", job_id=job_id)
        finally:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
            api.streams.discard(queue)
            metrics.streams.dec()
            if watch.dropped:
                metrics.stream_events_dropped.inc(watch.dropped)
    return response


async def _relay(
    response: web.StreamResponse,
    api: ApiState,
    queue: StreamQueue,
    record: JobRecord,
    position: int | None,
    last: tuple[int, int] | str | None,
    view: View,
) -> None:
    services, metrics = api.services, api.metrics
    job_id = record.job.job_id
    heartbeat = api.settings.sse_heartbeat_seconds
    loop = asyncio.get_running_loop()
    queued = record.status is JobStatus.QUEUED
    next_beat = loop.time() + heartbeat
    while True:
        wait = max(0.0, (next_beat - loop.time()))
        if queued:
            wait = min(wait, POSITION_SECONDS)
        try:
            async with asyncio.timeout(wait):
                item = await queue.get()
        except TimeoutError:
            if queued:
                now = await services.ledger.position(job_id)
                if now is None:
                    queued = False  # it left the queue; its events tell the rest
                elif now != position:
                    position = now
                    await response.write(frame("position", {"job_id": job_id, "position": now}))
                    next_beat = loop.time() + heartbeat
                    continue
            if loop.time() >= next_beat:
                await response.write(b": keep-alive\n\n")
                next_beat = loop.time() + heartbeat
            continue
        if isinstance(item, StreamEnd):
            return
        event = item
        if event.terminal:
            data = event_data(event)
            if isinstance(event, Succeeded):
                final = await services.ledger.get(job_id)
                if final is not None:
                    data["outputs"] = [
                        o.model_dump(mode="json") for o in (await view(final)).outputs
                    ]
            await response.write(frame(event.type.value, data, END_ID))
            return
        if isinstance(last, tuple) and (event.attempt, event.seq) <= last:
            continue
        queued = False
        await response.write(
            frame(event.type.value, event_data(event), f"{event.attempt}-{event.seq}")
        )
        if isinstance(event, Preview):
            metrics.previews_sent.inc()
        next_beat = loop.time() + heartbeat
