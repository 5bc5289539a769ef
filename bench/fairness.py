"""Fair release beside FIFO: how long light users wait behind a heavy one.

Run from the repository root::

    .venv/bin/python -m bench.fairness [--heavy 50] [--others 9] [--each 2] \
        [--workers 2] [--render 0.2] [--rounds 3]

One heavy user queues ``--heavy`` jobs, then ``--others`` users in three guilds queue
``--each`` jobs each, while no GPU is free; then ``--workers`` workers come up, each
rendering a job in ``--render`` seconds (a fixed-time backend: no torch, a 1-pixel PNG,
so what is measured is the order, not the renderer). The same load runs with fair
release (``FAIR_WINDOW_*`` defaults: two jobs per worker at the broker, the rest
released round robin) and with a window so large that everything is published at once
(FIFO), on the in-process broker, rounds interleaved. Reported, as medians over rounds:
how long the light users waited for their first job to start (median and worst), where
the heavy user's 6th job started, and the whole run's duration (fairness must not cost
throughput).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import Any

import structlog
from PIL import Image

from brigade.app import frontend, start_worker
from jobs.bus import JobBus
from jobs.memory import MemoryBroker, MemoryHub
from jobs.models import Accepted, Event, JobRequest, Origin, Succeeded
from jobs.topology import build_topology
from renderer.backends.base import RenderResult, RenderTask, Reporter
from renderer.settings import RendererSettings
from storage import LocalStore
from workflows import Catalog

FRONTEND = "bench-fair"


class FixedTime:
    """A backend that takes ``seconds`` per job and returns a 1-pixel PNG."""

    name = "demo"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        buffer = io.BytesIO()
        Image.new("RGB", (1, 1)).save(buffer, format="PNG")
        self.png = buffer.getvalue()

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def describe(self) -> dict[str, Any]:
        return {"backend": "fixed-time", "device": "none"}

    async def upload_image(self, name: str, data: bytes) -> str:
        return name  # the demo workflow takes no image

    async def render(self, task: RenderTask, report: Reporter) -> RenderResult:
        await asyncio.sleep(self.seconds)
        return RenderResult(images=[self.png])


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """The frontend reads its settings from the environment: set them for one run."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


async def one_run(args: argparse.Namespace, window: int, folder: Path) -> dict[str, float]:
    topology = build_topology(["fast"], prefix="bench")
    hub = MemoryHub()
    users: dict[str, str] = {}
    submitted: dict[str, float] = {}
    started: dict[str, float] = {}
    finished = asyncio.Event()
    total = args.heavy + args.others * args.each

    overrides = {"FAIR_WINDOW_MIN": str(window), "FAIR_RELEASE_SECONDS": "0.2"}
    for limit in ("CONCURRENT_PER_USER", "PENDING_PER_TENANT", "IMAGES_PER_USER_PER_DAY"):
        overrides[f"QUOTA_{limit}"] = "100000"
    async with AsyncExitStack() as stack:
        stack.enter_context(_environment(overrides))
        broker = MemoryBroker(hub, topology)
        await broker.connect()
        stack.push_async_callback(broker.close)
        await broker.declare()
        catalog = Catalog.load()
        front = await frontend(stack, JobBus(broker), catalog, folder / "ledger.db", FRONTEND)
        store = LocalStore(folder / "images")
        await store.start()
        stack.push_async_callback(store.close)

        async def listen(event: Event) -> None:
            if isinstance(event, Accepted):
                started.setdefault(event.job_id, time.perf_counter())
            if isinstance(event, Succeeded) and len(started) == total:
                finished.set()

        front.tracker.add_listener(listen)

        async def submit(tenant: str, user: str, n: int) -> None:
            request = JobRequest(
                workflow="demo", prompt=f"{user} {n}", steps=1, width=64, height=64
            )
            origin = Origin(frontend="api", reply_to=FRONTEND, tenant=tenant, user=user)
            admitted = await front.admission.submit(
                request, idempotency_key=f"{user}-{n}", origin=origin
            )
            users[admitted.job.job_id] = user
            submitted[admitted.job.job_id] = time.perf_counter()

        for n in range(args.heavy):
            await submit("g0", "heavy", n)
        others = [(f"g{i % 3}", f"u{i}") for i in range(args.others)]
        for n in range(args.each):
            for tenant, user in others:
                await submit(tenant, user, n)
        began = time.perf_counter()
        for index in range(args.workers):
            settings = RendererSettings(
                _env_file=None, worker_id=f"w{index}", heartbeat_seconds=0.5, device="cpu"
            )
            render_broker = MemoryBroker(hub, topology)
            await render_broker.connect()
            stack.push_async_callback(render_broker.close)
            await start_worker(
                stack, JobBus(render_broker), FixedTime(args.render), store, catalog, settings
            )
        await asyncio.wait_for(finished.wait(), timeout=600)
        ended = time.perf_counter()
    order = sorted(started, key=started.__getitem__)
    first_waits = []
    for _, user in others:
        first = next(job for job in order if users[job] == user)
        first_waits.append(started[first] - began)
    heavy = [job for job in order if users[job] == "heavy"]
    return {
        "first_wait_median": statistics.median(first_waits),
        "first_wait_worst": max(first_waits),
        "heavy_sixth_rank": float(order.index(heavy[5]) + 1),
        "seconds": ended - began,
    }


async def main(args: argparse.Namespace) -> None:
    runs: dict[str, list[dict[str, float]]] = {"fair": [], "fifo": []}
    for _ in range(args.rounds):
        for name, window in (("fair", 2), ("fifo", 100_000)):
            with tempfile.TemporaryDirectory() as folder:
                runs[name].append(await one_run(args, window, Path(folder)))
    print(
        f"{args.heavy} jobs from one user, then {args.others} users x {args.each}; "
        f"{args.workers} workers, {args.render} s per job; medians of {args.rounds} rounds"
    )
    print(f"{'':6} {'light 1st wait p50':>18} {'worst':>8} {'heavy 6th starts':>17} {'run':>8}")
    for name, results in runs.items():

        def median(key: str, results: list[dict[str, float]] = results) -> float:
            return statistics.median(r[key] for r in results)

        print(
            f"{name:6} {median('first_wait_median'):17.2f}s {median('first_wait_worst'):7.2f}s "
            f"{'#' + str(int(median('heavy_sixth_rank'))):>17} {median('seconds'):7.2f}s"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heavy", type=int, default=50)
    parser.add_argument("--others", type=int, default=9)
    parser.add_argument("--each", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--render", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=3)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    asyncio.run(main(parser.parse_args()))
