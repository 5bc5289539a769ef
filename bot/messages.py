"""Which Discord message shows which job: the bot's own table in the ledger's SQLite file.

The ``Ledger`` (``jobs/``) is not the bot's, so the bot opens its own sqlite-utils
connection to the same file (WAL: both may write) and keeps the same discipline: every
call in a worker thread, one at a time. A row is written as soon as a job's message
exists and marked done after its final edit, so a restarted bot knows which messages
it still owes an edit (:meth:`MessageStore.pending`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from jobs.models import utcnow
from jobs.sql import SqliteFile, immediate

T = TypeVar("T")

TABLE = "discord_messages"


@dataclass(frozen=True, slots=True)
class JobMessage:
    """The channel message that shows one job."""

    job_id: str
    channel_id: int
    message_id: int
    guild_id: int | None
    user_id: int
    #: The interaction's upload limit, for the result image after a restart.
    attachment_limit: int
    done: bool


class MessageStore:
    def __init__(self, path: Path | str) -> None:
        self._file = SqliteFile(path, "the message store", _create_table)
        self._run = self._file.run

    async def open(self) -> None:
        await self._file.open()

    async def close(self) -> None:
        await self._file.close()

    async def save(self, message: JobMessage) -> None:
        row = {
            "job_id": message.job_id,
            "channel_id": message.channel_id,
            "message_id": message.message_id,
            "guild_id": message.guild_id,
            "user_id": message.user_id,
            "attachment_limit": message.attachment_limit,
            "done": int(message.done),
            "created_at": utcnow().isoformat(),
        }

        def save(db: sqlite_utils.Database) -> None:
            with immediate(db):
                db.table(TABLE).upsert(row, pk="job_id")

        await self._run(save)

    async def get(self, job_id: str) -> JobMessage | None:
        def get(db: sqlite_utils.Database) -> JobMessage | None:
            rows = list(db.table(TABLE).rows_where("job_id = ?", [job_id]))
            return _message(rows[0]) if rows else None

        return await self._run(get)

    async def mark_done(self, job_id: str) -> None:
        def mark(db: sqlite_utils.Database) -> None:
            with immediate(db):
                db.execute(f"UPDATE {TABLE} SET done = 1 WHERE job_id = ?", [job_id])

        await self._run(mark)

    async def pending(self) -> list[JobMessage]:
        """Messages whose final edit has not been made yet, oldest first."""
        return await self._run(
            lambda db: [
                _message(row)
                for row in db.table(TABLE).rows_where("done = 0", order_by="created_at")
            ]
        )


def _message(row: dict[str, Any]) -> JobMessage:
    return JobMessage(
        job_id=row["job_id"],
        channel_id=int(row["channel_id"]),
        message_id=int(row["message_id"]),
        guild_id=None if row["guild_id"] is None else int(row["guild_id"]),
        user_id=int(row["user_id"] or 0),
        attachment_limit=int(row["attachment_limit"] or 0),
        done=bool(row["done"]),
    )


def _create_table(db: sqlite_utils.Database) -> None:
    if TABLE not in db.table_names():
        db.table(TABLE).create(
            {
                "job_id": str,
                "channel_id": int,
                "message_id": int,
                "guild_id": int,
                "user_id": int,
                "attachment_limit": int,
                "done": int,
                "created_at": str,
            },
            pk="job_id",
            not_null={"channel_id", "message_id", "done"},
        )
        db.table(TABLE).create_index(["done"])
        db.table(TABLE).create_index(["message_id"])
