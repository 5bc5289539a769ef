"""The API's own connection to the ledger's SQLite file.

The API keeps its tables (API keys, request fingerprints for ``Idempotency-Key``) in the
ledger's file, so one backup holds everything a frontend knows; jobs are read through the
:class:`~jobs.ledger.Ledger`. A second connection is safe: the file is in WAL mode, and
``busy_timeout`` covers the rare write of ours. The ledger must be opened first (it
creates the ``jobs`` table); a ``:memory:`` ledger cannot be shared, so the API needs a
file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import sqlite_utils

from jobs.models import utcnow
from jobs.sql import SqliteFile, immediate, insert_row

T = TypeVar("T")


class ApiDatabase:
    def __init__(self, path: Path | str) -> None:
        if str(path) == ":memory:":
            raise ValueError("the API shares the ledger's file: a :memory: ledger cannot be shared")
        self._file = SqliteFile(path, "the API database", _create_tables)
        self.run = self._file.run

    async def open(self) -> None:
        await self._file.open()

    async def close(self) -> None:
        await self._file.close()

    async def ping(self) -> None:
        """Raise when the file cannot be read (for readiness)."""
        await self.run(lambda db: db.execute("SELECT COUNT(*) FROM jobs LIMIT 1").fetchone())

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
            with immediate(db):
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


def _create_tables(db: sqlite_utils.Database) -> None:
    with immediate(db):
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
