"""Chaos: many ``kill -9`` of renderer processes mid-job under a stream of jobs.

Run from the repository root, with RabbitMQ at ``AMQP_URL`` (default: guest on loopback)
and SeaweedFS's ``weed`` in the virtualenv (the dev extra)::

    .venv/bin/python -m bench.chaos [--kills 30] [--renderers 4] [--steps 4]
        [--step-seconds 0.1] [--job-interval 0.1] [--kill-gap 0.5] [--max-down 2]
        [--delivery-limit 4]

``--renderers`` ``brigade renderer`` processes on the ComfyUI backend, each with its own
ComfyUI emulator process (``sd15-txt2img`` 64x64, ``--steps`` x ``--step-seconds``,
previews off), over RabbitMQ (``AMQP_DELIVERY_LIMIT=--delivery-limit``), storing into
SeaweedFS; a frontend (admission, tracker, ledger, dead-letter notifier) in this process.
Jobs are admitted one every ``--job-interval`` seconds (at most 4 per renderer waiting)
while a killer repeats: pick a renderer that is mid-job (it has accepted a job it has not
finished) and has finished a job since it last started, ``SIGKILL`` it, start it again
at once with the same worker id; wait ``--kill-gap`` seconds, and while ``--max-down``
renderers are still starting, wait for them. (Without the "finished one" rule the first
job a restarted renderer takes, often the one the last kill returned, is killed again
and again.) After ``--kills`` kills the stream stops and the bench waits for every
admitted job to end. A restart costs a new Python process (about 2 CPU seconds of
imports), which paces the kills on a small machine.

A second queue bound to this frontend's event routing key sees every event the renderers
publish before the tracker's de-duplication: "terminal events (raw)" counts them; "extra
terminal events" are the duplicates the tracker had to drop (a job rendered again after
a kill that came after its ``succeeded``); "seen twice by listeners" must be 0, as must
"lost" (admitted, no terminal event within ``--finish-timeout`` s of the last kill, or
not terminal in the ledger). ``failed`` jobs are those returned more than the delivery
limit times: the broker dead-letters them and the frontend's dead-letter notifier
publishes their ``failed``. Each renderer runs with ``RENDERER_PREFETCH`` unset (2 on
ComfyUI), so a kill returns the job it renders and the one it holds prefetched: both
count a delivery. "Orphaned prompts" are those a killed renderer submitted (its running
and its prefetched prompt) that no renderer collected, found in ComfyUI's history:
rendered to the end for nobody, or stopped part way by the restarted renderer
(``COMFYUI_ORPHAN_GRACE_SECONDS``), with the GPU time they took: what a crash wastes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import aiohttp

from bench.common import quiet_logs, require_weed
from bench.pipeline import request
from bench.services import URL, Service, comfyui_emulators, stop_all
from bench.services import renderer as renderer_service
from brigade.app import Frontend, frontend
from jobs.bus import JobBus
from jobs.models import Event, Failed, JobStatus, Origin, Succeeded, parse_event
from jobs.rabbitmq import RabbitBroker
from jobs.topology import Topology, build_topology
from storage.settings import S3Settings
from tests.fixtures.rabbitmq import delete_topology
from tests.fixtures.s3server import run_seaweedfs, settings_for
from workflows import Catalog

CHECKPOINT = "tiny_sd15_random.safetensors"
#: Jobs admitted but not ended, per renderer, before the stream waits.
BACKLOG_PER_RENDERER = 4
#: Seconds to keep listening after the last job ended, for late duplicates.
LATE_SECONDS = 3.0


@dataclass
class Ends:
    """Terminal events per job: as published (raw) and as the tracker passes them on."""

    raw: collections.Counter[str] = field(default_factory=collections.Counter)
    heard: collections.Counter[str] = field(default_factory=collections.Counter)
    outcome: dict[str, Succeeded | Failed] = field(default_factory=dict)
    ended_at: dict[str, float] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, event: Event) -> None:
        if isinstance(event, Succeeded | Failed):
            self.heard[event.job_id] += 1
            self.outcome.setdefault(event.job_id, event)
            self.ended_at.setdefault(event.job_id, time.monotonic())
            self.changed.set()


@contextlib.asynccontextmanager
async def raw_events(topology: Topology, front_id: str, ends: Ends) -> AsyncIterator[None]:
    """Count every terminal event routed to ``front_id``, before any de-duplication."""
    connection = await aio_pika.connect(URL)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(topology.events_exchange, front_id)

        async def count(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with message.process():
                event = parse_event(message.body)
                if isinstance(event, Succeeded | Failed):
                    ends.raw[event.job_id] += 1

        await queue.consume(count)
        yield
    finally:
        await connection.close()


@dataclass
class Tally:
    admitted: list[str] = field(default_factory=list)
    kills: int = 0
    kill_times: list[float] = field(default_factory=list)
    began: float = 0.0
    last_kill: float = 0.0


class Life:
    """What one renderer process logged since it (re)started, read as the log grows."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.offset = 0
        self.counts: collections.Counter[str] = collections.Counter()

    def restarted(self) -> None:
        self.offset = self.service.log_path.stat().st_size
        self.counts.clear()

    def read(self) -> None:
        with self.service.log_path.open("rb") as log:
            log.seek(self.offset)
            data = log.read()
        complete = data.rfind(b"\n") + 1
        self.offset += complete
        for line in data[:complete].splitlines():
            with contextlib.suppress(ValueError):
                self.counts[str(json.loads(line).get("event"))] += 1

    @property
    def up(self) -> bool:
        return self.service.running() and self.counts["worker.started"] > 0

    @property
    def mid_job(self) -> bool:
        """Up, one job done since it started, and one accepted and not finished."""
        done = self.counts["job.succeeded"] + self.counts["job.failed"]
        return self.up and done > 0 and self.counts["job.accepted"] > done


async def killer(
    renderers: Sequence[Service], args: argparse.Namespace, tally: Tally, rng: random.Random
) -> None:
    """Kill a renderer that is mid-job (and has finished a job since it started, so the
    first job it takes after a restart, often the one the kill returned, is not the one
    killed again and again), while fewer than ``--max-down`` are down; restart it."""
    lives = [Life(service) for service in renderers]
    while tally.kills < args.kills:
        for life in lives:
            life.read()
        down = sum(not life.up for life in lives)
        ready = [life for life in lives if life.mid_job]
        if down >= args.max_down or not ready:
            await asyncio.sleep(0.05)
            continue
        victim = rng.choice(ready)
        victim.service.kill()
        tally.kills += 1
        tally.last_kill = time.monotonic()
        victim.restarted()
        victim.service.start()
        if tally.kills % 10 == 0:
            print(
                f"  {tally.kills} kills, {len(tally.admitted)} jobs admitted "
                f"({time.monotonic() - tally.began:.0f} s)",
                flush=True,
            )
        await asyncio.sleep(args.kill_gap)


async def stream(
    front: Frontend,
    origin: Origin,
    ends: Ends,
    args: argparse.Namespace,
    tally: Tally,
    stop: asyncio.Event,
) -> None:
    n = 0
    while not stop.is_set():
        if len(tally.admitted) - len(ends.outcome) >= BACKLOG_PER_RENDERER * args.renderers:
            await asyncio.sleep(0.05)
            continue
        admitted = await front.admission.submit(
            request(n, args.steps, CHECKPOINT), idempotency_key=str(uuid.uuid4()), origin=origin
        )
        tally.admitted.append(admitted.job.job_id)
        n += 1
        await asyncio.sleep(args.job_interval)


@dataclass
class Orphans:
    """What killed renderers left in ComfyUI's history (a renderer deletes what it
    collects): prompts rendered to the end for nobody, prompts stopped part way (a
    restarted renderer interrupts its predecessor's prompt after a grace), and the GPU
    seconds both took (from each entry's execution_start to its last message)."""

    rendered: int = 0
    stopped: int = 0
    gpu_seconds: float = 0.0


async def orphaned(urls: Sequence[str]) -> Orphans:
    left = Orphans()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        for url in urls:
            async with http.get(f"{url}/history") as response:
                history = await response.json()
            for entry in history.values():
                status = entry.get("status") or {}
                if status.get("status_str") == "success":
                    left.rendered += 1
                else:
                    left.stopped += 1
                stamps = {
                    event: data.get("timestamp", 0)
                    for event, data in status.get("messages") or []
                    if isinstance(data, dict)
                }
                moments = [stamp for stamp in stamps.values() if stamp]
                if "execution_start" in stamps and moments:
                    left.gpu_seconds += (max(moments) - stamps["execution_start"]) / 1000
    return left


async def bench(
    args: argparse.Namespace, s3: S3Settings, folder: Path, urls: Sequence[str]
) -> None:
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    topology = build_topology(["fast"], prefix=prefix, delivery_limit=args.delivery_limit)
    front_id = f"{prefix}-front"
    renderers = [
        renderer_service(
            f"{prefix}-gpu{n}",
            folder,
            prefix,
            s3,
            url,
            COMFYUI_PREVIEW_METHOD="none",
            AMQP_DELIVERY_LIMIT=str(args.delivery_limit),
        )
        for n, url in enumerate(urls)
    ]
    ends = Ends()
    tally = Tally()
    rng = random.Random(args.seed)
    try:
        async with AsyncExitStack() as stack:
            broker = RabbitBroker(URL, topology, name=f"{prefix}:frontend")
            await broker.connect()
            stack.push_async_callback(broker.close)
            await broker.declare()
            front = await frontend(
                stack, JobBus(broker), Catalog.load(), folder / f"{prefix}.db", front_id
            )
            front.tracker.add_listener(ends)
            await stack.enter_async_context(raw_events(topology, front_id, ends))
            stack.callback(stop_all, renderers)
            for service in renderers:
                service.start()
            for service in renderers:
                await asyncio.to_thread(service.wait_for_log, "worker.started")
            origin = Origin(frontend="api", reply_to=front_id)
            stop = asyncio.Event()
            tally.began = time.monotonic()
            feeding = asyncio.create_task(stream(front, origin, ends, args, tally, stop))
            try:
                await killer(renderers, args, tally, rng)
            finally:
                stop.set()
                await feeding
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(args.finish_timeout):
                    while not all(job_id in ends.outcome for job_id in tally.admitted):
                        ends.changed.clear()
                        await ends.changed.wait()
            await asyncio.sleep(LATE_SECONDS)
            ledger_lost = 0
            for job_id in tally.admitted:
                record = await front.ledger.get(job_id)
                if record is None or record.status not in (JobStatus.SUCCEEDED, JobStatus.FAILED):
                    ledger_lost += 1
            left = await orphaned(urls)
    finally:
        await delete_topology(URL, topology, [topology.events_queue(front_id).name])
        for service in renderers:
            troubles = [line for line in service.warnings() if "Traceback" in line]
            if troubles:
                print(f"  {service.name}: {len(troubles)} traceback(s) in its log")
            if args.logs is not None:
                args.logs.mkdir(parents=True, exist_ok=True)
                shutil.copy(service.log_path, args.logs / service.log_path.name)
        if args.logs is not None:
            await asyncio.to_thread(copy_emulator_logs, folder, args.logs)
    report(args, tally, ends, ledger_lost, left)


def copy_emulator_logs(folder: Path, logs: Path) -> None:
    for log in folder.glob("emulator-*.log"):
        shutil.copy(log, logs / log.name)


def report(
    args: argparse.Namespace, tally: Tally, ends: Ends, ledger_lost: int, left: Orphans
) -> None:
    jobs = tally.admitted
    ended = [job_id for job_id in jobs if job_id in ends.outcome]
    succeeded = sum(isinstance(ends.outcome[j], Succeeded) for j in ended)
    reasons = collections.Counter(
        outcome.reason.value
        for outcome in (ends.outcome[j] for j in ended)
        if isinstance(outcome, Failed)
    )
    redelivered = sum(ends.outcome[j].attempt > 1 for j in ended)
    extra_raw = sum(max(0, ends.raw[j] - 1) for j in jobs)
    twice = sum(max(0, ends.heard[j] - 1) for j in jobs)
    last_end = max((ends.ended_at[j] for j in ended), default=tally.began)
    render = args.steps * args.step_seconds
    print()
    print(
        f"{args.renderers} renderers, each with its own emulated GPU; sd15-txt2img 64x64, "
        f"{args.steps} steps x {args.step_seconds:g} s = {render:g} s render, previews off; "
        f"AMQP_DELIVERY_LIMIT={args.delivery_limit}; a job every {args.job_interval:g} s"
    )
    rows = [
        ("kill -9 of a renderer mid-job", f"{tally.kills}"),
        ("jobs admitted", f"{len(jobs)}"),
        ("jobs ended", f"{len(ended)}"),
        ("  succeeded", f"{succeeded}"),
        ("  failed", f"{sum(reasons.values())} {dict(reasons) if reasons else ''}".strip()),
        ("  ended on a redelivery (attempt > 1)", f"{redelivered}"),
        ("lost (no terminal event)", f"{len(jobs) - len(ended)}"),
        ("lost (not terminal in the ledger)", f"{ledger_lost}"),
        ("terminal events (raw)", f"{sum(ends.raw[j] for j in jobs)}"),
        ("extra terminal events (dropped by the tracker)", f"{extra_raw}"),
        ("terminal events seen twice by listeners", f"{twice}"),
        ("orphaned prompts, rendered for nobody", f"{left.rendered}"),
        ("orphaned prompts, stopped part way", f"{left.stopped}"),
        ("GPU time of orphaned prompts", f"{left.gpu_seconds:.1f} s"),
        ("first admission -> last kill", f"{tally.last_kill - tally.began:.1f} s"),
        ("last kill -> last job ended", f"{max(0.0, last_end - tally.last_kill):.1f} s"),
        ("first admission -> last job ended", f"{last_end - tally.began:.1f} s"),
    ]
    for name, value in rows:
        print(f"  {name:<48}{value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--renderers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="KSampler steps per job")
    parser.add_argument(
        "--step-seconds", type=float, default=0.1, help="the emulators' time per step"
    )
    parser.add_argument("--job-interval", type=float, default=0.1, help="seconds between jobs")
    parser.add_argument("--kill-gap", type=float, default=0.5, help="seconds after each kill")
    parser.add_argument(
        "--max-down", type=int, default=2, help="no kill while this many renderers are down"
    )
    parser.add_argument("--delivery-limit", type=int, default=4, help="AMQP_DELIVERY_LIMIT")
    parser.add_argument("--finish-timeout", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=7, help="which renderer dies when")
    parser.add_argument(
        "--logs", type=Path, help="copy the renderers' and the emulators' logs into this folder"
    )
    args = parser.parse_args()
    quiet_logs()
    weed = require_weed()
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-chaos-") as name:
        folder = Path(name)
        with (
            run_seaweedfs(folder / "seaweedfs", weed) as server,
            comfyui_emulators(args.renderers, args.step_seconds, folder) as gpus,
        ):
            urls = [url for url, _ in gpus]
            asyncio.run(bench(args, settings_for(server, "bench"), folder, urls))
    print(f"({time.monotonic() - began:.0f} s in all)")


if __name__ == "__main__":
    main()
