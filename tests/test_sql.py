"""How ``jobs/sql.py`` opens an SQLite file: WAL, ``synchronous = NORMAL``, a busy
timeout, and temporary data in memory (an admission's savepoint would otherwise write a
sub-journal file per job)."""

from __future__ import annotations

from pathlib import Path

import sqlite_utils

from jobs.sql import SqliteFile


def _nothing(db: sqlite_utils.Database) -> None:
    del db


async def test_a_file_is_opened_for_many_small_write_transactions(tmp_path: Path) -> None:
    file = SqliteFile(tmp_path / "data.sqlite3", "the test file", _nothing)
    await file.open()
    try:
        settings = await file.run(
            lambda db: {
                pragma: db.execute(f"PRAGMA {pragma}").fetchone()[0]
                for pragma in ("journal_mode", "synchronous", "busy_timeout", "temp_store")
            }
        )
    finally:
        await file.close()
    # synchronous 1 = NORMAL; temp_store 2 = MEMORY.
    assert settings == {
        "journal_mode": "wal",
        "synchronous": 1,
        "busy_timeout": 5000,
        "temp_store": 2,
    }
