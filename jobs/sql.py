"""SQL helpers for the ledger's transactions."""

from __future__ import annotations

from typing import Any

import sqlite_utils


def insert_row(db: sqlite_utils.Database, table: str, row: dict[str, Any]) -> None:
    """INSERT without committing: sqlite-utils' own ``insert`` commits, which would split
    the transactions that must stay whole (a job row with its quota reservation)."""
    columns = ", ".join(f"[{column}]" for column in row)
    marks = ", ".join("?" for _ in row)
    db.execute(f"INSERT INTO [{table}] ({columns}) VALUES ({marks})", list(row.values()))
