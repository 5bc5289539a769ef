"""The status page in a real browser: headless Chromium (Debian's ``/usr/bin/chromium``)
driven over the Chrome DevTools Protocol opens the page that ``brigade up`` serves,
submits a prompt through its form, and sees a preview and then the final image appear.

With ``BRIGADE_WRITE_SCREENSHOT=1`` it saves the page to ``docs/status-page.png``.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.api_rig import run_up

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = Path(__file__).parent.parent / "docs" / "status-page.png"


class Cdp:
    """The few DevTools Protocol calls this test needs, over one page's WebSocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        await self._ws.send_json({"id": call_id, "method": method, "params": params})
        while True:  # events arrive in between; this test reads state by polling instead
            message = await self._ws.receive_json()
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result

    async def eval(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def until(self, expression: str, timeout: float = 30) -> Any:
        async with asyncio.timeout(timeout):
            while not (value := await self.eval(expression)):
                await asyncio.sleep(0.1)
        return value


def _devtools_port(profile: Path) -> int | None:
    """Chromium writes the port it took (``--remote-debugging-port=0``) into the profile."""
    marker = profile / "DevToolsActivePort"
    text = marker.read_text() if marker.is_file() else ""
    return int(text.split()[0]) if text.strip() else None


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Cdp]:
    profile = tmp_path / "chromium"
    process = await asyncio.create_subprocess_exec(
        *[
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            "--window-size=1280,1500",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(20):
            while (port := _devtools_port(profile)) is None:
                assert process.returncode is None, "Chromium exited"
                await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = await response.json()
            page = next(t for t in targets if t["type"] == "page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                yield Cdp(ws)
    finally:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()


async def test_the_status_page_renders_a_prompt_live(browser: Cdp, tmp_path: Path) -> None:
    async with run_up(tmp_path, demo_step_seconds=0.12, preview_interval_seconds=0.0) as url:
        await browser.send("Page.enable")
        await browser.send("Page.navigate", url=url + "/")
        await browser.until("document.readyState === 'complete'")
        assert await browser.eval("document.title") == "Brigade · status"
        await browser.until("document.querySelectorAll('#queue tr').length === 1")

        await browser.eval(
            "document.getElementById('prompt').value = 'a lighthouse at dusk, oil painting';"
            "document.getElementById('steps').value = '24';"
            "document.getElementById('size').value = '384';"
            "document.getElementById('go').click(); true"
        )

        previews = await browser.until("Number(document.getElementById('preview').dataset.count)")
        assert previews >= 1
        assert str(await browser.eval("document.getElementById('preview').src")).startswith(
            "data:image/"
        )
        final = await browser.until(
            "(() => { const f = document.getElementById('final');"
            " return f.complete && f.naturalWidth > 0 ? f.src : ''; })()"
        )
        assert final.startswith(url + "/images/")
        assert await browser.eval("document.getElementById('final').naturalWidth") == 384
        await browser.until("document.querySelectorAll('#recent img').length >= 1")
        await browser.until(
            "Array.from(document.images).every((i) => !i.src || (i.complete && i.naturalWidth))"
        )
        status = await browser.eval("document.getElementById('status').textContent")
        assert status.startswith("done"), status
        shot = await browser.send("Page.captureScreenshot", format="png")

    png = base64.b64decode(shot["data"])
    assert png.startswith(b"\x89PNG")
    if os.environ.get("BRIGADE_WRITE_SCREENSHOT") == "1":
        SCREENSHOT.write_bytes(png)
