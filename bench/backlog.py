"""The ledger's time per admission and per release while fair release holds a backlog.

Run from the repository root::

    .venv/bin/python -m bench.backlog [--backlogs 0,1000,10000] [--window 16] [--samples 300]
        [--per-model] [--users 200]

For each backlog size a fresh ledger (an SQLite file in a temporary folder) holds that
many jobs from ``--users`` users (200; as many as the backlog: each held job another
user's) of 10 tenants, and ``--window`` jobs are released and confirmed,
so the window is full, as in a frontend whose users submit faster than its renderers
take jobs. Then it times, from the event loop:

* **admit**: ``Ledger.admit`` of a new job with the window full (the job is held: the
  insert, its history row, the quota-free path, and the window's count; with
  ``--per-model``, model affinity's windows per model, a claim too: the held jobs'
  index read and the order); meanwhile, how late a 1 ms sleep on the loop wakes (the
  admission's transaction runs on the loop when its lane's backlog is short,
  ``jobs/sql.py``);
* **release**: a renderer takes one published job (an ``accepted`` event, untimed), and
  ``Ledger.release`` claims the next job in fair order (the window's count, the held
  jobs and the tags read, the claim written; its publish is not part of this);
* **position**: a new job is held (untimed), and ``Ledger.position`` tells its place
  (every held job read and ordered, as a queued job's card asks after each change);
  **again**: the same at once, with nothing changed (the order kept).

It prints the median, p90 and longest of each, per backlog size. No broker is involved.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from bench.common import loop_lag, summary_ms
from jobs.ledger import Ledger
from jobs.models import Accepted, Job, Origin


def held_job(n: int, users: int = 200) -> Job:
    """The bench's n-th job: from one of ``users`` users in turn, of 10 tenants."""
    user = n % users
    return Job(
        workflow="sd15-txt2img",
        lane="fast",
        params={"prompt": f"job {n}", "seed": n},
        origin=Origin(frontend="api", reply_to="bench", tenant=f"t{user % 10}", user=f"u{user}"),
        idempotency_key=f"job-{n}",
    )


async def fill(
    ledger: Ledger, backlog: int, window: int, users: int
) -> tuple[list[Job], list[str]]:
    """Hold ``backlog`` jobs of ``users`` users in ``ledger``, behind ``window`` of them
    released and confirmed: every job admitted, and the ids of those released."""
    held = [held_job(n, users) for n in range(backlog + window)]
    for job in held:
        await ledger.admit(job, window=0)
    published = [record.job.job_id for record in (await ledger.release("fast", window)).records]
    for job_id in published:
        ledger.confirmed(job_id)
    await ledger.flush()
    return held, published


async def take_and_release(ledger: Ledger, window: int, published: list[str]) -> float:
    """A renderer takes the first of ``published`` (an ``accepted`` event, untimed), and
    the next jobs are released and confirmed (added to ``published``); how long the
    release took."""
    taken = published.pop(0)
    await ledger.apply(Accepted(job_id=taken, attempt=1, worker_id="bench", seq=0))
    began = time.perf_counter()
    claim = await ledger.release("fast", window)
    took = time.perf_counter() - began
    for record in claim.records:
        ledger.confirmed(record.job.job_id)
        published.append(record.job.job_id)
    return took


async def measure(
    backlog: int, window: int, samples: int, per_model: bool = False, users: int = 200
) -> tuple[list[float], list[float], list[float], list[float], list[float]]:
    """Admissions' and releases' times, how late the loop ran during the admissions, and
    the positions' times (after a change, and again)."""
    with tempfile.TemporaryDirectory() as folder:
        ledger = Ledger(Path(folder) / "ledger.sqlite3", per_model=per_model)
        await ledger.open()
        try:
            _, published = await fill(ledger, backlog, window, users)

            admits: list[float] = []
            late: list[float] = []
            async with loop_lag(late):
                for n in range(samples):
                    began = time.perf_counter()
                    await ledger.admit(held_job(1_000_000 + n, users), window=window)
                    admits.append(time.perf_counter() - began)

            releases: list[float] = []
            for _ in range(samples):
                releases.append(await take_and_release(ledger, window, published))
                await ledger.flush()

            # A queued job's card asks for its position after each change (orders the
            # backlog), and again before the next one (the order kept).
            positions: list[float] = []
            again: list[float] = []
            for n in range(samples):
                newest = held_job(2_000_000 + n, users)
                await ledger.admit(newest, window=0)  # held: a change to the file
                for times in (positions, again):
                    began = time.perf_counter()
                    await ledger.position(newest.job_id)
                    times.append(time.perf_counter() - began)
            return admits, releases, late, positions, again
        finally:
            await ledger.close()


async def main(
    backlogs: list[int], window: int, samples: int, per_model: bool = False, users: int = 200
) -> None:
    print(
        f"window {window}{' per model' if per_model else ''}, {users} users, {samples} samples each"
    )
    for backlog in backlogs:
        admits, releases, late, positions, again = await measure(
            backlog, window, samples, per_model, users
        )
        print(
            f"backlog {backlog:6d}: admit   {summary_ms(admits, 90)}; the loop ran up to "
            f"{max(late, default=0) * 1000:.2f} ms late"
        )
        print(f"{'':15s} release {summary_ms(releases, 90)}")
        print(f"{'':15s} position {summary_ms(positions, 90)}")
        print(f"{'':15s} again   {summary_ms(again, 90)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlogs", default="0,1000,10000")
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument(
        "--per-model",
        action="store_true",
        help="windows per model, as with model affinity (the services' default)",
    )
    parser.add_argument(
        "--users",
        type=int,
        default=200,
        help="the users the jobs come from, in turn (as many as the backlog: each held "
        "job another user's)",
    )
    args = parser.parse_args()
    asyncio.run(
        main(
            [int(b) for b in args.backlogs.split(",")],
            args.window,
            args.samples,
            args.per_model,
            args.users,
        )
    )
