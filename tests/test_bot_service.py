"""The bot's entry points: ``run_bot`` (``brigade bot``: RabbitMQ, the ledger, the store,
all from the environment) and ``embedded_bot`` (inside ``brigade up``)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiohttp
import pytest
from pydantic import SecretStr

from bot.service import embedded_bot, run_bot
from bot.settings import DiscordSettings
from brigade.app import embedded
from brigade.settings import BrigadeSettings
from jobs.settings import AmqpSettings
from tests.emulators.discord import DiscordEmulator
from tests.fixtures.pipeline import renderer_settings
from tests.fixtures.rabbitmq import delete_topology


def test_settings_read_lists_and_hide_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", "very-secret")
    monkeypatch.setenv("DISCORD_OWNER_IDS", "1, 2")
    monkeypatch.setenv("DISCORD_DEV_GUILDS", "3")
    settings = DiscordSettings(_env_file=None)
    assert settings.owner_ids == [1, 2] and settings.dev_guilds == [3]
    assert settings.edit_interval_seconds == 1.5
    assert settings.api_base_url == "https://discord.com/api/v10"
    assert "very-secret" not in repr(settings) and "very-secret" not in str(settings.model_dump())


@pytest.mark.rabbitmq
async def test_run_bot_on_rabbitmq(
    discord_emulator: DiscordEmulator,
    amqp_url: str,
    test_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    guild = discord_emulator.add_guild()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        health_port = int(probe.getsockname()[1])
    for name, value in {
        "DISCORD_TOKEN": discord_emulator.token,
        "DISCORD_API_BASE_URL": discord_emulator.api_base,
        "DISCORD_GATEWAY_URL": discord_emulator.gateway_url,
        "DISCORD_DEV_GUILDS": str(guild.id),
        "DISCORD_GUILD_READY_TIMEOUT": "0.05",
        "AMQP_URL": amqp_url,
        "AMQP_PREFIX": test_prefix,
        "BRIGADE_DATA_DIR": str(tmp_path),
        "BRIGADE_FRONTEND_ID": "bot-service-test",
        "S3_ENDPOINT_URL": "",
        "S3_ACCESS_KEY_ID": "",
        "DISCORD_HEALTH_PORT": str(health_port),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # no .env of the checkout
    stop = asyncio.Event()
    service = asyncio.create_task(run_bot(stop))
    try:
        await discord_emulator.wait_until(
            lambda: guild.id in discord_emulator.commands or service.done(), 10.0, "the sync"
        )
        assert not service.done()
        await discord_emulator.wait_for_session()
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{health_port}/healthz") as response:
                assert response.status == 200
            async with asyncio.timeout(10):
                while True:  # ready once discord.py has its guilds
                    async with http.get(f"http://127.0.0.1:{health_port}/readyz") as response:
                        ready = await response.json()
                    if response.status == 200:
                        break
                    await asyncio.sleep(0.05)
        assert ready["checks"] == {"discord": "ok", "broker": "ok", "ledger": "ok"}
    finally:
        stop.set()
        await asyncio.wait_for(service, 10)
        topology = AmqpSettings(_env_file=None, prefix=test_prefix).topology()
        await delete_topology(amqp_url, topology, [f"{test_prefix}.events.bot-service-test"])

    names = {c["name"] for c in discord_emulator.commands[guild.id].values()}
    assert names == {"imagine", "usage", "quota", "queue", "workers", "workflow"}
    assert (tmp_path / "ledger.sqlite3").exists()


async def test_run_bot_needs_a_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DISCORD_TOKEN", raising=False)
    with pytest.raises(SystemExit, match="DISCORD_TOKEN"):
        await run_bot(asyncio.Event())


async def test_the_bot_inside_the_embedded_app(
    discord_emulator: DiscordEmulator, tmp_path: Path
) -> None:
    guild = discord_emulator.add_guild()
    user = discord_emulator.add_user(guild=guild)
    settings = BrigadeSettings(_env_file=None, data_dir=tmp_path, frontend_id="up-test")
    discord_settings = DiscordSettings(
        _env_file=None,
        token=SecretStr(discord_emulator.token),
        api_base_url=discord_emulator.api_base,
        gateway_url=discord_emulator.gateway_url,
        dev_guilds=[guild.id],
        guild_ready_timeout=0.05,
        edit_interval_seconds=0.2,
    )
    renderer = renderer_settings(demo_step_seconds=0.01)
    async with (
        embedded(settings, renderer=renderer) as app,
        embedded_bot(app, settings, discord_settings) as running,
    ):
        await discord_emulator.wait_until(running.bot.is_ready, what="the bot")
        interaction = await discord_emulator.send_slash_command(
            guild.id, guild.text_channel.id, user.id, "imagine", {"prompt": "a harbour"}
        )
        await interaction.wait_response()
        message = interaction.original
        assert message is not None
        await discord_emulator.wait_until(lambda: "✅ Done" in message.content, 8.0)

    assert message.attachment("result.png").image().size == (512, 512)
