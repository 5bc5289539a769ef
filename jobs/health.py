"""A small HTTP server every long-running service can run beside its work.

``/healthz``: the process answers. ``/readyz``: every check passes within
``CHECK_SECONDS`` (503 naming what failed). ``/metrics``: the collectors the service
gives, in Prometheus' text format.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

log = structlog.get_logger(__name__)

Check = Callable[[], Awaitable[None]]
#: Seconds one readiness check may take before it counts as failed.
CHECK_SECONDS = 5.0


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        checks: Mapping[str, Check],
        collectors: Sequence[Collector] = (),
    ) -> None:
        self._host = host
        self._port = port
        self._checks = dict(checks)
        self._registry = CollectorRegistry()
        for collector in collectors:
            self._registry.register(collector)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        addresses = self._runner.addresses  # the real port when 0 asked for any
        self.port = int(addresses[0][1]) if addresses else self._port
        log.info("health.started", host=self._host, port=self.port)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        results = await asyncio.gather(*(self._run(check) for check in self._checks.values()))
        report = dict(zip(self._checks, results, strict=True))
        ready = all(result == "ok" for result in results)
        return web.json_response(
            {"status": "ok" if ready else "unavailable", "checks": report},
            status=200 if ready else 503,
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, self._registry)
        return web.Response(body=body, content_type="text/plain", charset="utf-8")

    @staticmethod
    async def _run(check: Check) -> str:
        try:
            async with asyncio.timeout(CHECK_SECONDS):
                await check()
        except Exception as exc:  # noqa: BLE001 - any failure makes the service not ready
            return f"error: {exc.__class__.__name__}: {exc}"[:300]
        return "ok"
