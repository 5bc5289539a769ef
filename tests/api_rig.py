"""The API on a real socket in front of the pipeline rig (``tests.fixtures.pipeline``),
and a small client for it: JSON calls, keys, and an SSE reader."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from api.context import Services
from api.database import ApiDatabase
from api.server import ApiServer, start_api
from api.settings import ApiSettings
from brigade.app import embedded_api
from brigade.settings import BrigadeSettings
from jobs.bus import JobBus
from jobs.settings import AmqpSettings
from tests.fixtures.pipeline import Rig, renderer_settings

ADMIN_KEY = "test-admin-key-0123456789abcdef"


def api_settings(**overrides: Any) -> ApiSettings:
    fields: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "admin_key": ADMIN_KEY,
        "sse_heartbeat_seconds": 0.5,
        **overrides,
    }
    return ApiSettings(_env_file=None, **fields)


@dataclass
class SseEvent:
    event: str
    data: Any
    id: str | None = None


@dataclass
class StreamRead:
    status: int
    headers: dict[str, str]
    events: list[SseEvent] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    retry: int | None = None


def parse_sse(text: str) -> StreamRead:
    """Parse a whole ``text/event-stream`` body (the format, not our assumptions)."""
    read = StreamRead(200, {})
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        event, data, event_id = "message", [], None
        for line in block.split("\n"):
            if line.startswith(":"):
                read.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
            elif name == "id":
                event_id = value
            elif name == "retry":
                read.retry = int(value)
        if data:
            read.events.append(SseEvent(event, json.loads("\n".join(data)), event_id))
    return read


@dataclass
class ApiRig:
    rig: Rig
    server: ApiServer
    http: aiohttp.ClientSession
    bus: JobBus
    services: Services

    @property
    def url(self) -> str:
        return self.server.url

    @staticmethod
    def auth(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    async def call(
        self,
        method: str,
        path: str,
        key: str | None = None,
        *,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        sent = dict(headers or {})
        if key is not None:
            sent.update(self.auth(key))
        async with self.http.request(method, self.url + path, json=body, headers=sent) as response:
            text = await response.text()
            content = json.loads(text) if text and "json" in response.content_type else text
            return response.status, dict(response.headers), content

    async def new_key(self, tenant: str) -> str:
        status, _, body = await self.call(
            "POST", "/v1/admin/keys", ADMIN_KEY, body={"tenant": tenant, "name": "test"}
        )
        assert status == 201, body
        return str(body["key"])

    async def submit(
        self, key: str, idempotency_key: str | None = None, **fields: Any
    ) -> tuple[int, dict[str, str], Any]:
        body = {"workflow": "demo", "prompt": "a lighthouse at dusk", **fields}
        return await self.call(
            "POST",
            "/v1/jobs",
            key,
            body=body,
            headers={"Idempotency-Key": idempotency_key or str(uuid.uuid4())},
        )

    async def stream(
        self, key: str, job_id: str, *, last_event_id: str | None = None, timeout: float = 30
    ) -> StreamRead:
        headers = self.auth(key)
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        async with (
            asyncio.timeout(timeout),
            self.http.get(f"{self.url}/v1/jobs/{job_id}/events", headers=headers) as response,
        ):
            text = await response.text()
        read = parse_sse(text) if response.status == 200 else StreamRead(response.status, {})
        read.status = response.status
        read.headers = dict(response.headers)
        return read


async def start_api_rig(
    rig: Rig, http: aiohttp.ClientSession, ledger_path: Path, **settings: Any
) -> ApiRig:
    """The API for ``rig``'s frontend, on its own broker connection, until the rig stops."""
    broker = await rig.brokers.connect(rig.topology, "api")
    bus = JobBus(broker)
    db = ApiDatabase(ledger_path)
    await db.open()
    rig.stack.push_async_callback(db.close)
    from api.keys import KeyStore

    front = rig.front
    services = Services(
        admission=front.admission,
        tracker=front.tracker,
        ledger=front.ledger,
        catalog=front.catalog,
        control=front.control,
        workers=front.workers,
        quota_defaults=front.quota_defaults,
        bus=bus,
        db=db,
        keys=KeyStore(db),
        store=rig.store,
    )
    server = await start_api(rig.stack, services, api_settings(**settings))
    return ApiRig(rig, server, http, bus, services)


@asynccontextmanager
async def run_up(tmp_path: Path, **renderer: Any) -> AsyncIterator[str]:
    """``brigade up`` in this process (status page on, port 0); yields its URL."""
    settings = BrigadeSettings(_env_file=None, data_dir=tmp_path / "data", frontend_id="up-test")
    async with embedded_api(
        settings,
        api_settings(status_page=True),
        renderer=renderer_settings(**renderer),
        amqp=AmqpSettings(_env_file=None),
    ) as (_, server):
        yield server.url
