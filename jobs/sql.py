"""SQLite for asyncio code: one file, one connection, one call at a time in a thread.

The ledger, the API's tables and the bot's message store all live in the same file, each
through a :class:`SqliteFile`. sqlite3 blocks, so every call runs in a worker thread,
one at a time under a lock. WAL lets the connections read while one writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

T = TypeVar("T")


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
        db.execute("PRAGMA busy_timeout = 5000")
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

        await asyncio.to_thread(close)

    async def run(self, fn: Callable[[sqlite_utils.Database], T]) -> T:
        """Run ``fn`` with the connection in a worker thread, one call at a time."""

        def locked() -> T:
            with self._lock:
                if self._db is None:
                    raise RuntimeError(f"{self._name} is not open")
                return fn(self._db)

        return await asyncio.to_thread(locked)


def insert_row(db: sqlite_utils.Database, table: str, row: dict[str, Any]) -> None:
    """INSERT with the row's columns as given. Inside ``db.atomic()`` it is part of that
    transaction (a job row with its quota reservation); ``Table.insert`` would first
    look at the table's schema and may add columns."""
    columns = ", ".join(f"[{column}]" for column in row)
    marks = ", ".join("?" for _ in row)
    db.execute(f"INSERT INTO [{table}] ({columns}) VALUES ({marks})", list(row.values()))


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
    db.execute("COMMIT")
