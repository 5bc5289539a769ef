"""The SQLite ledger: the frontend's record of every job it admitted, through sqlite-utils.

The ledger is the record and memory is a cache: a frontend writes the row before it
publishes, and rebuilds what it shows from here after a restart. Each status change
is appended to ``job_history``. Terminal states are final: a second terminal event for
a job (a redelivered job rendered twice) changes nothing and is reported as such, which
is how frontends show exactly one result per job.

sqlite3 blocks, so every call runs in a worker thread, one at a time.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from jobs import quotas
from jobs.models import (
    Accepted,
    Event,
    Failed,
    Job,
    JobStatus,
    Succeeded,
    parse_event,
    utcnow,
)
from jobs.sql import SqliteFile, immediate, insert_row

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A job as the ledger knows it."""

    job: Job
    status: JobStatus
    published: bool
    attempt: int | None
    worker_id: str | None
    #: The terminal event as it arrived, for late readers (the API's event stream).
    terminal: Succeeded | Failed | None
    updated_at: datetime


class Ledger:
    """The jobs table and its history, in one SQLite file (``:memory:`` for tests)."""

    def __init__(self, path: Path | str) -> None:
        self._file = SqliteFile(path, "the ledger", _create_tables)
        self._run = self._file.run

    async def open(self) -> None:
        await self._file.open()

    async def close(self) -> None:
        await self._file.close()

    async def admit(
        self, job: Job, quota: quotas.QuotaSettings | None = None
    ) -> tuple[JobRecord, bool]:
        """Insert ``job`` as queued and unpublished, or return the job already admitted under
        its idempotency key. The boolean says whether this call created it.

        With ``quota`` (and a tenant in the job's origin), the job's images are reserved
        in the same transaction, or :class:`~jobs.quotas.QuotaExceeded` is raised and
        nothing is written."""

        def insert(db: sqlite_utils.Database) -> tuple[JobRecord, bool]:
            moment = utcnow()
            now = moment.isoformat()
            try:
                with immediate(db):
                    insert_row(
                        db,
                        "jobs",
                        {
                            "job_id": job.job_id,
                            "idempotency_key": job.idempotency_key,
                            "status": JobStatus.QUEUED.value,
                            "published": 0,
                            "workflow": job.workflow,
                            "lane": job.lane,
                            "prompt": job.prompt,
                            "frontend": job.origin.frontend,
                            "tenant": job.origin.tenant,
                            "user": job.origin.user,
                            "job_json": job.model_dump_json(),
                            "created_at": job.created_at.isoformat(),
                            "updated_at": now,
                        },
                    )
                    _history(db, job.job_id, JobStatus.QUEUED, now, None)
                    if quota is not None:
                        quotas.reserve(db, job, quota, moment)
            except sqlite3.IntegrityError:
                rows = list(
                    db.table("jobs").rows_where("idempotency_key = ?", [job.idempotency_key])
                )
                if not rows:
                    raise
                return _record(rows[0]), False
            return _record(db.table("jobs").get(job.job_id)), True

        return await self._run(insert)

    async def reopen(self, job: Job, detail: str) -> bool:
        """Put a failed job back to ``queued`` (unpublished) for an admin's retry, as
        ``job`` (its ``retries`` counted up), its images reserved again. False when the
        job is unknown here or did not fail."""

        def reopen(db: sqlite_utils.Database) -> bool:
            now = utcnow().isoformat()
            with immediate(db):
                rows = list(db.table("jobs").rows_where("job_id = ?", [job.job_id]))
                if not rows or rows[0]["status"] != JobStatus.FAILED.value:
                    return False
                db.execute(
                    "UPDATE jobs SET status = ?, published = 0, attempt = NULL, worker_id = NULL,"
                    " terminal_json = NULL, job_json = ?, updated_at = ? WHERE job_id = ?",
                    [JobStatus.QUEUED.value, job.model_dump_json(), now, job.job_id],
                )
                quotas.reserve_again(db, job.job_id)
                _history(db, job.job_id, JobStatus.QUEUED, now, detail)
                return True

        return await self._run(reopen)

    async def mark_published(self, job_id: str) -> None:
        await self._run(
            lambda db: _write(db, "UPDATE jobs SET published = 1 WHERE job_id = ?", job_id)
        )

    async def forget(self, job_id: str) -> None:
        """Remove a job that was never published (its publish failed): nothing is left."""

        def delete(db: sqlite_utils.Database) -> None:
            with immediate(db):
                db.execute("DELETE FROM job_history WHERE job_id = ?", [job_id])
                db.execute("DELETE FROM jobs WHERE job_id = ? AND published = 0", [job_id])

        await self._run(delete)

    async def get(self, job_id: str) -> JobRecord | None:
        def get(db: sqlite_utils.Database) -> JobRecord | None:
            rows = list(db.table("jobs").rows_where("job_id = ?", [job_id]))
            return _record(rows[0]) if rows else None

        return await self._run(get)

    async def get_by_key(self, idempotency_key: str) -> JobRecord | None:
        def get(db: sqlite_utils.Database) -> JobRecord | None:
            rows = list(db.table("jobs").rows_where("idempotency_key = ?", [idempotency_key]))
            return _record(rows[0]) if rows else None

        return await self._run(get)

    async def unpublished(self) -> list[JobRecord]:
        """Jobs written but never confirmed by the broker (a crash between the two)."""
        return await self._run(
            lambda db: [
                _record(row)
                for row in db.table("jobs").rows_where("published = 0", order_by="created_at")
            ]
        )

    async def active(self, tenant: str, limit: int = 25) -> list[JobRecord]:
        """A tenant's jobs that are queued or running, oldest first."""
        return await self._run(
            lambda db: [
                _record(row)
                for row in db.table("jobs").rows_where(
                    "tenant = ? AND status IN (?, ?)",
                    [tenant, JobStatus.QUEUED.value, JobStatus.RUNNING.value],
                    order_by="created_at",
                    limit=limit,
                )
            ]
        )

    async def running(self, limit: int = 10) -> list[JobRecord]:
        """Jobs rendering now, of every tenant, oldest first."""
        return await self._run(
            lambda db: [
                _record(row)
                for row in db.table("jobs").rows_where(
                    "status = ?", [JobStatus.RUNNING.value], order_by="created_at", limit=limit
                )
            ]
        )

    async def counts(self) -> dict[tuple[str, str], int]:
        """Jobs queued and running, by ``(lane, status)``."""

        def count(db: sqlite_utils.Database) -> dict[tuple[str, str], int]:
            rows = db.execute(
                "SELECT lane, status, COUNT(*) FROM jobs WHERE status IN (?, ?) "
                "GROUP BY lane, status",
                [JobStatus.QUEUED.value, JobStatus.RUNNING.value],
            ).fetchall()
            return {(str(lane), str(status)): int(n) for lane, status, n in rows}

        return await self._run(count)

    async def recent(
        self, tenant: str, *, frontend: str, limit: int, status: JobStatus | None = None
    ) -> list[JobRecord]:
        """A tenant's jobs from one frontend, newest first."""

        def read(db: sqlite_utils.Database) -> list[JobRecord]:
            where = "frontend = ? AND tenant = ?"
            params: list[Any] = [frontend, tenant]
            if status is not None:
                where += " AND status = ?"
                params.append(status.value)
            rows = db.table("jobs").rows_where(
                where, params, order_by="created_at DESC", limit=limit
            )
            return [_record(row) for row in rows]

        return await self._run(read)

    async def history(self, job_id: str) -> list[tuple[JobStatus, str, str | None]]:
        return await self._run(
            lambda db: [
                (JobStatus(row["status"]), row["at"], row["detail"])
                for row in db.table("job_history").rows_where("job_id = ?", [job_id], order_by="id")
            ]
        )

    async def position(self, job_id: str) -> int | None:
        """1 + the number of queued jobs of the same lane admitted before it, or None."""

        def position(db: sqlite_utils.Database) -> int | None:
            rows = list(db.table("jobs").rows_where("job_id = ?", [job_id]))
            if not rows or rows[0]["status"] != JobStatus.QUEUED.value:
                return None
            row = rows[0]
            ahead = db.execute(
                "SELECT COUNT(*) FROM jobs WHERE status = ? AND lane = ? AND created_at < ?",
                [JobStatus.QUEUED.value, row["lane"], row["created_at"]],
            ).fetchone()[0]
            return int(ahead) + 1

        return await self._run(position)

    async def apply(self, event: Event) -> bool:
        """Record a persistent event. Returns False when it changes nothing: the job is
        unknown here, already terminal, or the event is older than what is recorded."""
        if isinstance(event, Accepted):
            status = JobStatus.RUNNING
        elif isinstance(event, Succeeded):
            status = JobStatus.SUCCEEDED
        elif isinstance(event, Failed):
            status = JobStatus.FAILED
        else:
            return False

        def apply(db: sqlite_utils.Database) -> bool:
            now = utcnow().isoformat()
            with immediate(db):
                rows = list(db.table("jobs").rows_where("job_id = ?", [event.job_id]))
                if not rows or JobStatus(rows[0]["status"]).terminal:
                    return False
                recorded = rows[0]["attempt"]
                if (
                    status is JobStatus.RUNNING
                    and recorded is not None
                    and recorded > event.attempt
                ):
                    return False
                update: dict[str, Any] = {
                    "status": status.value,
                    "attempt": event.attempt,
                    "worker_id": event.worker_id,
                    "updated_at": now,
                }
                if event.terminal:
                    update["terminal_json"] = event.model_dump_json()
                    # A job that did not render costs nothing (cancelled included).
                    quotas.settle(db, event.job_id, charged=isinstance(event, Succeeded))
                assignments = ", ".join(f"{column} = ?" for column in update)
                db.execute(
                    f"UPDATE jobs SET {assignments} WHERE job_id = ?",
                    [*update.values(), event.job_id],
                )
                detail = (
                    f"{event.reason.value}: {event.message}"
                    if isinstance(event, Failed)
                    else f"attempt {event.attempt} on {event.worker_id}"
                )
                _history(db, event.job_id, status, now, detail)
                return True

        return await self._run(apply)

    async def quota(self, tenant: str, defaults: quotas.QuotaSettings) -> quotas.QuotaSettings:
        """A tenant's limits: its own, else ``defaults``."""
        return await self._run(lambda db: quotas.settings_for(db, tenant, defaults))

    async def set_quota(
        self, tenant: str, changes: dict[str, Any], defaults: quotas.QuotaSettings
    ) -> quotas.QuotaSettings:
        """Change some of a tenant's limits (validated: raises ``pydantic.ValidationError``)."""

        def update(db: sqlite_utils.Database) -> quotas.QuotaSettings:
            settings = quotas.merged(quotas.settings_for(db, tenant, defaults), changes)
            with immediate(db):
                quotas.store_settings(db, tenant, settings)
            return settings

        return await self._run(update)

    async def usage(
        self, tenant: str, user: str | None, defaults: quotas.QuotaSettings
    ) -> quotas.Usage:
        def read(db: sqlite_utils.Database) -> quotas.Usage:
            settings = quotas.settings_for(db, tenant, defaults)
            return quotas.usage(db, tenant, user, settings, utcnow())

        return await self._run(read)

    async def reset_usage(self, tenant: str, user: str) -> int:
        """Give ``user`` today's images back. Returns how many."""

        def reset(db: sqlite_utils.Database) -> int:
            with immediate(db):
                return quotas.reset_user(db, tenant, user, utcnow())

        return await self._run(reset)


def _create_tables(db: sqlite_utils.Database) -> None:
    if "jobs" not in db.table_names():
        db.table("jobs").create(
            {
                "job_id": str,
                "idempotency_key": str,
                "status": str,
                "published": int,
                "workflow": str,
                "lane": str,
                "prompt": str,
                "frontend": str,
                "tenant": str,
                "user": str,
                "attempt": int,
                "worker_id": str,
                "job_json": str,
                "terminal_json": str,
                "created_at": str,
                "updated_at": str,
            },
            pk="job_id",
            not_null={"idempotency_key", "status", "job_json", "created_at"},
        )
        db.table("jobs").create_index(["idempotency_key"], unique=True)
        db.table("jobs").create_index(["status", "lane", "created_at"])
        db.table("job_history").create(
            {"id": int, "job_id": str, "status": str, "at": str, "detail": str},
            pk="id",
            foreign_keys=[("job_id", "jobs", "job_id")],
        )
        db.table("job_history").create_index(["job_id"])
    quotas.create_tables(db)


def _history(
    db: sqlite_utils.Database, job_id: str, status: JobStatus, at: str, detail: str | None
) -> None:
    insert_row(
        db, "job_history", {"job_id": job_id, "status": status.value, "at": at, "detail": detail}
    )


def _record(row: dict[str, Any]) -> JobRecord:
    terminal = parse_event(row["terminal_json"].encode()) if row["terminal_json"] else None
    assert terminal is None or isinstance(terminal, Succeeded | Failed)
    return JobRecord(
        job=Job.model_validate_json(row["job_json"]),
        status=JobStatus(row["status"]),
        published=bool(row["published"]),
        attempt=row["attempt"],
        worker_id=row["worker_id"],
        terminal=terminal,
        updated_at=datetime.fromisoformat(row["updated_at"]),
    )


def _write(db: sqlite_utils.Database, sql: str, *params: Any) -> None:
    with immediate(db):
        db.execute(sql, list(params))
