"""Secrets never appear in logs (issue 7).

The secrets ``.env.example`` names (``DISCORD_TOKEN``, ``S3_SECRET_ACCESS_KEY``, the
password in ``AMQP_URL``, ``API_ADMIN_KEY``) and the API keys the API hands out are
configured, the real services run a job and their failure paths (bad S3 credentials,
AMQP refused and a wrong AMQP password, a Discord token refused at login), and every
line they log is searched for each secret, raw and URL-encoded: a ``brigade renderer``
process's whole output (structlog JSON and stdlib logging, tracebacks included), and
in this process everything written to stdout and stderr (structlog) plus every stdlib
log record, formatted, with its traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import traceback
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus, urlsplit, urlunsplit

import aiohttp
import discord
import pytest

from bot.client import BrigadeBot
from jobs.models import Succeeded, utcnow
from storage.settings import S3Settings
from tests.api_rig import ADMIN_KEY, run_up
from tests.emulators.discord import DiscordEmulator
from tests.fixtures.bot import bot_world
from tests.fixtures.discord import running
from tests.fixtures.pipeline import Rig, start_renderer_process, stop_process
from tests.fixtures.tcpproxy import TcpProxy, through

#: Distinctive secrets, with characters that URL encoding changes.
AMQP_PASSWORD = "amqp-Pa55/w0rd@secret"
S3_SECRET = "s3-Secret+Key/0123456789abcdefXYZ"
DISCORD_TOKEN = "discord.Token-secret-0123456789"
API_ADMIN_KEY = "api-admin-Key-secret-0123456789"


def forms(secret: str) -> set[str]:
    """``secret`` as it could be written: raw, URL-encoded, JSON-escaped."""
    return {secret, quote(secret, safe=""), quote_plus(secret), json.dumps(secret)[1:-1]}


def assert_no_secret(text: str, secrets: Iterable[str], where: str) -> None:
    assert text.strip(), f"{where}: nothing was logged, so nothing was checked"
    for secret in secrets:
        for form in forms(secret):
            assert form not in text, f"{where} shows a secret ({form[:4]}…)"


def with_password(url: str, password: str) -> str:
    """``url`` (amqp://user:pass@host:port/vhost) with ``password``, URL-encoded."""
    parts = urlsplit(url)
    user = parts.username or "guest"
    netloc = f"{user}:{quote(password, safe='')}@{parts.hostname}:{parts.port or 5672}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class Records(logging.Handler):
    """Every stdlib log record of this process, formatted, tracebacks included."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += "\n" + "".join(traceback.format_exception(record.exc_info[1]))
        self.lines.append(f"{record.name} {record.levelname} {text} {record.__dict__!r}")

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def records() -> Any:
    handler = Records()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(level)


def _renderer(env: dict[str, str], cwd: Path, timeout: float = 45) -> str:
    """``brigade renderer`` with ``env`` until it gives up (or ``timeout``); its output."""
    process = subprocess.run(
        [sys.executable, "-m", "brigade.cli", "renderer"],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    output = (process.stdout + process.stderr).decode("utf-8", "replace")
    (cwd / "renderer.log").write_text(output)  # for whoever reads a failure
    assert process.returncode != 0, "the renderer started with a broken configuration"
    return output


def _base_env(tmp_path: Path) -> dict[str, str]:
    return {
        "BRIGADE_DATA_DIR": str(tmp_path),
        "BRIGADE_LOG_FORMAT": "json",
        "BRIGADE_LOG_LEVEL": "debug",
        "RENDERER_DEVICE": "cpu",
        "DISCORD_TOKEN": DISCORD_TOKEN,
        "API_ADMIN_KEY": API_ADMIN_KEY,
    }


@pytest.mark.rabbitmq
async def test_a_refused_amqp_connection_logs_no_password(tmp_path: Path) -> None:
    env = {
        **_base_env(tmp_path),
        "AMQP_URL": with_password("amqp://brigade@127.0.0.1:1/", AMQP_PASSWORD),
    }
    output = await asyncio.to_thread(_renderer, env, tmp_path)
    assert "RabbitMQ" in output
    assert_no_secret(output, [AMQP_PASSWORD, DISCORD_TOKEN, API_ADMIN_KEY], "brigade renderer")


@pytest.mark.rabbitmq
async def test_a_wrong_amqp_password_is_not_logged(tmp_path: Path, amqp_url: str) -> None:
    env = {**_base_env(tmp_path), "AMQP_URL": with_password(amqp_url, AMQP_PASSWORD)}
    output = await asyncio.to_thread(_renderer, env, tmp_path)
    assert "ACCESS_REFUSED" in output
    assert_no_secret(output, [AMQP_PASSWORD, DISCORD_TOKEN, API_ADMIN_KEY], "brigade renderer")


@pytest.mark.rabbitmq
@pytest.mark.s3
async def test_bad_s3_credentials_are_not_logged(
    tmp_path: Path, amqp_url: str, s3_settings: S3Settings
) -> None:
    env = {
        **_base_env(tmp_path),
        "AMQP_URL": amqp_url,
        "S3_ENDPOINT_URL": str(s3_settings.endpoint_url),
        "S3_BUCKET": s3_settings.bucket,
        "S3_REGION": s3_settings.region,
        "S3_ACCESS_KEY_ID": "brigade-wrong-id",
        "S3_SECRET_ACCESS_KEY": S3_SECRET,
    }
    output = await asyncio.to_thread(_renderer, env, tmp_path)
    assert "check S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY" in output  # it failed there
    assert_no_secret(output, [S3_SECRET, DISCORD_TOKEN, API_ADMIN_KEY], "brigade renderer")


async def _heard_from(rig: Rig, worker_id: str, *, after: datetime, timeout: float = 30) -> None:
    """Wait for a heartbeat ``worker_id`` sent after ``after``: it publishes again."""
    async with asyncio.timeout(timeout):
        while not any(
            beat.worker_id == worker_id and beat.at > after for beat in rig.front.workers.workers()
        ):
            await asyncio.sleep(0.1)


@pytest.mark.rabbitmq
@pytest.mark.s3
@pytest.mark.parametrize("brokers", ["rabbitmq"], indirect=True)
async def test_jobs_through_a_renderer_process_log_no_secret(
    rig: Rig, amqp_url: str, rabbit_proxy: TcpProxy, s3_settings: S3Settings, tmp_path: Path
) -> None:
    """Two jobs, and between them the connection to RabbitMQ cut (aio-pika logs its
    reconnection attempts); the second job is sent once the renderer publishes again."""
    assert s3_settings.secret_access_key is not None
    s3_secret = s3_settings.secret_access_key.get_secret_value()
    amqp_password = urlsplit(amqp_url).password or ""
    process = start_renderer_process(
        rig,
        through(amqp_url, rabbit_proxy),
        s3_settings,
        tmp_path,
        "secretive",
        RENDERER_DEMO_STEP_SECONDS="0",
        RENDERER_HEARTBEAT_SECONDS="0.5",
        BRIGADE_LOG_LEVEL="debug",
        DISCORD_TOKEN=DISCORD_TOKEN,
        API_ADMIN_KEY=API_ADMIN_KEY,
    )
    try:
        first = await rig.submit("first", steps=2, width=64, height=64)
        done = await rig.front.tracker.wait(first, timeout=40)
        rabbit_proxy.cut()
        await _heard_from(rig, "secretive", after=utcnow())
        second = await rig.submit("second", steps=2, width=64, height=64)
        again = await rig.front.tracker.wait(second, timeout=40)
    finally:
        stop_process(process)
    assert isinstance(done, Succeeded) and isinstance(again, Succeeded)
    output = (tmp_path / "secretive.log").read_text("utf-8", "replace")
    assert first in output and second in output
    assert_no_secret(output, [s3_secret, DISCORD_TOKEN, API_ADMIN_KEY], "brigade renderer")
    # The broker's password is "guest" here, the user's name too: the URL's user
    # information must not show, in any form.
    urls = [amqp_url, through(amqp_url, rabbit_proxy)]
    assert_no_secret(output, [f"guest:{amqp_password}@", *urls], "brigade renderer")


async def test_the_bot_and_its_pipeline_log_no_token(
    discord_emulator: DiscordEmulator,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    records: Records,
) -> None:
    token = discord_emulator.token
    async with bot_world(discord_emulator, tmp_path) as world:
        async with world.running():
            interaction = await world.imagine("a lighthouse", seed=3)
            message = interaction.original
            assert message is not None
            await world.final(message)
        # Discord answers 401 to a token it does not know, at login.
        wrong = BrigadeBot(
            world.app.frontend, world.settings(token=DISCORD_TOKEN), world.ledger_path
        )
        with pytest.raises(discord.LoginFailure):
            async with running(wrong, DISCORD_TOKEN):
                pass
    out, err = capfd.readouterr()
    assert "✅ Done" in message.content
    for where, text in (("stdout", out), ("stderr", err), ("logging", records.text)):
        if text.strip():
            assert_no_secret(text, [token, DISCORD_TOKEN], where)
    assert_no_secret(out + err + records.text, [token, DISCORD_TOKEN], "this process")
    assert "job.succeeded" in out + err + records.text


async def test_the_api_logs_no_key(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], records: Records
) -> None:
    async with run_up(tmp_path, demo_step_seconds=0.0) as url, aiohttp.ClientSession() as http:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with http.post(
            f"{url}/v1/admin/keys", json={"tenant": "acme"}, headers=admin
        ) as response:
            assert response.status == 201
            key = (await response.json())["key"]
        tenant = {"Authorization": f"Bearer {key}"}
        async with http.post(
            f"{url}/v1/jobs",
            json={"workflow": "demo", "prompt": "a lighthouse", "steps": 2},
            headers={**tenant, "Idempotency-Key": "secret-test"},
        ) as response:
            assert response.status == 202
            job_id = (await response.json())["job_id"]
        async with http.get(f"{url}/v1/jobs/{job_id}/events", headers=tenant) as response:
            assert "succeeded" in await response.text()
        # Refusals: a tenant key on an admin route, the admin key on a tenant route.
        for path, headers in (("/v1/admin/keys", tenant), ("/v1/jobs", admin)):
            async with http.get(url + path, headers=headers) as response:
                assert response.status == 403
    out, err = capfd.readouterr()
    everything = out + err + records.text
    assert job_id in everything
    assert_no_secret(everything, [ADMIN_KEY, key], "the API's process")
