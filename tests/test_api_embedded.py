"""The API in the embedded mode (``brigade up``): everything in one process, images in a
local folder served at ``/images/``, the status page with its loopback key; and the
``brigade api`` / ``brigade up`` / ``brigade api keys`` commands as real processes."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

from tests.api_rig import ADMIN_KEY, parse_sse, run_up
from tests.fixtures.brokers import BrokerFactory


@pytest.fixture
async def up(tmp_path: Path) -> AsyncIterator[str]:
    async with run_up(tmp_path, demo_step_seconds=0.01) as url:
        yield url


async def test_up_serves_its_images_and_the_status_page_with_a_loopback_key(up: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(up + "/") as response:
            assert response.status == 200
            page = await response.text()
            assert "nonce-" in response.headers["Content-Security-Policy"]
            assert response.headers["Cache-Control"] == "no-store"
        key = page.split('"key": "', 1)[1].split('"', 1)[0]
        assert key.startswith("brg_")
        auth = {"Authorization": f"Bearer {key}"}
        async with http.post(
            up + "/v1/jobs",
            json={"workflow": "demo", "prompt": "a lantern", "steps": 4, "width": 96, "height": 64},
            headers={**auth, "Idempotency-Key": "up-1"},
        ) as response:
            assert response.status == 202
            ticket = await response.json()
        async with (
            asyncio.timeout(30),
            http.get(up + ticket["events_url"], headers=auth) as response,
        ):
            events = parse_sse(await response.text()).events
        assert events[-1].event == "succeeded"
        url = events[-1].data["outputs"][0]["url"]
        assert url.startswith(up + "/images/")
        async with http.get(url) as response:  # no key: the URL is the capability
            assert response.status == 200 and response.content_type == "image/png"
            image = Image.open(io.BytesIO(await response.read()))
        assert image.size == (96, 64) and image.info["prompt"] == "a lantern"
        for bad in ("/images/..%2F..%2Fledger.sqlite3", "/images/2026/01/01/nope/0.png"):
            async with http.get(up + bad) as response:
                assert response.status == 404, bad
        async with http.get(up + "/") as response:  # the last images, rendered by the server
            assert url in await response.text()
        # A name that resolves to this machine is not enough: no key for a foreign Host.
        async with http.get(up + "/", headers={"Host": "rebound.example"}) as response:
            assert response.status == 200
            assert '"key": null' in await response.text()


def _brigade(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "BRIGADE_DATA_DIR": str(tmp_path / "data"), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "brigade.cli", *args],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_api_keys_create_list_and_revoke(tmp_path: Path) -> None:
    created = _brigade(tmp_path, "api", "keys", "create", "--tenant", "acme", "--name", "ci")

    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("brg_") and "shown once" in created.stderr
    key_id = key.split("_")[1]
    listed = _brigade(tmp_path, "api", "keys", "list")
    assert key_id in listed.stdout and "acme" in listed.stdout and key not in listed.stdout
    assert _brigade(tmp_path, "api", "keys", "revoke", key_id).returncode == 0
    assert "revoked" in _brigade(tmp_path, "api", "keys", "list", "--tenant", "acme").stdout
    refused = _brigade(tmp_path, "api", "keys", "create", "--tenant", "no spaces")
    assert refused.returncode == 2 and "tenant" in refused.stderr


def _tail(log: Path) -> str:
    return log.read_text()[-3000:]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> dict[str, object]:
    deadline = time.monotonic() + 40
    async with aiohttp.ClientSession() as http:
        while True:
            assert process.poll() is None, _tail(log)
            try:
                async with http.get(url + "/readyz") as response:
                    if response.status == 200:
                        body: dict[str, object] = await response.json()
                        return body
            except aiohttp.ClientConnectionError:
                pass
            assert time.monotonic() < deadline, _tail(log)
            await asyncio.sleep(0.2)


def _start(
    tmp_path: Path, command: str, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / f"{command}.log"
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("API_", "COMFYUI_"))},
        "BRIGADE_DATA_DIR": str(tmp_path / "data"),
        "BRIGADE_LOG_FORMAT": "json",
        "RENDERER_DEVICE": "cpu",
    }
    environment.pop("AMQP_URL", None)
    environment.update(env)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "brigade.cli", command],
            cwd=tmp_path,
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return process, log


async def _stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return await asyncio.to_thread(process.wait, 20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)


@pytest.mark.rabbitmq
@pytest.mark.parametrize("brokers", ["rabbitmq"], indirect=True)
async def test_brigade_api_runs_on_rabbitmq_until_sigterm(
    tmp_path: Path, amqp_url: str, brokers: BrokerFactory, test_prefix: str
) -> None:
    brokers.topology(test_prefix, frontends=("api-test",))  # removed after the test
    port = _free_port()
    process, log = _start(
        tmp_path,
        "api",
        {
            "AMQP_URL": amqp_url,
            "AMQP_PREFIX": test_prefix,
            "API_PORT": str(port),
            "API_ADMIN_KEY": ADMIN_KEY,
            "BRIGADE_FRONTEND_ID": "api-test",
        },
    )
    try:
        ready = await _wait_ready(f"http://127.0.0.1:{port}", process, log)
        assert ready["checks"] == {"broker": "ok", "ledger": "ok", "store": "ok"}
    finally:
        code = await _stop(process)
    assert code == 0, _tail(log)


async def test_brigade_up_serves_the_status_page_until_sigterm(tmp_path: Path) -> None:
    port = _free_port()
    process, log = _start(tmp_path, "up", {"API_PORT": str(port)})
    try:
        await _wait_ready(f"http://127.0.0.1:{port}", process, log)
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/") as page:
            assert page.status == 200 and "Brigade" in await page.text()
    finally:
        code = await _stop(process)
    assert code == 0, _tail(log)
