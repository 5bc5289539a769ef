"""Admission rate beside the raw confirmed-publish rate of aio-pika, on the same broker.

Run from the repository root, with RabbitMQ at ``AMQP_URL`` (default: guest on loopback)::

    .venv/bin/python -m bench.admission [--jobs 500] [--rounds 5] [--concurrency 1] \\
        [--served 0] [--ceiling] [--lag]

Each round publishes ``--jobs`` messages one at a time with publisher confirms through
plain aio-pika (the floor nothing can beat), then admits ``--jobs`` requests through
``Admission.submit`` (validate against the manifest, write the SQLite ledger row,
publish with a confirm; the "published" mark is written in the background). The requests
come from ``USERS`` users of one tenant, whose limits are checked and reserved as a
guild's are (every limit but the tenant's daily images is set, as in the defaults, high
enough that nothing is refused). Rounds alternate, so both see the same machine; it
prints the median rate of each and their ratio. Queues are deleted afterwards. With
``--concurrency N`` both sides keep N publishes (or submits) in flight at once, as a
frontend does when many users submit together. It also prints the CPU time each side
spends per job: in this whole process (worker threads included) and on the event
loop's thread alone. ``--ceiling`` adds a third side to each round, the best this design
allows: each job validated, written as one row (one ``INSERT``, no history, no quota, no
fair-release claim) the way the ledger writes (on the event loop when the file is free,
else in a worker thread), then published with a confirm. ``--served N`` first admits one
job for each of N other users of the tenant and has them taken (untimed), as in a big
guild whose members have used the bot before: the fair order remembers each of them.
``--lag`` also measures how long the event loop is held (the admission's transaction
runs on it when the file is free): a task on the loop sleeps 1 ms over and over during
each side, and the bench prints how late it woke (median, p99, the longest; the loop's
timers round up to the millisecond, so read the longest, not the p50). Its ticks cost
both sides a little: leave it out for the ratio.

Between rounds (untimed) the queue is purged and the round's jobs are recorded as
rendered (an ``accepted`` and a ``succeeded`` event each, through ``Ledger.apply``:
their images charged), as in a frontend whose renderers keep up: there the jobs waiting
at the broker are at most the fair window (about two per worker), and the window's count
in each admission reads those only. Without it every round would admit behind all the
earlier rounds' jobs, which no renderer ever takes here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import aio_pika
import sqlite_utils

from bench.common import loop_lag, quiet_logs, summary_ms
from jobs.admission import Admission
from jobs.bus import JobBus
from jobs.ledger import Ledger
from jobs.models import Accepted, JobRequest, Origin, Output, Succeeded
from jobs.quotas import QuotaSettings
from jobs.rabbitmq import RabbitBroker
from jobs.settings import FairSettings
from jobs.sql import FileBusy, SqliteFile, immediate, insert_row
from jobs.topology import build_topology
from tests.fixtures.rabbitmq import delete_topology
from workflows import Catalog

URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")

#: The tenant's users the requests come from, in turn.
USERS = 50
TENANT = "bench-guild"
#: Every counted limit a guild has by default, set high enough that nothing is refused.
LIMITS = QuotaSettings(
    images_per_user_per_day=10**9, concurrent_per_user=10**9, pending_per_tenant=10**9
)


def request(n: int) -> JobRequest:
    """The n-th request of a round (every side builds the same ones)."""
    return JobRequest(workflow="sd15-txt2img", prompt=f"a lighthouse at dusk #{n}", seed=n)


def origin(n: int, user: str | None = None) -> Origin:
    """Who sends the n-th request: one of ``USERS`` in turn, or ``user``."""
    return Origin(frontend="api", reply_to="bench", tenant=TENANT, user=user or f"user{n % USERS}")


async def in_parallel(jobs: int, concurrency: int, one: Callable[[int], Awaitable[None]]) -> float:
    """Run ``one(0)`` ... ``one(jobs - 1)``, ``concurrency`` at a time (each of that many
    tasks takes the next number when its last call returns); calls per second."""
    numbers = iter(range(jobs))

    async def worker() -> None:
        for n in numbers:
            await one(n)

    began = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(worker())
    return jobs / (time.perf_counter() - began)


async def raw_rate(jobs: int, exchange: str, body: bytes, concurrency: int = 1) -> float:
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange)

        async def publish(_: int) -> None:
            await target.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                "fast",
                mandatory=True,
            )

        return await in_parallel(jobs, concurrency, publish)


async def admission_rate(
    admission: Admission, jobs: int, concurrency: int = 1
) -> tuple[float, list[str]]:
    """Jobs admitted per second, and their ids."""
    admitted: list[str] = []

    async def submit(n: int) -> None:
        result = await admission.submit(
            request(n),
            idempotency_key=str(uuid.uuid4()),
            origin=origin(n),
        )
        admitted.append(result.job.job_id)

    return await in_parallel(jobs, concurrency, submit), admitted


async def ceiling_rate(
    admission: Admission, bus: JobBus, scratch: SqliteFile, jobs: int, concurrency: int = 1
) -> float:
    """What the design allows at best: each job validated, written as one row in a
    transaction the way the ledger writes (``SqliteFile.run_now``, else a worker thread),
    then published with a confirm (``--ceiling``). Jobs per second."""

    async def one(n: int) -> None:
        job = admission.validate(
            request(n),
            idempotency_key=str(uuid.uuid4()),
            origin=origin(n),
        )

        def write(db: sqlite_utils.Database) -> None:
            with immediate(db):
                insert_row(db, "jobs", {"job_id": job.job_id, "job_json": job.model_dump_json()})

        try:
            scratch.run_now(write)
        except FileBusy:
            await scratch.run(write)
        await bus.submit(job)

    return await in_parallel(jobs, concurrency, one)


def _scratch_table(db: sqlite_utils.Database) -> None:
    db.execute("CREATE TABLE IF NOT EXISTS jobs (job_id TEXT PRIMARY KEY, job_json TEXT)")


async def taken(ledger: Ledger, queue: str, job_ids: list[str]) -> None:
    """What renderers would have done with a round's jobs: taken them off the queue (and
    the raw round's messages with them) and said so (untimed)."""
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        await (await channel.get_queue(queue, ensure=False)).purge()
    image = Output(url="bench", key="bench", size=1, width=1, height=1)
    for job_id in job_ids:
        await ledger.apply(Accepted(job_id=job_id, attempt=1, worker_id="bench", seq=0))
        await ledger.apply(
            Succeeded(job_id=job_id, attempt=1, worker_id="bench", seq=1, outputs=[image])
        )


async def serve(admission: Admission, ledger: Ledger, queue: str, users: int) -> None:
    """Admit one job for each of ``users`` users of the tenant and have them taken."""
    job_ids: list[str] = []

    async def submit(n: int) -> None:
        admitted = await admission.submit(
            request(n),
            idempotency_key=str(uuid.uuid4()),
            origin=origin(n, user=f"served{n}"),
        )
        job_ids.append(admitted.job.job_id)

    await in_parallel(users, 16, submit)
    await ledger.flush()
    await taken(ledger, queue, job_ids)


async def main(
    jobs: int,
    rounds: int,
    concurrency: int,
    ceiling: bool = False,
    served: int = 0,
    lag: bool = False,
) -> None:
    topology = build_topology(["fast"], prefix=f"bench{uuid.uuid4().hex[:8]}")
    broker = RabbitBroker(URL, topology, name="bench")
    await broker.connect()
    await broker.declare()
    with tempfile.TemporaryDirectory() as folder:
        ledger = Ledger(Path(folder) / "ledger.sqlite3")
        await ledger.open()
        # A window no load here fills: every job is released (published) at once, so
        # this measures validate + quota + ledger + confirmed publish, as before fair
        # release; a job held by fair release costs less (no publish).
        fair = FairSettings(_env_file=None, window_min=100_000)
        bus = JobBus(broker)
        admission = Admission(Catalog.load(), ledger, bus, fair=fair, quota_defaults=LIMITS)
        scratch = SqliteFile(Path(folder) / "scratch.sqlite3", "the scratch file", _scratch_table)
        await scratch.open()
        best: list[float] = []
        if served:
            await serve(admission, ledger, topology.lane_queue("fast"), served)
        sample = admission.validate(request(0), idempotency_key="sample", origin=origin(0))
        raw: list[float] = []
        admitted: list[float] = []
        # CPU per job of this process (every thread) and of its event loop's thread alone.
        raw_cpu: list[tuple[float, float]] = []
        admitted_cpu: list[tuple[float, float]] = []
        # How late the --lag task woke, during each side.
        raw_lag: list[float] = []
        admitted_lag: list[float] = []
        try:
            for _ in range(rounds):
                async with loop_lag(raw_lag if lag else None):
                    with cpu_per_job(raw_cpu, jobs):
                        raw.append(
                            await raw_rate(
                                jobs, topology.jobs_exchange, sample.to_wire(), concurrency
                            )
                        )
                async with loop_lag(admitted_lag if lag else None):
                    with cpu_per_job(admitted_cpu, jobs):
                        rate, job_ids = await admission_rate(admission, jobs, concurrency)
                        await ledger.flush()  # the round's "published" marks are its work too
                admitted.append(rate)
                if ceiling:
                    best.append(await ceiling_rate(admission, bus, scratch, jobs, concurrency))
                await taken(ledger, topology.lane_queue("fast"), job_ids)
        finally:
            await ledger.close()
            await scratch.close()
            await delete_topology(URL, topology, [])
            await broker.close()
    raw_median, admitted_median = statistics.median(raw), statistics.median(admitted)
    print(
        f"raw confirmed publish: median {raw_median:8.1f} msg/s  (rounds: "
        f"{', '.join(f'{r:.0f}' for r in raw)})"
    )
    print(
        f"admission            : median {admitted_median:8.1f} jobs/s (rounds: "
        f"{', '.join(f'{r:.0f}' for r in admitted)})"
    )
    print(f"ratio admission/raw  : {admitted_median / raw_median:.2f}")
    # Each admission round beside the raw round just before it: the machine's drift
    # between rounds cancels out.
    pairs = [a / r for a, r in zip(admitted, raw, strict=True)]
    print(
        f"ratio per round      : median {statistics.median(pairs):.2f} "
        f"(rounds: {', '.join(f'{p:.2f}' for p in pairs)})"
    )
    if best:
        ceilings = [c / r for c, r in zip(best, raw, strict=True)]
        print(
            f"ceiling (one-row transaction, written as the ledger writes): median "
            f"{statistics.median(best):.1f} jobs/s, ratio per round median "
            f"{statistics.median(ceilings):.2f} (rounds: {', '.join(f'{c:.2f}' for c in ceilings)})"
        )
    for name, samples in (("raw", raw_cpu), ("admission", admitted_cpu)):
        process = statistics.median(sample[0] for sample in samples) * 1000
        loop = statistics.median(sample[1] for sample in samples) * 1000
        print(f"CPU per job, {name:9s}: {process:.3f} ms in all, {loop:.3f} ms on the loop")
    for name, late in (("raw", raw_lag), ("admission", admitted_lag)):
        if late:
            print(f"loop lag, {name:9s}: {summary_ms(late)} ({len(late)} ticks)")


@contextmanager
def cpu_per_job(samples: list[tuple[float, float]], jobs: int) -> Iterator[None]:
    """Append (process CPU, this thread's CPU) per job spent inside the block."""
    process, thread = time.process_time(), time.thread_time()
    yield
    samples.append(((time.process_time() - process) / jobs, (time.thread_time() - thread) / jobs))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="publishes / submits in flight at once, both ways (default: one at a time)",
    )
    parser.add_argument(
        "--ceiling",
        action="store_true",
        help="also time the best the design allows: validate, a one-row transaction "
        "written as the ledger writes, a confirmed publish",
    )
    parser.add_argument(
        "--served",
        type=int,
        default=0,
        help="users of the tenant served once before the rounds (a big guild's history)",
    )
    parser.add_argument(
        "--lag",
        action="store_true",
        help="also measure how late a 1 ms sleep on the event loop wakes, during each side",
    )
    args = parser.parse_args()
    quiet_logs()
    asyncio.run(main(args.jobs, args.rounds, args.concurrency, args.ceiling, args.served, args.lag))
