"""A held job's position (``Ledger.position``) comes from the fair order of every held
job of its lane, ordered once for each state of the file (``Ledger._places``): every
queued job's card asks again and again, and a backlog takes long to order. Any change
to the file, by this ledger or another connection, orders again."""

from __future__ import annotations

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
