"""A held job's position (``Ledger.position``) comes from the fair order of every held
job of its lane, ordered once for each state of the file (``Ledger._places``): every
queued job's card asks again and again, and a backlog takes long to order. Any change
to the file, by this ledger or another connection, orders again; but an order that took
long (a large backlog) answers for a while whatever changes (``POSITION_STALE_FACTOR``)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
import sqlite_utils

from jobs import ledger as ledger_module
from jobs.fairness import Tags, Waiting
from jobs.ledger import Ledger
from tests.fixtures.jobs import job


@pytest.fixture
def orders(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The lanes whose held jobs were read to be ordered, one entry per reading."""
    read: list[str] = []
    real = ledger_module._fair_state

    def counted(db: sqlite_utils.Database, lane: str) -> tuple[list[Waiting], Tags]:
        read.append(lane)
        return real(db, lane)

    monkeypatch.setattr(ledger_module, "_fair_state", counted)
    return read


async def test_the_cards_of_a_backlog_share_one_ordering(ledger: Ledger, orders: list[str]) -> None:
    # Two users of one guild: u0 has four jobs, u1 two; they take turns.
    jobs = [job(n, user=f"u{0 if n < 4 else 1}") for n in range(6)]
    for each in jobs:
        await ledger.admit(each, window=0)  # all held

    positions = [await ledger.position(each.job_id) for each in jobs]

    assert positions == [1, 3, 5, 6, 2, 4]
    assert orders == ["fast"]  # six positions, one ordering
    # A new job changes the file: the next position orders again, and sees it.
    newcomer = job(6, user="u2")
    await ledger.admit(newcomer, window=0)
    assert await ledger.position(newcomer.job_id) == 3  # after u0's and u1's first jobs
    assert await ledger.position(jobs[1].job_id) == 4
    assert orders == ["fast", "fast"]


async def test_another_connections_commit_orders_again(
    ledger: Ledger, tmp_path: Path, orders: list[str]
) -> None:
    """The API and the bot share the file through connections of their own."""
    mine = job(0, user="u0")
    second = job(1, user="u0")
    await ledger.admit(mine, window=0)
    await ledger.admit(second, window=0)
    assert await ledger.position(second.job_id) == 2

    other = Ledger(tmp_path / "ledger.sqlite3")
    await other.open()
    try:
        await other.admit(job(2, user="u1"), window=0)  # u1 goes before u0's second
    finally:
        await other.close()

    assert await ledger.position(second.job_id) == 3
    assert len(orders) == 2


async def test_a_commit_between_the_row_and_the_order_does_not_lose_the_job(
    ledger: Ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's row and the order are read in one snapshot of the file: another
    connection that publishes the job in between (another frontend's release) changes
    nothing for this answer, which says where the job stood."""
    first, second = job(0, user="u0"), job(1, user="u1")
    await ledger.admit(first, window=0)
    await ledger.admit(second, window=0)
    real = ledger_module._fair_state

    def published_meanwhile(db: sqlite_utils.Database, lane: str) -> tuple[list[Waiting], Tags]:
        other = sqlite3.connect(tmp_path / "ledger.sqlite3")
        with other:
            other.execute("UPDATE jobs SET published = 1 WHERE job_id = ?", [second.job_id])
        other.close()
        return real(db, lane)

    monkeypatch.setattr(ledger_module, "_fair_state", published_meanwhile)
    assert await ledger.position(second.job_id) == 2
    monkeypatch.setattr(ledger_module, "_fair_state", real)
    assert await ledger.position(second.job_id) == 1  # now published: first at the broker


@pytest.fixture
def slow_orders(monkeypatch: pytest.MonkeyPatch) -> float:
    """Every order counts as a large backlog's: it answers for WHILE seconds whatever
    changes meanwhile (``POSITION_STALE_FACTOR``). Returns WHILE."""
    _keep_orders(monkeypatch, WHILE)
    monkeypatch.setattr(ledger_module, "POSITION_RENEW_FACTOR", 1e9)
    return WHILE


def _keep_orders(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Every order from now on counts as a large backlog's and answers for ``seconds``."""
    monkeypatch.setattr(ledger_module, "POSITION_EXACT_HELD", 0)
    monkeypatch.setattr(ledger_module, "POSITION_STALE_FACTOR", 1e9)
    monkeypatch.setattr(ledger_module, "POSITION_STALE_MAX_SECONDS", seconds)


#: How long an order answers in the tests that shorten it (long enough for a few calls
#: on a loaded machine).
WHILE = 2.0


async def test_a_large_backlogs_order_answers_for_a_while_whatever_changes(
    ledger: Ledger, orders: list[str], slow_orders: float
) -> None:
    """With a large backlog, ordering again for every change took the whole worker
    thread once thousands of cards asked (``bench.positions``): for a while the order
    answers from memory, and a job held since waits for the next one."""
    jobs = [job(n, user=f"u{0 if n < 4 else 1}") for n in range(6)]
    for each in jobs:
        await ledger.admit(each, window=0)
    assert await ledger.position(jobs[1].job_id) == 3
    newcomer = job(6, user="u2")
    await ledger.admit(newcomer, window=0)  # u2's job goes before u0's second
    loop = asyncio.get_running_loop()
    began = loop.time()

    assert await ledger.position(jobs[1].job_id) == 3  # as the order was made
    assert orders == ["fast"]
    assert await ledger.position(newcomer.job_id) == 3  # once the next order is made
    assert loop.time() - began >= slow_orders * 0.5
    assert await ledger.position(jobs[1].job_id) == 4
    assert orders == ["fast", "fast"]


async def test_a_job_held_since_has_the_next_order_made_once_renewing_is_due(
    ledger: Ledger, orders: list[str], slow_orders: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next order may be made sooner than the last stops answering
    (``POSITION_RENEW_FACTOR``): a job held since then need not wait as long."""
    monkeypatch.setattr(ledger_module, "POSITION_RENEW_FACTOR", 0)
    jobs = [job(n, user=f"u{0 if n < 4 else 1}") for n in range(6)]
    for each in jobs:
        await ledger.admit(each, window=0)
    assert await ledger.position(jobs[1].job_id) == 3
    newcomer = job(6, user="u2")
    await ledger.admit(newcomer, window=0)

    assert await ledger.position(jobs[1].job_id) == 3  # the order still answers
    assert await ledger.position(newcomer.job_id) == 3  # at once: a new order
    assert await ledger.position(jobs[1].job_id) == 4  # which now answers
    assert orders == ["fast", "fast"]


async def test_a_kept_order_answers_what_an_exact_one_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An order that answers for a while keeps every queued job's position, released
    ones included (per model, with model affinity): the same as each read alone."""
    ledger = Ledger(tmp_path / "ledger.sqlite3", per_model=True)
    await ledger.open()
    try:
        models = [None, "a.safetensors", "b.safetensors"]
        jobs = [job(n, models[n % 3], user=f"u{n % 4}") for n in range(24)]
        for each in jobs:
            await ledger.admit(each, window=0)
        for record in (await ledger.release("fast", 3)).records:  # some released of each
            await ledger.mark_published(record.job.job_id)
        exact = [await ledger.position(each.job_id) for each in jobs]

        _keep_orders(monkeypatch, 60.0)
        passing = job(99, user="u9")
        await ledger.admit(passing, window=0)  # a change: ordered again
        await ledger.forget(passing.job_id)
        kept = [await ledger.position(each.job_id) for each in jobs]
        assert ledger._kept_position(jobs[0].job_id) is not None  # answered from memory
    finally:
        await ledger.close()
    assert None not in exact and len(set(exact)) > 3
    assert kept == exact
