"""The renderer's own HTTP endpoints, for orchestrators and Prometheus.

``/healthz``: the process answers. ``/readyz``: the broker, the store and every backend
answer (503 naming what does not). ``/metrics``: each worker's jobs, previews, state,
GPU memory and ComfyUI restarts, in Prometheus' text format. Off unless
``RENDERER_HEALTH_PORT`` is set.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from renderer.worker import Worker

log = structlog.get_logger(__name__)

Check = Callable[[], Awaitable[None]]
#: Seconds one readiness check may take before it counts as failed.
CHECK_SECONDS = 5.0


class _WorkersCollector(Collector):
    def __init__(self, workers: Sequence[Worker]) -> None:
        self._workers = workers

    def collect(self) -> Iterator[Metric]:
        labels = ["worker"]
        jobs = CounterMetricFamily(
            "brigade_renderer_jobs", "Jobs this worker finished", labels=[*labels, "outcome"]
        )
        previews = CounterMetricFamily(
            "brigade_renderer_previews", "Previews, sent or dropped", labels=[*labels, "fate"]
        )
        state = GaugeMetricFamily(
            "brigade_renderer_state", "1 for the worker's current state", labels=[*labels, "state"]
        )
        vram = GaugeMetricFamily(
            "brigade_renderer_vram_free_bytes", "Free GPU memory", labels=labels
        )
        restarts = CounterMetricFamily(
            "brigade_renderer_comfyui_restarts", "ComfyUI restarts by the supervisor", labels=labels
        )
        for worker in self._workers:
            beat = worker.heartbeat()
            name = [worker.worker_id]
            jobs.add_metric([*name, "succeeded"], worker.completed)
            jobs.add_metric([*name, "failed"], worker.failed)
            previews.add_metric([*name, "sent"], worker.previews_sent)
            previews.add_metric([*name, "dropped"], worker.previews_dropped)
            state.add_metric([*name, beat.state.value], 1.0)
            if beat.vram_free is not None:
                vram.add_metric(name, float(beat.vram_free))
            restarts.add_metric(name, float(beat.restarts))
        yield from (jobs, previews, state, vram, restarts)


class HealthServer:
    def __init__(
        self, host: str, port: int, checks: Mapping[str, Check], workers: Sequence[Worker]
    ) -> None:
        self._host = host
        self._port = port
        self._checks = dict(checks)
        self._registry = CollectorRegistry()
        self._registry.register(_WorkersCollector(workers))
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
