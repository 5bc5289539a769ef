"""SQL helpers for the ledger's transactions."""

from __future__ import annotations

from typing import Any

import sqlite_utils


def insert_row(db: sqlite_utils.Database, table: str, row: dict[str, Any]) -> None:
    """INSERT with the row's columns as given. Inside ``db.atomic()`` it is part of that
    transaction (a job row with its quota reservation); ``Table.insert`` would first
    look at the table's schema and may add columns."""
    columns = ", ".join(f"[{column}]" for column in row)
    marks = ", ".join("?" for _ in row)
    db.execute(f"INSERT INTO [{table}] ({columns}) VALUES ({marks})", list(row.values()))
