"""The API's own connection to the ledger's SQLite file.

The API keeps its tables (API keys, request fingerprints for ``Idempotency-Key``) in the
ledger's file, so one backup holds everything a frontend knows, and reads the ledger's
``jobs`` table for what :class:`~jobs.ledger.Ledger` has no call for yet (jobs per lane
and status, a tenant's recent jobs). It never writes a ledger table.

A second connection is safe: the ledger runs in WAL mode, so readers never block its
writer, and ``busy_timeout`` covers the rare write of ours. sqlite3 blocks, so every
call runs in a worker thread, one at a time. The ledger must be opened first (it
creates the ``jobs`` table); a ``:memory:`` ledger cannot be shared, so the API needs a
file.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from jobs.ledger import JobRecord
from jobs.models import Failed, Job, JobStatus, Succeeded, parse_event, utcnow
from jobs.sql import insert_row

T = TypeVar("T")

#: Columns of a job row that :func:`_record` reads.
_RECORD_COLUMNS = "job_json, status, published, attempt, worker_id, terminal_json, updated_at"


class ApiDatabase:
    def __init__(self, path: Path | str) -> None:
        if str(path) == ":memory:":
            raise ValueError("the API shares the ledger's file: a :memory: ledger cannot be shared")
        self._path = Path(path)
        self._lock = threading.Lock()
        self._db: sqlite_utils.Database | None = None

    async def open(self) -> None:
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        connection = sqlite3.connect(self._path, check_same_thread=False)
        db = sqlite_utils.Database(connection)
        db.execute("PRAGMA busy_timeout = 5000")
        with db.conn:
            db.execute(
                "CREATE TABLE IF NOT EXISTS api_keys ("
                " key_id TEXT PRIMARY KEY,"
                " tenant TEXT NOT NULL,"
                " name TEXT,"
                " key_sha256 TEXT NOT NULL UNIQUE,"
                " created_at TEXT NOT NULL,"
                " revoked_at TEXT)"
            )
            db.execute("CREATE INDEX IF NOT EXISTS api_keys_tenant ON api_keys (tenant)")
            db.execute(
                "CREATE TABLE IF NOT EXISTS api_requests ("
                " idempotency_key TEXT PRIMARY KEY,"
                " fingerprint TEXT NOT NULL,"
                " job_id TEXT NOT NULL,"
                " created_at TEXT NOT NULL)"
            )
        self._db = db

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await asyncio.to_thread(db.conn.close)

    async def run(self, fn: Callable[[sqlite_utils.Database], T]) -> T:
        """Run ``fn`` with the connection in a worker thread, one call at a time."""

        def locked() -> T:
            if self._db is None:
                raise RuntimeError("the API database is not open")
            with self._lock:
                return fn(self._db)

        return await asyncio.to_thread(locked)

    async def ping(self) -> None:
        """Raise when the file cannot be read (for readiness)."""
        await self.run(lambda db: db.execute("SELECT COUNT(*) FROM jobs LIMIT 1").fetchone())

    async def job_counts(self) -> dict[tuple[str, str], int]:
        """Jobs queued and running, by ``(lane, status)``."""

        def count(db: sqlite_utils.Database) -> dict[tuple[str, str], int]:
            rows = db.execute(
                "SELECT lane, status, COUNT(*) FROM jobs WHERE status IN (?, ?) "
                "GROUP BY lane, status",
                [JobStatus.QUEUED.value, JobStatus.RUNNING.value],
            ).fetchall()
            return {(str(lane), str(status)): int(n) for lane, status, n in rows}

        return await self.run(count)

    async def recent(
        self, tenant: str, *, limit: int, status: JobStatus | None = None
    ) -> list[JobRecord]:
        """A tenant's API jobs, newest first."""

        def read(db: sqlite_utils.Database) -> list[JobRecord]:
            where = "frontend = 'api' AND tenant = ?"
            params: list[Any] = [tenant]
            if status is not None:
                where += " AND status = ?"
                params.append(status.value)
            cursor = db.execute(
                f"SELECT {_RECORD_COLUMNS} FROM jobs WHERE {where} "
                "ORDER BY created_at DESC LIMIT ?",
                [*params, limit],
            )
            columns = [column[0] for column in cursor.description]
            return [_record(dict(zip(columns, row, strict=True))) for row in cursor.fetchall()]

        return await self.run(read)

    async def fingerprint(self, idempotency_key: str) -> str | None:
        """The request fingerprint stored for ``idempotency_key``, if any."""

        def read(db: sqlite_utils.Database) -> str | None:
            row = db.execute(
                "SELECT fingerprint FROM api_requests WHERE idempotency_key = ?",
                [idempotency_key],
            ).fetchone()
            return None if row is None else str(row[0])

        return await self.run(read)

    async def remember(self, idempotency_key: str, fingerprint: str, job_id: str) -> str:
        """Store ``fingerprint`` for ``idempotency_key`` unless one is stored; return the
        stored one (which may be another request's)."""

        def write(db: sqlite_utils.Database) -> str:
            with db.conn:
                existing = db.execute(
                    "SELECT fingerprint FROM api_requests WHERE idempotency_key = ?",
                    [idempotency_key],
                ).fetchone()
                if existing is not None:
                    return str(existing[0])
                insert_row(
                    db,
                    "api_requests",
                    {
                        "idempotency_key": idempotency_key,
                        "fingerprint": fingerprint,
                        "job_id": job_id,
                        "created_at": utcnow().isoformat(),
                    },
                )
                return fingerprint

        return await self.run(write)


def _record(row: dict[str, Any]) -> JobRecord:
    terminal = parse_event(row["terminal_json"].encode()) if row["terminal_json"] else None
    if terminal is not None and not isinstance(terminal, Succeeded | Failed):
        raise ValueError("a terminal event must be succeeded or failed")
    return JobRecord(
        job=Job.model_validate_json(row["job_json"]),
        status=JobStatus(row["status"]),
        published=bool(row["published"]),
        attempt=row["attempt"],
        worker_id=row["worker_id"],
        terminal=terminal,
        updated_at=datetime.fromisoformat(row["updated_at"]),
    )
