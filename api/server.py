"""Serving the API: an aiohttp runner on one listening socket.

The socket is bound first (:meth:`ApiServer.bind`), before anything else starts, so a
port in use fails at once, and the real port is known (``API_PORT=0`` takes any free
one) before the services that build URLs from it, such as the local store, are made.
"""

from __future__ import annotations

import socket
from contextlib import AsyncExitStack

import structlog
from aiohttp import web

from api.app import create_app
from api.context import Services
from api.settings import ApiSettings

log = structlog.get_logger(__name__)

#: Seconds open requests get to finish when the server stops (event streams end at once).
SHUTDOWN_SECONDS = 5.0
_WILDCARDS = ("0.0.0.0", "", "::")


class ApiServer:
    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self._socket: socket.socket | None = None
        self._runner: web.AppRunner | None = None

    def bind(self) -> None:
        """Open the listening socket (raises ``OSError`` when the port is taken)."""
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        self._socket = socket.create_server((self._host, self._port), family=family)
        self._port = int(self._socket.getsockname()[1])

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """Where the server answers, e.g. ``http://127.0.0.1:8080``."""
        host = "127.0.0.1" if self._host in _WILDCARDS else self._host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self._port}"

    async def serve(self, app: web.Application) -> None:
        if self._socket is None:
            self.bind()
        assert self._socket is not None
        runner = web.AppRunner(app, shutdown_timeout=SHUTDOWN_SECONDS)
        await runner.setup()
        self._runner = runner
        await web.SockSite(runner, self._socket).start()
        log.info("api.started", url=self.url)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            log.info("api.stopped")
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()


def bind_api(stack: AsyncExitStack, settings: ApiSettings) -> ApiServer:
    """Bind ``API_HOST:API_PORT`` now; the server stops when ``stack`` closes."""
    server = ApiServer(settings.host, settings.port)
    server.bind()
    stack.push_async_callback(server.stop)
    return server


async def start_api(
    stack: AsyncExitStack,
    services: Services,
    settings: ApiSettings,
    server: ApiServer | None = None,
) -> ApiServer:
    """Serve the API (on ``server``, or on ``API_HOST:API_PORT``) until ``stack`` closes."""
    if server is None:
        server = bind_api(stack, settings)
    await server.serve(create_app(services, settings))
    return server
