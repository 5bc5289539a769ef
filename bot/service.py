"""Entry points: the bot as its own process (``brigade bot``: RabbitMQ, the ledger, the
store) and the bot inside an embedded app (``brigade up`` with ``DISCORD_TOKEN`` set).

The bot is one frontend: its events come to ``<prefix>.events.<BRIGADE_FRONTEND_ID>``,
so a bot and an API in separate processes need different ``BRIGADE_FRONTEND_ID``s.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import discord
import structlog

from bot.client import BrigadeBot, point_discord_py
from bot.settings import DiscordSettings
from brigade.app import Embedded, Frontend, frontend, production_store
from brigade.settings import BrigadeSettings
from jobs.broker import Broker
from jobs.bus import JobBus
from jobs.health import Check, HealthServer
from jobs.rabbitmq import RabbitBroker
from jobs.settings import AmqpSettings, LedgerSettings
from storage import InputImageSettings, LocalStoreSettings, ObjectStore, S3Settings
from workflows import Catalog

log = structlog.get_logger(__name__)


def _token(settings: DiscordSettings) -> str:
    if settings.token is None:
        raise SystemExit("the Discord bot needs DISCORD_TOKEN (Developer Portal → Bot → Token)")
    return settings.token.get_secret_value()


@dataclass(frozen=True, slots=True)
class RunningBot:
    bot: BrigadeBot
    #: ``bot.start(token)``: it ends when the bot closes, or raises (a bad token).
    task: asyncio.Task[None]


@contextlib.asynccontextmanager
async def started(
    front: Frontend,
    settings: DiscordSettings,
    ledger_path: Path,
    store: ObjectStore | None,
) -> AsyncIterator[RunningBot]:
    """The bot logging in and connecting inside the block; closed, its task awaited, on
    the way out. A bot that failed (a bad token) raises its error on the way out."""
    token = _token(settings)
    point_discord_py(settings)
    bot = BrigadeBot(front, settings, ledger_path, store=store, input_limits=InputImageSettings())
    task = asyncio.create_task(bot.start(token), name="discord-bot")
    try:
        yield RunningBot(bot, task)
    finally:
        await bot.close()
        await task


async def run_bot(stop: asyncio.Event) -> None:
    """``brigade bot``: the bot over RabbitMQ (``AMQP_URL``), the ledger in
    ``BRIGADE_DATA_DIR`` and the store (S3 when configured), until ``stop`` is set or
    the bot stops by itself (a bad token raises)."""
    discord_settings = DiscordSettings()
    _token(discord_settings)
    amqp = AmqpSettings()
    if amqp.url is None:
        raise SystemExit("brigade bot needs AMQP_URL (amqp://user:password@host:5672/)")
    settings = BrigadeSettings()
    async with AsyncExitStack() as stack:
        broker = RabbitBroker(
            amqp.url.get_secret_value(),
            amqp.topology(),
            name=f"bot:{settings.frontend_id}",
            timeout=amqp.timeout_seconds,
        )
        await broker.connect()
        stack.push_async_callback(broker.close)
        await broker.declare()
        store = production_store(S3Settings(), LocalStoreSettings())
        await store.start()
        stack.push_async_callback(store.close)
        catalog = Catalog.load(settings.workflows_dirs)
        ledger_path = LedgerSettings(data_dir=settings.data_dir).ledger_path
        front = await frontend(stack, JobBus(broker), catalog, ledger_path, settings.frontend_id)
        try:
            async with started(front, discord_settings, ledger_path, store) as running:
                if discord_settings.health_port is not None:
                    health = HealthServer(
                        discord_settings.health_host,
                        discord_settings.health_port,
                        readiness(running, broker, front),
                    )
                    await health.start()
                    stack.push_async_callback(health.stop)
                await serve_until(stop, running)
        except discord.LoginFailure as exc:
            raise SystemExit(f"Discord refused DISCORD_TOKEN: {exc}") from exc
        log.info("bot.stopped")


@contextlib.asynccontextmanager
async def embedded_bot(
    app: Embedded, settings: BrigadeSettings, discord_settings: DiscordSettings | None = None
) -> AsyncIterator[RunningBot]:
    """The bot inside an embedded app (``brigade up``): its frontend, ledger and store.
    Use only when ``DISCORD_TOKEN`` is set (``DiscordSettings().token``)."""
    discord_settings = discord_settings or DiscordSettings()
    ledger_path = LedgerSettings(data_dir=settings.data_dir).ledger_path
    async with started(app.frontend, discord_settings, ledger_path, app.store) as running:
        yield running


def readiness(running: RunningBot, broker: Broker, front: Frontend) -> dict[str, Check]:
    """What ``/readyz`` checks for the bot: the gateway, the broker, the ledger."""

    async def gateway() -> None:
        if running.bot.is_closed() or not running.bot.is_ready():
            raise ConnectionError("not connected to the Discord gateway")

    async def queue() -> None:
        await broker.depth(broker.topology.lane_queue(broker.topology.lanes[0]))

    async def ledger() -> None:
        await front.ledger.get("readyz")

    return {"discord": gateway, "broker": queue, "ledger": ledger}


async def serve_until(stop: asyncio.Event, running: RunningBot) -> None:
    """Until ``stop`` is set or the bot stops by itself (its error, a refused token say,
    is raised when ``started`` exits)."""
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({stopping, running.task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        await asyncio.gather(stopping, return_exceptions=True)
