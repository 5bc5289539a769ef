"""SQLite for asyncio code: one file, one connection, one call at a time in a thread.

The ledger, the API's tables and the bot's message store all live in the same file, each
through a :class:`SqliteFile`. sqlite3 blocks, so every call runs in a worker thread,
one at a time under a lock. WAL lets the connections read while one writes.

Two exceptions keep the hot path short (``docs/architecture.md``, "The ledger's file"):

- A short write transaction its caller waits for (an admission) may run on the event
  loop's thread itself (:meth:`SqliteFile.run_now`) when nothing makes it wait: the hop
  to a worker thread and back costs more than such a transaction.
- No call checkpoints the WAL (copies its pages into the file, then waits for the disk):
  a second connection does, in a worker thread, every :data:`CHECKPOINT_CALLS` calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils
import structlog

T = TypeVar("T")

log = structlog.get_logger(__name__)

#: How long a call in a worker thread waits for another connection's write lock.
BUSY_TIMEOUT_MS = 5000

#: A checkpoint (in a worker thread, on a connection of its own) after this many calls.
#: An admission writes about 17 pages, most of them the same from one admission to the
#: next (each table's and index's last leaf): a checkpoint copies each page once, so
#: rarer checkpoints copy less (SQLite's default, 1,000 pages, is one every ~60
#: admissions). The WAL then holds up to about 35 MB.
CHECKPOINT_CALLS = 500

_WAIT = f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}"
_NO_WAIT = "PRAGMA busy_timeout = 0"

#: SQLite's primary result code for "database is locked" (extended codes add high bits).
SQLITE_BUSY = 5


class FileBusy(Exception):
    """:meth:`SqliteFile.run_now` would have to wait: run the call with :meth:`SqliteFile.run`."""


class SqliteFile:
    """``path`` (or ``:memory:``), opened with ``setup`` creating what its owner needs."""

    def __init__(
        self, path: Path | str, name: str, setup: Callable[[sqlite_utils.Database], None]
    ) -> None:
        self.path = str(path)
        self._name = name
        self._setup = setup
        self._lock = threading.Lock()
        self._db: sqlite_utils.Database | None = None
        #: The WAL's checkpoints (:meth:`_checkpoint`): their connection, the calls since
        #: the last one began, and the one in flight.
        self._checkpointer: sqlite3.Connection | None = None
        self._checkpointer_lock = threading.Lock()
        self._calls = 0
        self._checkpointing: asyncio.Future[None] | None = None
        #: The connection's busy timeout is BUSY_TIMEOUT_MS (else 0: run_now's).
        self._waits = True

    async def open(self) -> None:
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite_utils.Database(sqlite3.connect(self.path, check_same_thread=False))
        if self.path != ":memory:":
            db.enable_wal()
            # WAL with NORMAL stays consistent on a crash; a power cut may lose the last
            # commits (the broker still holds those jobs).
            db.execute("PRAGMA synchronous = NORMAL")
            # Checkpoints are _checkpoint's: one at a commit would stall that caller
            # (several ms), on the event loop when it runs there.
            db.execute("PRAGMA wal_autocheckpoint = 0")
            self._checkpointer = sqlite3.connect(self.path, check_same_thread=False)
        db.execute(_WAIT)
        # Temporary data in memory: each admission's savepoint (Ledger.admit) otherwise
        # creates, writes and deletes a sub-journal file in /var/tmp, about 0.1 ms a job.
        db.execute("PRAGMA temp_store = MEMORY")
        self._setup(db)
        self._db = db

    async def close(self) -> None:
        """Close after the call in flight: a cancelled caller's thread may still be inside
        sqlite3, and closing the connection under it crashes the process. Safe twice."""

        def close() -> None:
            with self._lock:
                db, self._db = self._db, None
                if db is not None:
                    db.conn.close()
            with self._checkpointer_lock:
                checkpointer, self._checkpointer = self._checkpointer, None
                if checkpointer is not None:
                    checkpointer.close()

        if self._checkpointing is not None:  # one under way: let it end first
            await asyncio.gather(self._checkpointing, return_exceptions=True)
        await asyncio.to_thread(close)

    async def run(self, fn: Callable[[sqlite_utils.Database], T]) -> T:
        """Run ``fn`` with the connection in a worker thread, one call at a time."""
        self._count_call()

        def locked() -> T:
            with self._lock:
                db = self._connection()
                if not self._waits:
                    db.execute(_WAIT)
                    self._waits = True
                return fn(db)

        return await asyncio.to_thread(locked)

    def run_now(self, fn: Callable[[sqlite_utils.Database], T]) -> T:
        """Run ``fn``, a short write transaction (:func:`immediate`) its caller waits for,
        here on the event loop's thread, if it need not wait: no other call holds the
        connection, and the file's write lock is free (it is not waited for). Raises
        :class:`FileBusy` otherwise, with nothing written: the caller then goes through
        :meth:`run`. No commit here checkpoints the WAL, so such a call writes the WAL
        (the page cache) and never waits for the disk."""
        self._count_call()
        if not self._lock.acquire(blocking=False):
            raise FileBusy(f"{self._name} is in use")
        try:
            db = self._connection()
            if self._waits:
                db.execute(_NO_WAIT)
                self._waits = False
            try:
                return fn(db)
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF != SQLITE_BUSY:
                    raise
                if db.conn.in_transaction:  # fn left it open: nothing may stay written
                    db.conn.rollback()
                raise FileBusy(f"{self._name} is locked by another connection") from exc
        finally:
            self._lock.release()

    def _connection(self) -> sqlite_utils.Database:
        """The open connection (call with the lock held)."""
        if self._db is None:
            raise RuntimeError(f"{self._name} is not open")
        return self._db

    def _count_call(self) -> None:
        self._calls += 1
        if self._calls >= CHECKPOINT_CALLS and self._checkpointer is not None:
            self._start_checkpoint()

    def _start_checkpoint(self) -> None:
        """Checkpoint in a worker thread, unless one is under way."""
        if self._checkpointing is not None and not self._checkpointing.done():
            return
        self._calls = 0
        self._checkpointing = asyncio.get_running_loop().run_in_executor(None, self._checkpoint)

    def _checkpoint(self) -> None:
        """Copy what the WAL holds into the file, as far as readers allow (``PASSIVE``: it
        waits for no connection, and writers go on meanwhile)."""
        with self._checkpointer_lock:
            if self._checkpointer is None:  # closed
                return
            try:
                self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error as exc:  # the next one goes on from where this one stopped
                log.warning("sqlite.checkpoint_failed", file=self._name, error=str(exc))


def insert_row(db: sqlite_utils.Database, table: str, row: dict[str, Any]) -> None:
    """INSERT with the row's columns as given. Inside ``db.atomic()`` it is part of that
    transaction (a job row with its quota reservation); ``Table.insert`` would first
    look at the table's schema and may add columns."""
    db.execute(_insert_sql(table, tuple(row)), list(row.values()))


@functools.cache
def _insert_sql(table: str, columns: tuple[str, ...]) -> str:
    """The INSERT of these columns (a few shapes, each built once: an admission makes three)."""
    names = ", ".join(f"[{column}]" for column in columns)
    return f"INSERT INTO [{table}] ({names}) VALUES ({', '.join('?' for _ in columns)})"


@contextlib.contextmanager
def immediate(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """A write transaction that takes the file's write lock at once (``BEGIN IMMEDIATE``).

    Several connections write to the one file (the ledger, the API's tables, the bot's
    messages). A deferred transaction that reads and then writes cannot wait for another
    connection's commit: SQLite answers "database is locked" at once. Taking the write
    lock first lets ``busy_timeout`` do its work."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.conn.rollback()
        raise
    commit(db)


@contextlib.contextmanager
def snapshot(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """A read transaction: the reads inside see one state of the file, whatever other
    connections commit meanwhile (WAL keeps the snapshot). It writes nothing and ends
    with a rollback."""
    db.execute("BEGIN")
    try:
        yield db
    finally:
        db.conn.rollback()


def commit(db: sqlite_utils.Database) -> None:
    """COMMIT, or roll back when the commit fails (a full disk, an I/O error): the
    transaction must not stay open under the next caller's ``BEGIN``."""
    try:
        db.execute("COMMIT")
    except BaseException:
        db.conn.rollback()
        raise
