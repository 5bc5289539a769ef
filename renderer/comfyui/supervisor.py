"""Runs ComfyUI as a child process and keeps it alive.

One supervisor per GPU: it starts ComfyUI (``python main.py --listen HOST --port PORT``
plus extra arguments, with ``CUDA_VISIBLE_DEVICES`` set to its GPU), waits until it
answers ``/system_stats``, then watches it:

* the process **exits** → it is started again;
* it stops **answering** ``/system_stats`` for ``health_failures`` checks in a row (a
  hang) → it is killed and started again;
* the backend reports ``max_faults`` OOM or CUDA faults **in a row** (a GPU in a bad
  state) → it is restarted; any success resets the count.

Restarts back off (doubling, capped) so a ComfyUI that cannot start does not spin.
ComfyUI's output goes line by line to structlog (``comfyui.output``). ComfyUI runs in a
process group of its own and stopping kills the whole group and waits for it, so no
process outlives the renderer and none is left a zombie.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import structlog

log = structlog.get_logger(__name__)

#: Longest pause between two restarts of a ComfyUI that keeps failing.
MAX_RESTART_BACKOFF_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class SupervisorConfig:
    """How to run one ComfyUI. ``path`` is the folder with ComfyUI's ``main.py``."""

    path: Path
    host: str = "127.0.0.1"
    port: int = 8188
    python: str = sys.executable
    extra_args: Sequence[str] = ()
    #: The value of ``CUDA_VISIBLE_DEVICES`` for this ComfyUI; None leaves it alone.
    gpu: str | None = None
    start_timeout: float = 180.0
    health_interval: float = 10.0
    health_timeout: float = 5.0
    health_failures: int = 3
    max_faults: int = 3
    stop_timeout: float = 10.0
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [
            self.python,
            str(self.path / "main.py"),
            "--listen",
            self.host,
            "--port",
            str(self.port),
            *self.extra_args,
        ]


class ComfyUIDidNotStart(RuntimeError):
    """ComfyUI exited, or did not answer, before ``start_timeout``."""


class ComfyUISupervisor:
    def __init__(self, config: SupervisorConfig) -> None:
        self.config = config
        self.restarts = 0
        self._process: asyncio.subprocess.Process | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._pumps: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._healthy = asyncio.Event()
        self._faults = 0
        self._stopping = False
        self._restart_lock = asyncio.Lock()
        self._restarting: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def healthy(self) -> bool:
        return self._healthy.is_set()

    async def start(self) -> None:
        """Start ComfyUI and wait until it answers. Raises :class:`ComfyUIDidNotStart`."""
        self._stopping = False
        self._session = aiohttp.ClientSession()
        try:
            await self._launch()
        except BaseException:
            await self.stop()
            raise
        self._watcher = asyncio.create_task(self._watch(), name="comfyui-supervisor")

    async def stop(self) -> None:
        """Kill ComfyUI's whole process group and reap it. Safe to call twice."""
        self._stopping = True
        for task in (self._watcher, self._restarting):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._watcher = self._restarting = None
        await self._kill()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def wait_healthy(self, timeout: float) -> bool:
        """Wait until ComfyUI answers again (after a restart); False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                await self._healthy.wait()
        except TimeoutError:
            return False
        return True

    def record_fault(self) -> None:
        """The backend saw an OOM or CUDA fault; enough in a row restart ComfyUI."""
        self._faults += 1
        if self._faults >= self.config.max_faults and not self._stopping:
            log.warning("comfyui.restart", reason="faults", faults=self._faults)
            self._faults = 0
            if self._restarting is None or self._restarting.done():
                self._restarting = asyncio.get_running_loop().create_task(self.restart("faults"))

    def record_success(self) -> None:
        self._faults = 0

    async def restart(self, reason: str) -> None:
        async with self._restart_lock:
            if self._stopping:
                return
            self.restarts += 1
            log.warning("comfyui.restart", reason=reason, restarts=self.restarts)
            await self._kill()
            await self._launch()

    async def _launch(self) -> None:
        config = self.config
        env = {**os.environ, **config.env, "PYTHONUNBUFFERED": "1"}
        if config.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = config.gpu
        began = time.monotonic()
        self._process = await asyncio.create_subprocess_exec(
            *config.command(),
            cwd=config.path,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() kills all of it
        )
        log.info("comfyui.started", pid=self._process.pid, url=config.url, gpu=config.gpu)
        self._pumps.append(asyncio.create_task(self._pump(self._process)))
        deadline = began + config.start_timeout
        while time.monotonic() < deadline:
            if self._process.returncode is not None:
                raise ComfyUIDidNotStart(
                    f"ComfyUI exited with code {self._process.returncode} while starting"
                )
            if await self._answers():
                self._healthy.set()
                log.info(
                    "comfyui.ready",
                    pid=self._process.pid,
                    seconds=round(time.monotonic() - began, 2),
                )
                return
            await asyncio.sleep(0.2)
        raise ComfyUIDidNotStart(
            f"ComfyUI did not answer at {config.url} within {config.start_timeout:.0f} s"
        )

    async def _answers(self) -> bool:
        assert self._session is not None
        try:
            async with self._session.get(
                f"{self.config.url}/system_stats",
                timeout=aiohttp.ClientTimeout(total=self.config.health_timeout),
            ) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _watch(self) -> None:
        failures = 0
        backoff = 1.0
        while True:
            async with self._restart_lock:  # never in the middle of someone else's restart
                process = self._process
            if process is None:  # a restart failed to start it: try again
                await self._relaunch("not running", backoff)
                backoff = min(backoff * 2, MAX_RESTART_BACKOFF_SECONDS)
                continue
            try:
                await asyncio.wait_for(process.wait(), timeout=self.config.health_interval)
            except TimeoutError:
                pass
            else:
                if process is not self._process:
                    continue  # restarted on purpose meanwhile (faults)
                log.warning("comfyui.exited", code=process.returncode)
                self._healthy.clear()
                await self._relaunch("exited", backoff)
                backoff = min(backoff * 2, MAX_RESTART_BACKOFF_SECONDS)
                continue
            if await self._answers():
                failures, backoff = 0, 1.0
                self._healthy.set()
                continue
            failures += 1
            log.warning("comfyui.unhealthy", failures=failures)
            if failures >= self.config.health_failures:
                self._healthy.clear()
                failures = 0
                await self._relaunch("hung", backoff)
                backoff = min(backoff * 2, MAX_RESTART_BACKOFF_SECONDS)

    async def _relaunch(self, reason: str, backoff: float) -> None:
        await asyncio.sleep(backoff if self.restarts else 0)
        try:
            await self.restart(reason)
        except (ComfyUIDidNotStart, OSError) as exc:
            log.error("comfyui.start_failed", error=str(exc))

    async def _pump(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while line := await process.stdout.readline():
            log.info("comfyui.output", pid=process.pid, line=line.decode(errors="replace").rstrip())

    async def _kill(self) -> None:
        process, self._process = self._process, None
        self._healthy.clear()
        if process is None:
            return
        if process.returncode is None:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout=self.config.stop_timeout)
            except TimeoutError:
                log.warning("comfyui.kill", pid=process.pid)
        # Whatever it started may outlive it: the group goes, whatever happened above.
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        self._pumps = []
        log.info("comfyui.stopped", pid=process.pid, code=process.returncode)
