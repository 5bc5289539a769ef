"""The composition root: builds services from settings and wires them together.

Two shapes exist. :func:`embedded` is everything in one process (the in-process broker,
a local folder for images, a renderer on the demo backend or the ComfyUI at
``COMFYUI_URL``). :func:`renderer_service` is one production renderer on RabbitMQ and
S3. The bot and the API (their own issues) are frontends built by :func:`frontend`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import structlog

from api.context import Services as ApiServices
from api.database import ApiDatabase
from api.keys import KeyStore
from api.server import ApiServer, bind_api, start_api
from api.settings import ApiSettings
from brigade.settings import BrigadeSettings
from jobs.admission import Admission
from jobs.affinity import AFFINITY_FOLDERS
from jobs.broker import Broker
from jobs.bus import JobBus
from jobs.control import JobControl
from jobs.deadletters import DeadLetterNotifier
from jobs.health import Check, HealthServer
from jobs.ledger import Ledger
from jobs.memory import MemoryBroker, MemoryHub
from jobs.models import Event
from jobs.quotas import QuotaDefaults, QuotaSettings
from jobs.rabbitmq import RabbitBroker
from jobs.registry import WorkerRegistry
from jobs.settings import AmqpSettings, FairSettings, LedgerSettings
from jobs.tracker import JobTracker
from renderer.backends import load_backend
from renderer.backends.base import Backend
from renderer.exceptions import BackendUnavailable
from renderer.gpus import per_gpu
from renderer.health import WorkersCollector
from renderer.settings import ComfyUISettings, RendererSettings, choose_backend
from renderer.worker import Renderer, Worker
from storage import (
    InputImageSettings,
    LocalStore,
    LocalStoreSettings,
    ObjectStore,
    S3Settings,
    S3Store,
)
from workflows import Catalog

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Frontend:
    """What a frontend (the CLI, the bot, the API) uses: admit jobs, follow them."""

    admission: Admission
    tracker: JobTracker
    ledger: Ledger
    catalog: Catalog
    control: JobControl
    workers: WorkerRegistry
    #: Limits of tenants without their own (``QUOTA_*``).
    quota_defaults: QuotaSettings


@dataclass(frozen=True, slots=True)
class Embedded:
    frontend: Frontend
    worker: Worker
    store: ObjectStore
    backend: Backend


async def _connected(stack: AsyncExitStack, broker: Broker) -> JobBus:
    await broker.connect()
    stack.push_async_callback(broker.close)
    return JobBus(broker)


async def frontend(
    stack: AsyncExitStack,
    bus: JobBus,
    catalog: Catalog,
    ledger_path: Path,
    frontend_id: str,
    *,
    backends: list[str] | None = None,
) -> Frontend:
    """Open the ledger, follow this frontend's events, dead letters and the fleet's
    heartbeats, publish anything a crash left unpublished. Everything stops when
    ``stack`` closes."""
    # With model affinity each model's queue has its own window (jobs/ledger.py).
    ledger = Ledger(ledger_path, per_model=bus.topology.affinity)
    await ledger.open()
    stack.push_async_callback(ledger.close)
    tracker = JobTracker(bus, ledger, frontend_id)
    await tracker.start()
    stack.push_async_callback(tracker.stop)
    notifier = DeadLetterNotifier(bus)
    await notifier.start()
    stack.push_async_callback(notifier.stop)
    workers = WorkerRegistry(bus, frontend_id)
    await workers.start()
    stack.push_async_callback(workers.stop)
    quota_defaults = QuotaDefaults().settings()

    # Model affinity (jobs/bus.py): the files some renderer of a lane can load.
    bus.models = lambda lane: workers.loadable(lane, AFFINITY_FOLDERS)
    admission = Admission(
        catalog,
        ledger,
        bus,
        backends=backends,
        quota_defaults=quota_defaults,
        fair=FairSettings(),
        workers=workers.serving,
    )
    recovered = await admission.recover()
    if recovered:
        log.info("admission.recovered", jobs=recovered)
    await admission.start()
    stack.push_async_callback(admission.stop)

    async def wake(event: Event) -> None:
        if event.persistent:  # a job started or ended: its lane has room again
            admission.wake()

    tracker.add_listener(wake)
    control = JobControl(bus, ledger, tracker)
    return Frontend(admission, tracker, ledger, catalog, control, workers, quota_defaults)


async def start_backend(
    stack: AsyncExitStack, renderer: RendererSettings, *, fall_back: bool = False
) -> Backend:
    """Start the configured backend. With ``fall_back`` (the embedded mode) and
    ``RENDERER_BACKEND=auto``, a ComfyUI that does not answer means the demo backend."""
    name = choose_backend(renderer, ComfyUISettings())
    backend = load_backend(name, renderer)
    try:
        await backend.start()
    except BackendUnavailable as exc:
        if not (fall_back and renderer.backend == "auto" and name != "demo"):
            raise
        log.warning("backend.fallback", wanted=name, using="demo", error=exc.user_message)
        backend = load_backend("demo", renderer)
        await backend.start()
    stack.push_async_callback(backend.close)
    return backend


async def start_worker(
    stack: AsyncExitStack,
    bus: JobBus,
    backend: Backend,
    store: ObjectStore,
    catalog: Catalog,
    settings: RendererSettings,
) -> Worker:
    worker = Worker(bus, Renderer(backend, store, catalog, settings), settings)
    await worker.start()
    stack.push_async_callback(worker.stop)
    return worker


@asynccontextmanager
async def embedded(
    settings: BrigadeSettings,
    *,
    renderer: RendererSettings | None = None,
    amqp: AmqpSettings | None = None,
    images_dir: Path | None = None,
) -> AsyncIterator[Embedded]:
    """Everything in this process. Nothing queued here outlives it."""
    async with AsyncExitStack() as stack:
        store = LocalStore(images_dir or LocalStoreSettings(data_dir=settings.data_dir).root)
        parts, _, _ = await _in_process(stack, settings, renderer, amqp, store)
        yield parts


async def _in_process(
    stack: AsyncExitStack,
    settings: BrigadeSettings,
    renderer: RendererSettings | None,
    amqp: AmqpSettings | None,
    store: LocalStore,
) -> tuple[Embedded, JobBus, Path]:
    """The in-process broker, ``store`` (started here), a renderer on ComfyUI at
    ``COMFYUI_URL`` when it answers (else the demo backend), and a frontend; with the
    frontend's bus and the ledger's file (the API's services need both)."""
    renderer = renderer or RendererSettings()
    topology = (amqp or AmqpSettings()).topology()
    renderer = renderer.model_copy(update={"lanes": list(topology.lanes)})
    hub = MemoryHub()
    front_bus = await _connected(stack, MemoryBroker(hub, topology))
    await front_bus.broker.declare()
    render_bus = await _connected(stack, MemoryBroker(hub, topology))
    catalog = Catalog.load(settings.workflows_dirs)
    await store.start()
    stack.push_async_callback(store.close)
    backend = await start_backend(stack, renderer, fall_back=True)
    ledger_path = LedgerSettings(data_dir=settings.data_dir).ledger_path
    front = await frontend(
        stack, front_bus, catalog, ledger_path, settings.frontend_id, backends=[backend.name]
    )
    worker = await start_worker(stack, render_bus, backend, store, catalog, renderer)
    return Embedded(front, worker, store, backend), front_bus, ledger_path


def production_store(s3: S3Settings, local: LocalStoreSettings) -> ObjectStore:
    """S3 when an endpoint or credentials are configured, else the local folder."""
    if s3.endpoint_url or s3.access_key_id:
        return S3Store(s3)
    log.warning(
        "storage.local",
        root=str(local.root),
        hint="set S3_ENDPOINT_URL and credentials to share images between hosts",
    )
    return LocalStore(local.root, public_base_url=local.public_base_url)


async def renderer_service(stop: asyncio.Event, gpus: list[str] | None = None) -> None:
    """Production renderers on RabbitMQ and the store until ``stop`` is set: one, or with
    ``gpus`` one per GPU, each with its own supervised ComfyUI (see ``renderer.gpus``)."""
    amqp = AmqpSettings()
    if amqp.url is None:
        raise SystemExit("brigade renderer needs AMQP_URL (amqp://user:password@host:5672/)")
    url = amqp.url.get_secret_value()
    settings = BrigadeSettings()
    renderer = RendererSettings()
    topology = amqp.topology()
    async with AsyncExitStack() as stack:
        store = production_store(S3Settings(), LocalStoreSettings())
        await store.start()
        stack.push_async_callback(store.close)
        catalog = Catalog.load(settings.workflows_dirs)

        async def one(config: RendererSettings, backend: Backend) -> Worker:
            broker = RabbitBroker(
                url,
                topology,
                name=f"renderer:{config.worker_id}",
                timeout=amqp.timeout_seconds,
            )
            bus = await _connected(stack, broker)
            await broker.declare()
            worker = Worker(bus, Renderer(backend, store, catalog, config), config)
            await worker.start()
            return worker

        if gpus is None:
            backend = await start_backend(stack, renderer)
            workers = [await one(renderer, backend)]
        else:
            configured = per_gpu(renderer, ComfyUISettings(), gpus)
            backends = [comfyui_backend(config, comfy) for config, comfy in configured]
            for backend in backends:
                stack.push_async_callback(backend.close)
            # Each ComfyUI takes seconds to start: start them side by side.
            await asyncio.gather(*(backend.start() for backend in backends))
            workers = [
                await one(config, backend)
                for (config, _), backend in zip(configured, backends, strict=True)
            ]
        # Drain side by side too: a stop waits for the slowest job, not for their sum.
        stack.push_async_callback(lambda: _stop_all(workers))
        if renderer.health_port is not None:
            await start_health(stack, renderer, workers, store, backends_of(workers))
        await stop.wait()
        log.info("worker.stopping", drain_seconds=renderer.drain_seconds, workers=len(workers))


def backends_of(workers: list[Worker]) -> list[Backend]:
    return list({id(w.backend): w.backend for w in workers}.values())


async def start_health(
    stack: AsyncExitStack,
    renderer: RendererSettings,
    workers: list[Worker],
    store: ObjectStore,
    backends: list[Backend],
) -> HealthServer:
    """The renderer's /healthz, /readyz and /metrics (``RENDERER_HEALTH_PORT``)."""
    checks: dict[str, Check] = {"store": store.check}
    for worker in workers:
        checks[f"broker:{worker.worker_id}"] = worker.check_broker
    for backend in backends:
        checks[f"backend:{backend.name}:{id(backend):x}"] = _backend_check(backend)
    server = HealthServer(
        renderer.health_host, renderer.health_port or 0, checks, [WorkersCollector(workers)]
    )
    await server.start()
    stack.push_async_callback(server.stop)
    return server


def _backend_check(backend: Backend) -> Check:
    async def check() -> None:
        if backend.describe().get("healthy", True) is False:
            raise BackendUnavailable(f"the {backend.name} backend is not healthy")

    return check


async def _stop_all(workers: list[Worker]) -> None:
    await asyncio.gather(*(worker.stop() for worker in workers))


def comfyui_backend(renderer: RendererSettings, comfyui: ComfyUISettings) -> Backend:
    """A ComfyUI backend for one GPU, supervising its ComfyUI."""
    from renderer.comfyui.backend import ComfyUIBackend
    from renderer.comfyui.supervisor import ComfyUISupervisor

    config = comfyui.supervisor_config()
    supervisor = ComfyUISupervisor(config) if config is not None else None
    return ComfyUIBackend(renderer, comfyui, supervisor)


# -- the HTTP API (api/) ---------------------------------------------------------------


async def api_services(
    stack: AsyncExitStack,
    front: Frontend,
    bus: JobBus,
    ledger_path: Path,
    store: ObjectStore | None,
) -> ApiServices:
    """What the API needs: the frontend's parts, the bus, the store, and its own tables
    (API keys) in the ledger's file."""
    db = ApiDatabase(ledger_path)
    await db.open()
    stack.push_async_callback(db.close)
    return ApiServices(
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
        store=store,
        input_limits=InputImageSettings(),
    )


async def api_service(stop: asyncio.Event, api: ApiSettings | None = None) -> None:
    """The API as its own process (``brigade api``): RabbitMQ, the ledger, the store, the
    frontend id ``BRIGADE_FRONTEND_ID``, until ``stop`` is set."""
    amqp = AmqpSettings()
    if amqp.url is None:
        raise SystemExit("brigade api needs AMQP_URL (amqp://user:password@host:5672/)")
    settings = BrigadeSettings()
    api = api or ApiSettings()
    async with AsyncExitStack() as stack:
        server = bind_api(stack, api)
        broker = RabbitBroker(
            amqp.url.get_secret_value(),
            amqp.topology(),
            name=f"api:{settings.frontend_id}",
            timeout=amqp.timeout_seconds,
        )
        bus = await _connected(stack, broker)
        await broker.declare()
        store = production_store(S3Settings(), LocalStoreSettings())
        await store.start()
        stack.push_async_callback(store.close)
        catalog = Catalog.load(settings.workflows_dirs)
        ledger_path = LedgerSettings(data_dir=settings.data_dir).ledger_path
        front = await frontend(stack, bus, catalog, ledger_path, settings.frontend_id)
        services = await api_services(stack, front, bus, ledger_path, store)
        await start_api(stack, services, api, server)
        await stop.wait()
        log.info("api.stopping")


@asynccontextmanager
async def embedded_api(
    settings: BrigadeSettings,
    api: ApiSettings,
    *,
    renderer: RendererSettings | None = None,
    amqp: AmqpSettings | None = None,
) -> AsyncIterator[tuple[Embedded, ApiServer]]:
    """Everything in this process with the API in front (``brigade up``): the in-process
    broker, a renderer (ComfyUI at ``COMFYUI_URL`` when it answers, else the demo
    backend), images in ``BRIGADE_DATA_DIR/images`` served by the API at ``/images/``."""
    local = LocalStoreSettings(data_dir=settings.data_dir)
    async with AsyncExitStack() as stack:
        server = bind_api(stack, api)  # first: a taken port fails before anything starts
        base_url = local.public_base_url or f"{server.url}/images"
        store = LocalStore(local.root, public_base_url=base_url)
        parts, bus, ledger_path = await _in_process(stack, settings, renderer, amqp, store)
        services = await api_services(stack, parts.frontend, bus, ledger_path, store)
        await start_api(stack, services, api, server)
        yield parts, server


async def up_service(stop: asyncio.Event, api: ApiSettings) -> None:
    """``brigade up``: :func:`embedded_api`, and the Discord bot when ``DISCORD_TOKEN`` is
    set, until ``stop`` is set."""
    from bot.settings import DiscordSettings  # no discord import until a bot runs

    settings = BrigadeSettings()
    discord_settings = DiscordSettings()
    async with embedded_api(settings, api) as (app, server), AsyncExitStack() as extras:
        if discord_settings.token is not None:
            from bot.service import embedded_bot

            await extras.enter_async_context(embedded_bot(app, settings, discord_settings))
        log.info(
            "up.ready",
            url=server.url,
            status_page=api.status_page,
            bot=discord_settings.token is not None,
        )
        await stop.wait()
