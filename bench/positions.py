"""Queued jobs' cards asking for their positions while jobs come and go, at a backlog.

Run from the repository root::

    .venv/bin/python -m bench.positions [--backlogs 1000,10000] [--every 10] [--seconds 30]
        [--admit 4] [--release 4] [--users N] [--per-model]

For each backlog size a fresh ledger (an SQLite file in a temporary folder) holds that
many jobs from ``--users`` users (as many as the backlog by default: each held job
another user's, as under the default limits) of 10 tenants, with a window of 16
released and confirmed. Then, for ``--seconds``, as in a frontend with that backlog:

* every held job has a card that asks ``Ledger.position`` for its place every
  ``--every`` seconds (the bot's ``POSITION_REFRESH_SECONDS``; the API's event stream
  asks every second), the cards' first asks spread over the first period;
* ``--admit`` jobs a second are admitted (``Ledger.admit`` with the window full: held),
  each followed, in a task of its own, by its first card's position (``bot/flow.py``
  shows it at once), timed apart as "first";
* ``--release`` jobs a second are taken by a renderer (an ``accepted`` event) and the
  next released (``Ledger.release``, its confirm written).

Every admission, release and event changes the file. It prints, per backlog: how long
admissions, releases and positions took (median, p99, longest), how many positions were
answered against how many the cards would have asked for, and the process's CPU time
per second. No broker is involved.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from bench.backlog import fill, held_job, take_and_release
from bench.common import quiet_logs, summary_ms
from jobs.ledger import Ledger

WINDOW = 16


async def _every(period: float, until: float, one: Callable[[], Awaitable[None]]) -> None:
    """Call ``one`` every ``period`` seconds (from when the last call began) until ``until``."""
    loop = asyncio.get_running_loop()
    while (began := loop.time()) < until:
        await one()
        await asyncio.sleep(max(0.0, min(until, began + period) - loop.time()))


@dataclass(frozen=True)
class Load:
    """What the frontend is asked for (the command line's options)."""

    users: int | None
    every: float
    seconds: float
    admit: float
    release: float
    per_model: bool


async def measure(backlog: int, load: Load) -> None:
    users, every, seconds = load.users or backlog, load.every, load.seconds
    admit, release, per_model = load.admit, load.release, load.per_model
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory() as folder:
        ledger = Ledger(Path(folder) / "ledger.sqlite3", per_model=per_model)
        await ledger.open()
        try:
            held, published = await fill(ledger, backlog, WINDOW, users)
            released = set(published)
            cards = [job.job_id for job in held if job.job_id not in released]

            admits: list[float] = []
            releases: list[float] = []
            positions: list[float] = []
            until = loop.time() + seconds

            async def card(job_id: str) -> None:
                offset = random.uniform(0, every)
                if loop.time() + offset >= until:
                    return  # its first ask would come after the end
                await asyncio.sleep(offset)

                async def ask() -> None:
                    began = time.perf_counter()
                    await ledger.position(job_id)
                    positions.append(time.perf_counter() - began)

                await _every(every, until, ask)

            numbers = iter(range(1_000_000, 2_000_000))
            firsts: list[asyncio.Task[None]] = []
            first_positions: list[float] = []

            async def admit_one() -> None:
                job = held_job(next(numbers), users)
                began = time.perf_counter()
                _, _, claim = await ledger.admit(job, window=WINDOW)
                admits.append(time.perf_counter() - began)
                for record in claim.records:  # a renderer took one meanwhile: room
                    ledger.confirmed(record.job.job_id)
                    published.append(record.job.job_id)
                firsts.append(asyncio.create_task(first_card(job.job_id)))

            async def first_card(job_id: str) -> None:
                began = time.perf_counter()
                await ledger.position(job_id)
                took = time.perf_counter() - began
                positions.append(took)
                first_positions.append(took)

            async def release_one() -> None:
                if published:
                    releases.append(await take_and_release(ledger, WINDOW, published))

            cpu = time.process_time()
            began = loop.time()
            async with asyncio.TaskGroup() as group:
                for job_id in cards:
                    group.create_task(card(job_id))
                if admit > 0:
                    group.create_task(_every(1 / admit, until, admit_one))
                if release > 0:
                    group.create_task(_every(1 / release, until, release_one))
            await asyncio.gather(*firsts)
            took = loop.time() - began
            cpu = (time.process_time() - cpu) / took
        finally:
            await ledger.close()
    asked = len(cards) * seconds / every + len(admits)
    print(f"backlog {backlog:6d}: admit    {summary_ms(admits)} ({len(admits)})")
    print(f"{'':15s} release  {summary_ms(releases)} ({len(releases)})")
    print(f"{'':15s} position {summary_ms(positions)}")
    print(f"{'':15s} first    {summary_ms(first_positions)} (a new job's, after its admission)")
    print(
        f"{'':15s} positions answered {len(positions)} of about {asked:.0f} asked; "
        f"{took:.1f} s for {seconds:.0f}; CPU {cpu:.2f} s a second"
    )


async def main(backlogs: list[int], load: Load) -> None:
    print(
        f"window {WINDOW}{' per model' if load.per_model else ''}; a card asks every "
        f"{load.every} s; {load.admit} admissions and {load.release} releases a second; "
        f"{load.seconds} s"
    )
    for backlog in backlogs:
        await measure(backlog, load)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlogs", default="1000,10000")
    parser.add_argument("--users", type=int, default=None, help="default: one per held job")
    parser.add_argument("--every", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--admit", type=float, default=4.0)
    parser.add_argument("--release", type=float, default=4.0)
    parser.add_argument("--per-model", action="store_true")
    args = parser.parse_args()
    quiet_logs()
    load = Load(args.users, args.every, args.seconds, args.admit, args.release, args.per_model)
    asyncio.run(main([int(b) for b in args.backlogs.split(",")], load))
