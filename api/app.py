"""The HTTP API of Brigade: an aiohttp application over a frontend's services.

:func:`create_app` builds it from :class:`~api.context.Services` (what the composition
root, ``brigade.app``, wires: admission, tracker, ledger, control, registry, bus, store,
keys) and :class:`~api.settings.ApiSettings`; :class:`api.server.ApiServer` serves it.

Routes: the tenant routes (``api.jobs``), the admin routes (``api.admin``), and here the
operational ones: ``/healthz`` (the process answers), ``/readyz`` (the broker, the
ledger and the store answer, else 503), ``/metrics`` (Prometheus), ``/openapi.json``,
``/images/{key}`` (the local store, embedded mode only) and the status page at ``/``
(``api.page``, only with ``API_STATUS_PAGE``).

Every error leaves as RFC 9457 problem details, through one middleware.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from api import admin, inputs, jobs, page
from api.auth import is_loopback
from api.context import STATE, STREAM_END, ApiState, Services, state
from api.http import json_response
from api.metrics import Metrics
from api.models import Health
from api.openapi import document
from api.problems import ApiProblem, not_found
from api.settings import ApiSettings
from storage import InvalidKey, ObjectNotFound, StorageError
from storage.keys import check_key

log = structlog.get_logger(__name__)

#: The tenant of the status page's own key (loopback only; see ``api.page``).
LOCAL_TENANT = "local"
#: Seconds each readiness probe may take.
PROBE_SECONDS = 3.0
OPENAPI = web.AppKey("brigade_openapi", dict[str, Any])


def create_app(services: Services, settings: ApiSettings) -> web.Application:
    metrics = Metrics()
    api = ApiState(services, settings, metrics)
    if settings.status_page and is_loopback(settings.host):
        api.local_key = services.keys.ephemeral(LOCAL_TENANT)
    services.tracker.add_listener(metrics.on_event)
    app = web.Application(middlewares=[_problems], client_max_size=settings.max_body_bytes)
    app[STATE] = api
    app.add_routes(jobs.routes)
    app.add_routes(inputs.routes)
    app.add_routes(admin.routes)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_route)
    app.router.add_get("/openapi.json", openapi)
    images = services.local_store is not None
    if images:
        app.router.add_get("/images/{key:.+}", image)
    if settings.status_page:
        app.router.add_get("/", page.status_page)
    app[OPENAPI] = document(images=images, status_page=settings.status_page)
    app.on_shutdown.append(_end_streams)
    return app


async def _end_streams(app: web.Application) -> None:
    """The server stops: every open event stream ends now, not at its job's end."""
    for queue in list(app[STATE].streams):
        queue.put_nowait(STREAM_END)


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def _problems(request: web.Request, handler: Any) -> web.StreamResponse:
    """Problem details for every error; count every answer."""
    try:
        response: web.StreamResponse = await handler(request)
    except ApiProblem as problem:
        response = problem.response(request.path)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {name: exc.headers[name] for name in ("Allow",) if name in exc.headers}
        response = ApiProblem(exc.status, None, exc.reason, headers=headers).response(request.path)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("api.internal_error", method=request.method, path=request.path)
        response = ApiProblem(
            500, "internal", "Internal error", "Something went wrong on our side."
        ).response(request.path)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    state(request).metrics.requests.labels(
        request.method, _route(request), str(response.status)
    ).inc()
    return response


async def healthz(request: web.Request) -> web.Response:
    return json_response(Health(status="ok"))


async def readyz(request: web.Request) -> web.Response:
    services = state(request).services
    checks: dict[str, str] = {}

    async def probe(name: str, check: Any) -> None:
        try:
            async with asyncio.timeout(PROBE_SECONDS):
                await check()
        except Exception as exc:  # noqa: BLE001 - a probe: any failure means not ready
            checks[name] = f"{type(exc).__name__}: {exc}"[:300] or type(exc).__name__
        else:
            checks[name] = "ok"

    bus = services.bus

    async def broker() -> None:
        await bus.broker.depth(bus.topology.lane_queue(bus.topology.lanes[0]))

    async def ledger() -> None:
        await services.ledger.get("readyz")
        await services.db.ping()

    await probe("broker", broker)
    await probe("ledger", ledger)
    if services.store is not None:
        await probe("store", services.store.check)
    ready = all(result == "ok" for result in checks.values())
    return json_response(
        Health(status="ok" if ready else "unavailable", checks=checks), 200 if ready else 503
    )


async def metrics_route(request: web.Request) -> web.Response:
    api = state(request)
    snapshot = api.metrics.snapshot
    try:
        queue = await jobs.read_queue(api)
    except ApiProblem:
        snapshot.broker_up = False
        snapshot.depth = {}
        snapshot.jobs = await api.services.ledger.counts()
    else:
        snapshot.broker_up = True
        snapshot.depth = {lane.name: lane.depth for lane in queue.lanes}
        snapshot.jobs = {
            (lane.name, status): count
            for lane in queue.lanes
            for status, count in (("queued", lane.queued), ("running", lane.running))
        }
    snapshot.workers = api.services.workers.workers()
    return web.Response(
        body=api.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


async def image(request: web.Request) -> web.Response:
    """An image of the local store. Keys are unguessable (they hold the job's UUID), so,
    like a presigned S3 URL, the URL is the capability: no API key (an ``<img>`` cannot
    send one)."""
    store = state(request).services.local_store
    key = request.match_info["key"]
    if store is None:  # pragma: no cover - the route exists only with a local store
        raise not_found("No local image store here.")
    if not key.endswith(".png") or key.startswith("inputs/"):
        raise not_found(f"No image {key!r}: only output PNG images are served.")
    try:
        check_key("", key)
        body = await store.get(key)
    except (InvalidKey, ObjectNotFound) as exc:
        raise not_found(f"No image {key!r}.") from exc
    except StorageError as exc:
        raise ApiProblem(503, "unavailable", "The image store failed", str(exc)) from exc
    return web.Response(
        body=body,
        content_type="image/png",
        headers={"Cache-Control": "public, max-age=3600"},
    )
