"""How ``jobs/sql.py`` opens an SQLite file (WAL, ``synchronous = NORMAL``, a busy
timeout, temporary data in memory: an admission's savepoint would otherwise write a
sub-journal file per job), where its calls run (a worker thread; a short transaction
on the event loop's thread when nothing makes it wait), and who checkpoints the WAL
(a connection of its own, in a worker thread, never a caller)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import sqlite_utils

from jobs import sql
from jobs.sql import FileBusy, SqliteFile, immediate


def _nothing(db: sqlite_utils.Database) -> None:
    del db


async def test_a_file_is_opened_for_many_small_write_transactions(tmp_path: Path) -> None:
    file = SqliteFile(tmp_path / "data.sqlite3", "the test file", _nothing)
    await file.open()
    try:
        settings = await file.run(
            lambda db: {
                pragma: db.execute(f"PRAGMA {pragma}").fetchone()[0]
                for pragma in (
                    "journal_mode",
                    "synchronous",
                    "busy_timeout",
                    "temp_store",
                    "wal_autocheckpoint",
                )
            }
        )
    finally:
        await file.close()
    # synchronous 1 = NORMAL; temp_store 2 = MEMORY; no checkpoint at a commit.
    assert settings == {
        "journal_mode": "wal",
        "synchronous": 1,
        "busy_timeout": 5000,
        "temp_store": 2,
        "wal_autocheckpoint": 0,
    }


def _table(db: sqlite_utils.Database) -> None:
    db.execute("CREATE TABLE IF NOT EXISTS items (n INTEGER, payload TEXT)")


@pytest.fixture
async def file(tmp_path: Path) -> AsyncIterator[SqliteFile]:
    opened = SqliteFile(tmp_path / "data.sqlite3", "the test file", _table)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


def _insert(n: int) -> Callable[[sqlite_utils.Database], tuple[int, int]]:
    """A write transaction that says which thread ran it, and how many rows it saw."""

    def write(db: sqlite_utils.Database) -> tuple[int, int]:
        with immediate(db):
            db.execute("INSERT INTO items (n, payload) VALUES (?, ?)", [n, "x" * 3000])
            (count,) = db.execute("SELECT COUNT(*) FROM items").fetchone()
        return threading.get_ident(), int(count)

    return write


async def test_a_short_transaction_runs_on_the_loops_thread_when_nothing_holds_the_file(
    file: SqliteFile,
) -> None:
    loop_thread = threading.get_ident()
    now_thread, _ = file.run_now(_insert(1))
    other_thread, count = await file.run(_insert(2))
    assert now_thread == loop_thread  # no hop to a worker thread and back
    assert other_thread != loop_thread  # every other call still goes to a thread
    assert count == 2
    # run_now does not wait for a lock; the calls in a thread still do.
    assert await file.run(lambda db: db.execute("PRAGMA busy_timeout").fetchone()[0]) == 5000


async def test_a_short_transaction_never_waits_on_the_loop_for_another_writer(
    file: SqliteFile,
) -> None:
    """Another connection holds the file's write lock and lets go of it 0.3 s later:
    ``run_now`` does not wait for that (FileBusy at once, nothing written); ``run``
    waits in a worker thread, and writes once."""
    other = sqlite3.connect(file.path, isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO items (n, payload) VALUES (0, 'other')")
        timer = threading.Timer(0.3, other.execute, ["COMMIT"])
        timer.start()
        with pytest.raises(FileBusy, match="locked by another connection"):
            file.run_now(_insert(1))
        thread, count = await file.run(_insert(1))
        timer.join()
    finally:
        other.close()
    assert thread != threading.get_ident()
    assert count == 2  # the other's row and this one, not written twice


async def test_a_short_transaction_waits_for_a_call_in_flight_in_a_thread(
    file: SqliteFile,
) -> None:
    """The connection is one: while a call runs in a worker thread, ``run_now`` does not
    wait for it on the loop."""
    started = threading.Event()

    def slow(db: sqlite_utils.Database) -> None:
        started.set()
        db.execute("SELECT COUNT(*) FROM items").fetchone()
        threading.Event().wait(0.2)

    call = asyncio.ensure_future(file.run(slow))
    await asyncio.to_thread(started.wait, 5)
    with pytest.raises(FileBusy, match="in use"):
        file.run_now(_insert(1))
    await call
    assert file.run_now(_insert(1))[1] == 1  # nothing was written by the refused call


async def test_a_worker_thread_checkpoints_the_wal_every_so_many_calls(
    file: SqliteFile,
) -> None:
    """No caller's commit copies the WAL into the file; a checkpoint in a worker thread
    does, once :data:`~jobs.sql.CHECKPOINT_CALLS` calls have been made."""
    path = Path(file.path)
    for n in range(sql.CHECKPOINT_CALLS - 2):
        file.run_now(_insert(n))
    before = _size(path)
    assert before < 100 * 1024  # the rows are all in the WAL (about 3 KB each)
    for n in range(4):
        file.run_now(_insert(n))
    async with asyncio.timeout(10):
        while _size(path) < sql.CHECKPOINT_CALLS * 3000:
            await asyncio.sleep(0.01)
    assert _size(path) > before


def _size(path: Path) -> int:
    """The database file's size, without its WAL (a stat: too short to hand a thread)."""
    return path.stat().st_size


async def test_a_commit_that_fails_leaves_no_transaction_open(file: SqliteFile) -> None:
    """A COMMIT can fail (here a deferred foreign key; a full disk in the field): the
    transaction is rolled back, so the next caller's ``BEGIN`` works."""

    def setup(db: sqlite_utils.Database) -> None:
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("CREATE TABLE parents (id INTEGER PRIMARY KEY)")
        db.execute(
            "CREATE TABLE children (parent INTEGER REFERENCES parents (id) "
            "DEFERRABLE INITIALLY DEFERRED)"
        )

    def orphan(db: sqlite_utils.Database) -> None:
        with immediate(db):
            db.execute("INSERT INTO children (parent) VALUES (7)")  # checked at COMMIT

    await file.run(setup)
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        await file.run(orphan)
    assert await file.run(lambda db: db.conn.in_transaction) is False
    _, count = file.run_now(_insert(1))
    assert count == 1
    assert await file.run(lambda db: db.execute("SELECT COUNT(*) FROM children").fetchone()) == (0,)
