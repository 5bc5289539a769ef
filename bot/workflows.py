"""A guild's own workflows: the bot's table in the ledger's SQLite file.

Admins add them with ``/workflow add`` (``bot/cogs/workflows.py``): an exported graph
and, optionally, its manifest (without one, ``brigade workflows add``'s proposal is
used). Each is checked as a built-in template is (``Template.from_documents``) before it
is stored, and checked again by the renderer: a job for one carries the manifest and
graph with it (``Job.template``), so no renderer needs a copy beforehand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sqlite_utils

from jobs.models import utcnow
from jobs.sql import SqliteFile, immediate
from workflows import Template

TABLE = "guild_workflows"
#: Workflows one guild may keep.
MAX_PER_GUILD = 25


class GuildWorkflows:
    def __init__(self, path: Path | str) -> None:
        self._file = SqliteFile(path, "the guild workflows", _create_table)
        self._run = self._file.run
        #: Checked templates by guild, read once: every /imagine and autocomplete asks.
        #: This process writes the table, so add and remove keep it true.
        self._cache: dict[int, dict[str, Template]] = {}

    async def open(self) -> None:
        await self._file.open()

    async def close(self) -> None:
        await self._file.close()

    async def add(self, guild_id: int, template: Template, added_by: int) -> bool:
        """Store ``template`` for the guild (replacing one of the same name). False when
        the guild already keeps ``MAX_PER_GUILD`` others."""
        row = {
            "guild_id": guild_id,
            "name": template.name,
            "documents": json.dumps(template.documents()),
            "added_by": added_by,
            "added_at": utcnow().isoformat(),
        }

        def add(db: sqlite_utils.Database) -> bool:
            with immediate(db):
                others = db.execute(
                    f"SELECT COUNT(*) FROM {TABLE} WHERE guild_id = ? AND name != ?",
                    [guild_id, template.name],
                ).fetchone()[0]
                if others >= MAX_PER_GUILD:
                    return False
                db.table(TABLE).upsert(row, pk=("guild_id", "name"))
                return True

        done = await self._run(add)
        self._cache.pop(guild_id, None)  # after the write: a read meanwhile saw the old rows
        return done

    async def remove(self, guild_id: int, name: str) -> bool:
        def remove(db: sqlite_utils.Database) -> bool:
            with immediate(db):
                cursor = db.execute(
                    f"DELETE FROM {TABLE} WHERE guild_id = ? AND name = ?", [guild_id, name]
                )
                return bool(cursor.rowcount)

        done = await self._run(remove)
        self._cache.pop(guild_id, None)  # after the write: a read meanwhile saw the old rows
        return done

    async def templates(self, guild_id: int | None) -> dict[str, Template]:
        """The guild's workflows by name (none outside a guild)."""
        if guild_id is None:
            return {}
        cached = self._cache.get(guild_id)
        if cached is not None:
            return cached

        def read(db: sqlite_utils.Database) -> list[dict[str, Any]]:
            return list(db.table(TABLE).rows_where("guild_id = ?", [guild_id], order_by="name"))

        found: dict[str, Template] = {}
        for row in await self._run(read):
            documents = json.loads(row["documents"])
            source = Path(f"guild-{guild_id}") / str(row["name"])
            found[row["name"]] = Template.from_documents(
                documents["manifest"], documents["graph"], source
            )
        self._cache[guild_id] = found
        return found


def _create_table(db: sqlite_utils.Database) -> None:
    if TABLE not in db.table_names():
        db.table(TABLE).create(
            {
                "guild_id": int,
                "name": str,
                "documents": str,
                "added_by": int,
                "added_at": str,
            },
            pk=("guild_id", "name"),
            not_null={"documents"},
        )
