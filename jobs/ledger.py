"""The SQLite ledger: the frontend's record of every job it admitted, through sqlite-utils.

The ledger is the record and memory is a cache: a frontend writes the row before it
publishes, and rebuilds what it shows from here after a restart. Each status change
is appended to ``job_history``. Terminal states are final: a second terminal event for
a job (a redelivered job rendered twice) changes nothing and is reported as such, which
is how frontends show exactly one result per job.

sqlite3 blocks, so every call runs in a worker thread, one at a time, but an admission's
transaction, which runs on the event loop when nothing makes it wait (``jobs/sql.py``).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from bisect import bisect_left
from collections.abc import Container
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils
import structlog

from jobs import quotas
from jobs.claims import ClaimOrder, lane_clock, last_tags
from jobs.fairness import Release, Tags, Waiting, release_sequence
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
from jobs.sql import FileBusy, SqliteFile, commit, immediate, insert_row, snapshot

T = TypeVar("T")

log = structlog.get_logger(__name__)

#: How long a release's claim on a job holds before another release may take it.
CLAIM_SECONDS = 60

#: How long a broker's confirm waits to be written with the ones after it
#: (:meth:`Ledger.confirmed`): admissions in a row then share one write.
CONFIRM_BATCH_SECONDS = 0.05

#: An admission's transaction runs on the event loop only while its lane's last claim
#: counted at most this many held jobs. A claim (model affinity's per-model windows make
#: one in every admission) reads an index entry per held job to find the tenants, and a
#: tenant's users as far as it goes (``jobs/claims.py``): with 10,000 held, an admission
#: took about 5 ms on the session-10 machine (``bench.backlog --per-model [--users
#: 10000]``), too long for the loop.
INLINE_HELD = 200

#: How long a tenant's limits read from the file answer again (:meth:`Ledger.quota`),
#: and how many tenants' are kept at most (past that, all are read afresh).
QUOTA_FRESH_SECONDS = 1.0
QUOTA_CACHE_TENANTS = 4096

#: A lane's positions (:meth:`Ledger.position`) come from an order of its held jobs made
#: for one state of the file. Every queued job's card asks every
#: ``POSITION_REFRESH_SECONDS`` (the bot) or every second (the API's stream), and each
#: admission, release and event changes the file: ordering again for each change took
#: the whole worker thread at 10,000 held, and admissions waited behind it for the file
#: (``bench.positions``). So an order of more than ``POSITION_EXACT_HELD`` held jobs (about
#: 10 ms of work on the session-11 machine) answers from memory, whatever changed, for
#: ``POSITION_STALE_FACTOR`` times as long as it took to make (at most
#: ``POSITION_STALE_MAX_SECONDS``); a job held since it was made has the next order made
#: for it, but not before ``POSITION_RENEW_FACTOR`` times as long: ordering then takes at
#: most one part in ``POSITION_RENEW_FACTOR`` of the thread. A smaller backlog is ordered
#: again after every change (exact): a count, not a time, decides, so a slow moment of
#: the machine never makes a small backlog's answers late.
POSITION_EXACT_HELD = 500
POSITION_STALE_FACTOR = 20
POSITION_STALE_MAX_SECONDS = 5.0
POSITION_RENEW_FACTOR = 4


@dataclass(frozen=True, slots=True)
class Claim:
    """Jobs a release claimed, to publish in this order; ``more``: jobs are still held
    and the window may have room for them once these are published."""

    records: list[JobRecord]
    more: bool
    #: The held jobs of the lane it counted to choose them (its cost grows with them);
    #: None: it read none (no window, or no room in it).
    held: int | None = None


@dataclass(frozen=True, slots=True)
class _Order:
    """The held jobs of a lane ordered for one state of the file (:meth:`Ledger._places`)."""

    #: (PRAGMA data_version, the connection's total_changes) when it was made.
    state: tuple[int, int]
    #: Each queued job's position (held and released) in that state.
    positions: dict[str, int]
    #: Until when (``time.monotonic``) it answers whatever changed since; 0: never.
    until: float
    #: From when a job newer than it may have the next one made.
    renew: float


class _OrderLater(Exception):
    """The lane's order answers for a while yet, and the job is newer than it: ask
    again at ``at`` (:meth:`Ledger.position`)."""

    def __init__(self, at: float) -> None:
        super().__init__(at)
        self.at = at


@dataclass(frozen=True, slots=True)
class _Admit:
    """An admission waiting for its transaction (:meth:`Ledger.admit`)."""

    job: Job
    quota: quotas.QuotaSettings | None
    window: int | None
    done: asyncio.Future[tuple[JobRecord, bool, Claim]]


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

    def as_published(self) -> JobRecord:
        """This record, published (``dataclasses.replace`` costs more on the hot path)."""
        return JobRecord(
            self.job,
            self.status,
            True,
            self.attempt,
            self.worker_id,
            self.terminal,
            self.updated_at,
        )


class Ledger:
    """The jobs table and its history, in one SQLite file (``:memory:`` for tests)."""

    def __init__(self, path: Path | str, *, per_model: bool = False) -> None:
        self._file = SqliteFile(path, "the ledger", _create_tables)
        self._run = self._file.run
        #: Model affinity: each model's jobs have their own window at the broker (its
        #: model's queue), and a job's queue position counts its model's jobs only.
        self.per_model = per_model
        #: Jobs the broker confirmed whose "published" is not written yet (:meth:`confirmed`):
        #: reads count them as published.
        self._confirmed: set[str] = set()
        #: (job id, when confirmed): its released_at, which orders queue positions.
        self._unwritten: list[tuple[str, str]] = []
        self._marking: asyncio.Task[None] | None = None
        #: Set by :meth:`flush`: write what is confirmed now, without waiting for more.
        self._hurry = asyncio.Event()
        #: Admissions waiting for the next transaction (:meth:`admit`): written at the
        #: loop's next turn (``_turn``), or by the writer task when one is under way.
        self._admits: list[_Admit] = []
        self._turn: asyncio.Handle | None = None
        self._admitting: asyncio.Task[None] | None = None
        #: lane -> the held jobs its last claim counted (:data:`INLINE_HELD`).
        self._held: dict[str, int] = {}
        #: lane -> its held jobs' order, and its positions (:meth:`_places`).
        self._orders: dict[str, _Order] = {}
        #: tenant -> (when read, its stored limits, EVERYONE's) (:meth:`quota`).
        self._quotas: dict[
            str, tuple[float, quotas.QuotaSettings | None, quotas.QuotaSettings | None]
        ] = {}

    async def open(self) -> None:
        await self._file.open()

    async def close(self) -> None:
        if self._turn is not None:  # admissions of this turn of the loop: write them first
            self._turn.cancel()
            self._write_turn()
        while self._admitting is not None and not self._admitting.done():
            await asyncio.shield(self._admitting)
        await self.flush()
        await self._file.close()

    async def admit(
        self,
        job: Job,
        quota: quotas.QuotaSettings | None = None,
        *,
        window: int | None = None,
    ) -> tuple[JobRecord, bool, Claim]:
        """Insert ``job`` as queued and unpublished, or return the job already admitted under
        its idempotency key. The boolean says whether this call created it.

        With ``quota`` (and a tenant in the job's origin), the job's images are reserved
        in the same transaction, or :class:`~jobs.quotas.QuotaExceeded` is raised and
        nothing is written. With ``window``, the same transaction also claims what its
        lane may publish now (:meth:`release`), so an admission that has room costs no
        transaction more than before fair release.

        The admissions of one turn of the event loop share one transaction (group
        commit), each in a savepoint of its own: a burst of submits pays one commit, and
        one admission's refusal (its quota, a repeated key) leaves the others written.
        That transaction runs on the loop's thread when the file is free
        (:meth:`SqliteFile.run_now`), else in a worker thread, where the admissions that
        come meanwhile wait for the next one. A caller cancelled before its admission is
        taken into a transaction leaves nothing written."""
        loop = asyncio.get_running_loop()
        entry = _Admit(job, quota, window, loop.create_future())
        self._admits.append(entry)
        if self._turn is None and (self._admitting is None or self._admitting.done()):
            self._turn = loop.call_soon(self._write_turn)
        return await entry.done

    def _write_turn(self) -> None:
        """Write the admissions waiting, here and now if the file is free, else hand them
        to a writer task (a worker thread)."""
        self._turn = None
        batch = self._waiting_admits()
        if not batch:
            return
        if any(self._held.get(entry.job.lane, 0) > INLINE_HELD for entry in batch):
            self._to_writer(batch)  # a long read: not on the loop
            return
        try:
            results = self._file.run_now(partial(self._admit_all, batch=batch))
        except FileBusy:
            self._to_writer(batch)
        except Exception as exc:  # noqa: BLE001 - every admission of the batch gets it
            self._answer(batch, exc)
        else:
            self._answer(batch, results)

    def _to_writer(self, batch: list[_Admit]) -> None:
        """Have the writer task write ``batch`` (and what comes meanwhile) in a thread."""
        self._admits[:0] = batch
        self._admitting = asyncio.create_task(self._admit_batches(), name="ledger-admits")

    def _waiting_admits(self) -> list[_Admit]:
        """The admissions waiting whose callers still wait (the others are dropped)."""
        batch = [entry for entry in self._admits if not entry.done.done()]
        self._admits = []
        return batch

    async def _admit_batches(self) -> None:
        """Write the admissions waiting, a transaction per batch in a worker thread, until
        none is left."""
        while batch := self._waiting_admits():
            try:
                results = await self._run(partial(self._admit_all, batch=batch))
            except asyncio.CancelledError:
                for entry in batch:
                    entry.done.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - every admission of the batch gets it
                self._answer(batch, exc)
            else:
                self._answer(batch, results)

    def _answer(
        self,
        batch: list[_Admit],
        results: list[tuple[JobRecord, bool, Claim] | Exception] | Exception,
    ) -> None:
        """Give each admission of ``batch`` its result or error (all the same error when
        the transaction failed), unless its caller stopped waiting; remember how many
        held jobs each lane's claim counted (:data:`INLINE_HELD`)."""
        for at, entry in enumerate(batch):
            result = results if isinstance(results, Exception) else results[at]
            if not isinstance(result, Exception) and result[2].held is not None:
                self._held[entry.job.lane] = result[2].held
            if entry.done.done():  # its caller was cancelled meanwhile
                continue
            if isinstance(result, Exception):
                entry.done.set_exception(result)
            else:
                entry.done.set_result(result)

    def _admit_all(
        self, db: sqlite_utils.Database, batch: list[_Admit]
    ) -> list[tuple[JobRecord, bool, Claim] | Exception]:
        """One transaction, a savepoint per admission (one alone needs none: its refusal
        rolls the transaction back): what each admission gets."""
        if len(batch) == 1:
            return [self._admit_one(db, batch[0])]
        results: list[tuple[JobRecord, bool, Claim] | Exception] = []
        with immediate(db):
            for entry in batch:
                db.execute("SAVEPOINT admit")
                try:
                    result = self._insert(db, entry)
                except Exception as exc:  # noqa: BLE001 - the admission's own answer
                    db.execute("ROLLBACK TO admit")
                    db.execute("RELEASE admit")
                    results.append(self._refused(db, entry.job, exc))
                else:
                    db.execute("RELEASE admit")
                    results.append(result)
        return results

    def _admit_one(
        self, db: sqlite_utils.Database, entry: _Admit
    ) -> tuple[JobRecord, bool, Claim] | Exception:
        db.execute("BEGIN IMMEDIATE")  # "database is locked" is the caller's to handle
        try:
            result = self._insert(db, entry)
        except Exception as exc:  # noqa: BLE001 - the admission's own answer
            db.conn.rollback()
            return self._refused(db, entry.job, exc)
        except BaseException:
            db.conn.rollback()
            raise
        commit(db)
        return result

    def _insert(self, db: sqlite_utils.Database, entry: _Admit) -> tuple[JobRecord, bool, Claim]:
        job = entry.job
        moment = utcnow()
        now = moment.isoformat()
        if entry.quota is not None:
            quotas.reserve(db, job, entry.quota, moment)
        claim, release = (
            (Claim([], False), None)
            if entry.window is None
            else _claim(db, job.lane, entry.window, moment, self.per_model, job)
        )
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
                "model": job.model,
                "created_at": job.created_at.isoformat(),
                "updated_at": now,
                # Claimed by this transaction's release (_claim): written so at once.
                "claimed_at": None if release is None else now,
                "tenant_tag": None if release is None else release.tenant_tag,
                "user_tag": None if release is None else release.user_tag,
            },
        )
        _history(db, job.job_id, JobStatus.QUEUED, now, None)
        # The row as written, without reading it back (admission's hot path).
        return JobRecord(job, JobStatus.QUEUED, False, None, None, None, moment), True, claim

    def _refused(
        self, db: sqlite_utils.Database, job: Job, error: Exception
    ) -> tuple[JobRecord, bool, Claim] | Exception:
        """An admission rolled back: the job admitted before under its key, if there is
        one (a repeated key; or a retry the first admission's reservation now puts over
        a limit), else the error for its caller."""
        if not isinstance(error, sqlite3.IntegrityError | quotas.QuotaExceeded):
            return error
        rows = list(db.table("jobs").rows_where("idempotency_key = ?", [job.idempotency_key]))
        if not rows:
            return error
        return _record(rows[0], self._confirmed), False, Claim([], False)

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
            lambda db: _write(
                db,
                "UPDATE jobs SET published = 1, claimed_at = NULL, released_at = ? "
                "WHERE job_id = ?",
                utcnow().isoformat(),
                job_id,
            )
        )

    def confirmed(self, job_id: str) -> None:
        """The broker confirmed ``job_id``: it is published. Written in the background,
        batched with the confirms of the next ``CONFIRM_BATCH_SECONDS``, so an admission
        neither waits for a second transaction nor finds the file locked by one; until
        then the ledger's reads count it as published. A crash before the write leaves
        the job claimed: it is released (published) again once its claim lapses, which
        is harmless (the renderer is idempotent by job id)."""
        self._confirmed.add(job_id)
        self._unwritten.append((job_id, utcnow().isoformat()))
        if self._marking is None or self._marking.done():
            self._marking = asyncio.create_task(self._write_confirmed(), name="ledger-confirms")

    async def flush(self) -> None:
        """Write every confirm so far, now, and wait until it is written."""
        self._hurry.set()
        while self._marking is not None and not self._marking.done():
            await asyncio.shield(self._marking)
        self._hurry.clear()

    async def _write_confirmed(self) -> None:
        while self._unwritten:
            with suppress(TimeoutError):
                async with asyncio.timeout(CONFIRM_BATCH_SECONDS):
                    await self._hurry.wait()
            batch, self._unwritten = self._unwritten, []

            def write(db: sqlite_utils.Database, batch: list[tuple[str, str]] = batch) -> None:
                with immediate(db):
                    db.conn.executemany(
                        "UPDATE jobs SET published = 1, claimed_at = NULL, released_at = ? "
                        "WHERE job_id = ?",
                        [(moment, job_id) for job_id, moment in batch],
                    )

            try:
                await self._run(write)
            except Exception as exc:  # noqa: BLE001 - the claim lapses and the job goes again
                log.warning("ledger.confirms_lost", jobs=len(batch), error=str(exc))
            finally:
                self._confirmed.difference_update(job_id for job_id, _ in batch)

    async def release(self, lane: str, window: int) -> Claim:
        """Claim the next jobs of ``lane`` to publish, in fair order (``jobs/fairness.py``),
        so that at most ``window`` of this ledger's jobs wait at the broker, or with
        :attr:`per_model` (model affinity) at most ``window`` per model: each model's queue
        then shows the renderers its backlog, and a renderer that has a model loaded
        keeps finding its next job. A claim lasts ``CLAIM_SECONDS``: a release that died
        before its publish was confirmed leaves the job to a later one (the job may then
        be published twice, which is harmless)."""

        def release(db: sqlite_utils.Database) -> Claim:
            with immediate(db):
                claim, _ = _claim(db, lane, window, utcnow(), self.per_model)
                return claim

        claim = await self._run(release)
        if claim.held is not None:
            self._held[lane] = claim.held
        return claim

    async def unclaim(self, job_id: str) -> None:
        """A claimed job could not be published: the next release may take it again."""
        await self._run(
            lambda db: _write(db, "UPDATE jobs SET claimed_at = NULL WHERE job_id = ?", job_id)
        )

    async def forget(self, job_id: str) -> None:
        """Remove a job that was never published (its publish failed): nothing is left."""

        def delete(db: sqlite_utils.Database) -> None:
            with immediate(db):
                unpublished = db.execute(
                    "SELECT 1 FROM jobs WHERE job_id = ? AND published = 0", [job_id]
                ).fetchone()
                if unpublished is None:  # published after all: it is admitted, keep it
                    return
                db.execute("DELETE FROM job_history WHERE job_id = ?", [job_id])
                db.execute("DELETE FROM jobs WHERE job_id = ?", [job_id])
                # Its images were reserved with the row: give them back.
                quotas.settle(db, job_id, charged=False)

        await self._run(delete)

    async def get(self, job_id: str) -> JobRecord | None:
        def get(db: sqlite_utils.Database) -> JobRecord | None:
            rows = list(db.table("jobs").rows_where("job_id = ?", [job_id]))
            return _record(rows[0], self._confirmed) if rows else None

        return await self._run(get)

    async def get_by_key(self, idempotency_key: str) -> JobRecord | None:
        def get(db: sqlite_utils.Database) -> JobRecord | None:
            rows = list(db.table("jobs").rows_where("idempotency_key = ?", [idempotency_key]))
            return _record(rows[0], self._confirmed) if rows else None

        return await self._run(get)

    async def unpublished(self) -> list[JobRecord]:
        """Jobs written but never confirmed by the broker (a crash between the two)."""
        return await self._run(
            lambda db: [
                _record(row)
                for row in db.table("jobs").rows_where("published = 0", order_by="created_at")
                if row["job_id"] not in self._confirmed
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
        """Where a queued job stands in its lane among this ledger's jobs, 1 = next, or
        None when it is not queued: a released job counts the ones released before it;
        a held one counts every released job and the held ones the fair order puts
        before it. With a large backlog the answer may be up to
        ``POSITION_STALE_FACTOR`` times the order's cost old (see there)."""
        while True:
            kept = self._kept_position(job_id)
            if kept is not None:
                return kept
            # Released jobs are counted in the order their "published" marks were
            # written: write the confirms still waiting first.
            await self.flush()
            try:
                return await self._run(partial(self._position, job_id=job_id))
            except _OrderLater as later:
                await asyncio.sleep(max(0.0, later.at - time.monotonic()))

    def _kept_position(self, job_id: str) -> int | None:
        """``job_id``'s position from an order that still answers (None: none does)."""
        now = time.monotonic()
        for order in self._orders.values():
            if now < order.until and (kept := order.positions.get(job_id)) is not None:
                return kept
        return None

    def _position(self, db: sqlite_utils.Database, job_id: str) -> int | None:
        with snapshot(db):  # the row and the order of one state of the file
            rows = list(db.table("jobs").rows_where("job_id = ?", [job_id]))
            if not rows or rows[0]["status"] != JobStatus.QUEUED.value:
                return None
            row = rows[0]
            lane = row["lane"]
            # With model affinity a job waits behind its model's jobs only (its model's
            # queue), until the bound sends it to the lane's queue.
            model = row["model"] if self.per_model and row["model"] is not None else None
            if row["published"] or job_id in self._confirmed:
                same = "" if model is None else " AND model = ?"
                ahead = db.execute(
                    "SELECT COUNT(*) FROM jobs WHERE status = ? AND lane = ? AND published = 1 "
                    f"AND COALESCE(released_at, created_at) < ?{same}",
                    [
                        JobStatus.QUEUED.value,
                        lane,
                        row["released_at"] or row["created_at"],
                        *([] if model is None else [model]),
                    ],
                ).fetchone()[0]
                return int(ahead) + 1
            return self._places(db, lane, job_id).positions[job_id]

    def _places(self, db: sqlite_utils.Database, lane: str, job_id: str) -> _Order:
        """Every queued job's position in ``lane`` (``job_id``, held, among them), from
        the fair order of its held jobs: made once for each state of the file, and kept
        until the connection's own changes (``total_changes``) or another connection's
        commit (``PRAGMA data_version``) say it changed; or, for a large backlog, for a
        while whatever changed (:data:`POSITION_STALE_FACTOR`). Raises
        :class:`_OrderLater` when the job is newer than that order and the next may not
        be made yet (:data:`POSITION_RENEW_FACTOR`).

        The released jobs go in the order of their release (ties share a place), behind
        them the held ones (with model affinity, a job of a model counts that model's
        jobs only)."""
        (others,) = db.execute("PRAGMA data_version").fetchone()
        state = (int(others), db.conn.total_changes)
        known = self._orders.get(lane)
        if known is not None and known.state == state:
            return known
        now = time.monotonic()
        if known is not None and now < known.until:
            if job_id in known.positions:
                return known
            if now < known.renew:
                raise _OrderLater(known.renew)
        began = time.perf_counter()
        waiting, tags = _fair_state(db, lane)
        released = db.execute(
            "SELECT job_id, model, COALESCE(released_at, created_at) AS moment FROM jobs "
            "WHERE status = ? AND lane = ? AND published = 1 ORDER BY moment",
            [JobStatus.QUEUED.value, lane],
        ).fetchall()
        moments: dict[str | None, list[str]] = {None: []}  # in all (None), and per model
        for _, model, moment in released:
            moments[None].append(moment)
            if self.per_model and model is not None:
                moments.setdefault(model, []).append(moment)
        positions: dict[str, int] = {}
        for released_id, model, moment in released:
            among = moments[model if self.per_model and model is not None else None]
            positions[released_id] = bisect_left(among, moment) + 1  # those released before
        behind = {key: len(among) for key, among in moments.items()}  # at the broker
        for job in release_sequence(waiting, tags):
            key = job.model if self.per_model and job.model is not None else None
            behind[key] = behind.get(key, 0) + 1
            if key is not None:  # the lane's place counts every model's held jobs
                behind[None] += 1
            positions[job.job_id] = behind[key]
        spent = time.perf_counter() - began
        until = renew = 0.0
        if len(waiting) > POSITION_EXACT_HELD:  # answers for a while, whatever changes
            now = time.monotonic()
            until = now + min(POSITION_STALE_FACTOR * spent, POSITION_STALE_MAX_SECONDS)
            renew = now + min(POSITION_RENEW_FACTOR * spent, POSITION_STALE_MAX_SECONDS)
        order = _Order(state, positions, until, renew)
        self._orders[lane] = order
        return order

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
        """A tenant's limits: its own, else ``defaults``. What the file holds is read again
        after :data:`QUOTA_FRESH_SECONDS` (every ``/imagine`` asks several times): a
        change made through this ledger applies at once, one made by another process
        sharing the file within that time."""
        now = time.monotonic()
        known = self._quotas.get(tenant)
        if known is None or now - known[0] >= QUOTA_FRESH_SECONDS:
            if len(self._quotas) >= QUOTA_CACHE_TENANTS:
                self._quotas.clear()
            own, everyone = await self._run(lambda db: quotas.stored(db, tenant))
            known = (now, own, everyone)
            self._quotas[tenant] = known
        return quotas.combined(tenant, known[1], known[2], defaults)

    async def set_quota(
        self, tenant: str, changes: dict[str, Any], defaults: quotas.QuotaSettings
    ) -> quotas.QuotaSettings:
        """Change some of a tenant's limits (validated: raises ``pydantic.ValidationError``)."""

        def update(db: sqlite_utils.Database) -> quotas.QuotaSettings:
            settings = quotas.merged(quotas.settings_for(db, tenant, defaults), changes)
            with immediate(db):
                quotas.store_settings(db, tenant, settings)
            return settings

        try:
            return await self._run(update)
        finally:
            self._quotas.clear()  # this tenant's, and every tenant's when it is EVERYONE

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
    jobs = db.table("jobs")
    added: dict[str, type] = {
        "claimed_at": str,
        "released_at": str,
        "tenant_tag": int,
        "user_tag": int,
        "model": str,  # model affinity: each model's jobs have their own window
    }
    for column, kind in added.items():  # fair release (jobs/fairness.py)
        if column not in jobs.columns_dict:
            jobs.add_column(column, kind)
    indexes = {index.name for index in jobs.indexes}
    if "idx_jobs_window" not in indexes:
        # Covers the window's counts (_waiting_at_broker, _waiting_by_model): no row is
        # read to count the jobs waiting at the broker. It replaces idx_jobs_fair, its
        # prefix.
        jobs.create_index(
            ["lane", "status", "published", "claimed_at", "model"], index_name="idx_jobs_window"
        )
    if "idx_jobs_fair" in indexes:
        db.execute("DROP INDEX idx_jobs_fair")
    # The held jobs no release has claimed, each user's (per model) in age order,
    # covering what a claim reads of them (jobs/claims.py): no table row is read. A job
    # released at once (inserted claimed) never enters it; one held leaves it when a
    # release claims it. Its condition names no column that a query compares with a
    # bound parameter: one that did (say "status = 'queued'", beside queries with
    # "status = ?") would make SQLite prepare each such statement again at every call
    # (17 us more for the window's count, measured).
    db.execute(
        "CREATE INDEX IF NOT EXISTS idx_jobs_unclaimed ON jobs "
        "(lane, status, published, claimed_at, tenant, user, model, created_at, job_id) "
        "WHERE published = 0 AND claimed_at IS NULL"
    )
    # The same jobs per tenant and model, oldest first: a claim's count of them and each
    # tenant's oldest per model (jobs/claims.py) in index order, with no sort. It costs a
    # held job's admission one more index entry; a job released at once has none.
    db.execute(
        "CREATE INDEX IF NOT EXISTS idx_jobs_unclaimed_models ON jobs "
        "(lane, status, published, claimed_at, tenant, model, created_at, job_id) "
        "WHERE published = 0 AND claimed_at IS NULL"
    )
    if "fair_tags" not in db.table_names():
        # The last tags released per lane, tenant and user: the fair order's memory, one
        # small row per user (jobs/fairness.py).
        db.table("fair_tags").create(
            {"lane": str, "tenant": str, "user": str, "tenant_tag": int, "user_tag": int},
            pk=("lane", "tenant", "user"),
        )
    tag_indexes = {index.name for index in db.table("fair_tags").indexes}
    if "idx_fair_tags_clock" not in tag_indexes:
        # The lane's clock (its largest tenant tag) without reading every user's row.
        db.table("fair_tags").create_index(["lane", "tenant_tag"], index_name="idx_fair_tags_clock")
    if "idx_fair_tags_tenant" not in tag_indexes:
        # A tenant's last release (_waiting_tags) without reading every user's row.
        db.table("fair_tags").create_index(
            ["lane", "tenant", "tenant_tag"], index_name="idx_fair_tags_tenant"
        )
    quotas.create_tables(db)


def _claim(
    db: sqlite_utils.Database,
    lane: str,
    window: int,
    moment: datetime,
    per_model: bool = False,
    admitted: Job | None = None,
) -> tuple[Claim, Release | None]:
    """Inside a transaction: claim, in fair order, the held jobs of ``lane`` the window
    (``per_model``: each model's window) has room for, giving each its tags
    (``jobs/fairness.py``). ``admitted``: a job this transaction is about to insert (its
    row is not written yet): it is held with the others, and when it is claimed its
    release comes back too, for the caller to write its row claimed (one write, not an
    insert and an update)."""
    stale = (moment - timedelta(seconds=CLAIM_SECONDS)).isoformat()
    new = None if admitted is None else _as_waiting(admitted)
    if per_model:
        rooms = {
            model: window - count for model, count in _waiting_by_model(db, lane, stale).items()
        }
        _unclaim_lapsed(db, lane, stale)
        claims = ClaimOrder(db, lane, rooms, window, new)
        order = claims.releases()
        more = claims.held > len(order) > 0
    else:
        room = window - _waiting_at_broker(db, lane, stale)
        if room <= 0:
            return Claim([], False), None
        _unclaim_lapsed(db, lane, stale)
        claims = ClaimOrder(db, lane, {}, room, new)
        order = claims.releases(limit=room)
        more = claims.held > len(order) and len(order) == room
    own: Release | None = None
    records: list[JobRecord] = []
    for release, job in order:
        db.execute(
            "INSERT INTO fair_tags (lane, tenant, user, tenant_tag, user_tag) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (lane, tenant, user) DO UPDATE SET "
            "tenant_tag = excluded.tenant_tag, user_tag = excluded.user_tag",
            [lane, job.tenant, job.user, release.tenant_tag, release.user_tag],
        )
        if admitted is not None and release.job_id == admitted.job_id:
            own = release
            records.append(JobRecord(admitted, JobStatus.QUEUED, False, None, None, None, moment))
            continue
        db.execute(
            "UPDATE jobs SET claimed_at = ?, tenant_tag = ?, user_tag = ? WHERE job_id = ?",
            [moment.isoformat(), release.tenant_tag, release.user_tag, release.job_id],
        )
        records.append(_record(_row(db, release.job_id)))
    return Claim(records, more, claims.held), own


def _as_waiting(job: Job) -> Waiting:
    """``job`` as the fair order sees a held job (as :func:`_fair_state` reads one)."""
    origin = job.origin
    return _waiting(job.job_id, origin.tenant, origin.user, job.created_at.isoformat(), job.model)


def _waiting_at_broker(db: sqlite_utils.Database, lane: str, stale: str | None = None) -> int:
    """This ledger's jobs of ``lane`` published (or claimed since ``stale``: being
    published now) and not yet taken by a renderer."""
    (count,) = db.execute(*_waiting_query(lane, stale, by_model=False)).fetchone()
    return int(count)


def _waiting_by_model(
    db: sqlite_utils.Database, lane: str, stale: str | None = None
) -> dict[str | None, int]:
    """:func:`_waiting_at_broker`, per model."""
    rows = db.execute(*_waiting_query(lane, stale)).fetchall()
    return {model: int(count) for model, count in rows}


def _waiting_query(lane: str, stale: str | None, *, by_model: bool = True) -> tuple[str, list[str]]:
    """The count's query (per model, or in all) and its parameters. It reads two ranges
    of ``idx_jobs_window``, the published jobs and those claimed since ``stale``: with
    "published = 1 OR claimed_at >= ?" SQLite would read every queued job of the lane,
    the whole backlog that fair release holds, on every admission and release. The count
    in all adds the two ranges' counts: grouping by model costs a sort in a temporary
    b-tree, on every admission."""
    queued = [lane, JobStatus.QUEUED.value]
    published = "FROM jobs WHERE lane = ? AND status = ? AND published = 1"
    claimed = "FROM jobs WHERE lane = ? AND status = ? AND published = 0 AND claimed_at >= ?"
    params = queued if stale is None else [*queued, *queued, stale]
    if not by_model:
        total = f"(SELECT COUNT(*) {published})"
        if stale is not None:
            total += f" + (SELECT COUNT(*) {claimed})"
        return f"SELECT {total}", params
    source = f"SELECT model {published}"
    if stale is not None:
        source += f" UNION ALL SELECT model {claimed}"
    return f"SELECT model, COUNT(*) FROM ({source}) GROUP BY model", params


#: Up to this many tenants with jobs waiting, the fair state looks up their tags; more,
#: it reads the lane's.
_TENANTS_PER_READ = 200
#: Users looked up in one statement (SQLite's limit on parameters is 999 in old builds).
_USERS_PER_READ = 500


def _unclaim_lapsed(db: sqlite_utils.Database, lane: str, stale: str) -> None:
    """The claims on ``lane``'s held jobs made before ``stale`` lapsed (their release
    died): those jobs are held again, unclaimed, for this claim to take (a range of
    ``idx_jobs_window``; rare)."""
    db.execute(
        "UPDATE jobs SET claimed_at = NULL WHERE lane = ? AND status = ? AND published = 0 "
        "AND claimed_at < ?",
        [lane, JobStatus.QUEUED.value, stale],
    )


def _fair_state(db: sqlite_utils.Database, lane: str) -> tuple[list[Waiting], Tags]:
    """Every held job of ``lane``, claimed or not, and the tags releases left: what
    :func:`~jobs.fairness.release_sequence` needs to tell a held job's place (its position)."""
    waiting = _held_jobs(db, lane)
    return waiting, _tags(db, lane, waiting)


def _held_jobs(db: sqlite_utils.Database, lane: str, more: str = "", *params: str) -> list[Waiting]:
    """The held jobs of ``lane`` (queued, not published) that ``more`` (and its
    ``params``) also asks for, read whole."""
    return [
        _waiting(*row)
        for row in db.execute(
            "SELECT job_id, tenant, user, created_at, model FROM jobs "
            f"WHERE lane = ? AND status = ? AND published = 0{more}",
            [lane, JobStatus.QUEUED.value, *params],
        ).fetchall()
    ]


def _waiting(
    job_id: str, tenant: str | None, user: str | None, created_at: str, model: str | None
) -> Waiting:
    """A held job's columns as the fair order sees them (no tenant or user: "")."""
    return Waiting(job_id, tenant or "", user or "", created_at, model)


def _tags(db: sqlite_utils.Database, lane: str, waiting: list[Waiting]) -> Tags:
    """The tags the releases of ``lane`` left that ordering ``waiting`` needs."""
    if not waiting:
        return Tags(0, {}, {}, {})
    clock = lane_clock(db, lane)
    users: dict[str, set[str]] = {}
    for job in waiting:
        users.setdefault(job.tenant, set()).add(job.user)
    if len(users) > _TENANTS_PER_READ:
        return _lane_tags(db, lane, clock)
    return _waiting_tags(db, lane, clock, users)


def _waiting_tags(
    db: sqlite_utils.Database, lane: str, lane_clock: int, users: dict[str, set[str]]
) -> Tags:
    """The tags the order needs for ``users`` (tenant -> its users with jobs waiting):
    each tenant's last release, and those users' own rows, not every user the lane has
    served (a big guild has thousands). A tenant's tenant tags and user tags both grow
    with each of its releases (``jobs/fairness.py``), so its last release's row holds its
    last tenant tag and its clock: one step down ``idx_fair_tags_tenant``."""
    tenant_last: dict[str, int] = {}
    tenant_clock: dict[str, int] = {}
    user_last: dict[tuple[str, str], int] = {}
    for tenant, names in users.items():
        last = last_tags(db, lane, tenant)
        if last is None:  # never served: no user of it was either
            continue
        tenant_last[tenant], tenant_clock[tenant] = last
        ordered = sorted(names)
        for at in range(0, len(ordered), _USERS_PER_READ):
            chunk = ordered[at : at + _USERS_PER_READ]
            for user, user_tag in db.execute(
                "SELECT user, user_tag FROM fair_tags WHERE lane = ? AND tenant = ? "
                f"AND user IN ({', '.join('?' for _ in chunk)})",
                [lane, tenant, *chunk],
            ).fetchall():
                user_last[(tenant, str(user))] = int(user_tag)
    return Tags(lane_clock, tenant_last, tenant_clock, user_last)


def _lane_tags(db: sqlite_utils.Database, lane: str, lane_clock: int) -> Tags:
    """Every tag ``lane``'s releases left (when very many tenants wait at once)."""
    tenant_last: dict[str, int] = {}
    tenant_clock: dict[str, int] = {}
    user_last: dict[tuple[str, str], int] = {}
    for tenant, user, last_tenant_tag, last_user_tag in db.execute(
        "SELECT tenant, user, tenant_tag, user_tag FROM fair_tags WHERE lane = ?", [lane]
    ).fetchall():
        key = (str(tenant), str(user))
        user_last[key] = int(last_user_tag)
        tenant_last[key[0]] = max(tenant_last.get(key[0], 0), int(last_tenant_tag))
        tenant_clock[key[0]] = max(tenant_clock.get(key[0], 0), int(last_user_tag))
    return Tags(lane_clock, tenant_last, tenant_clock, user_last)


def _history(
    db: sqlite_utils.Database, job_id: str, status: JobStatus, at: str, detail: str | None
) -> None:
    insert_row(
        db, "job_history", {"job_id": job_id, "status": status.value, "at": at, "detail": detail}
    )


def _row(db: sqlite_utils.Database, job_id: str) -> dict[str, Any]:
    """One job's row (``Table.get`` would look the primary key up on every call)."""
    cursor = db.execute("SELECT * FROM jobs WHERE job_id = ?", [job_id])
    names = [column[0] for column in cursor.description]
    return dict(zip(names, cursor.fetchone(), strict=True))


def _record(row: dict[str, Any], confirmed: Container[str] = ()) -> JobRecord:
    """A row as a record; ``confirmed``: jobs to take as published (``Ledger.confirmed``;
    read inside the same call as the row, under the file's lock, so a write that lands
    between the two cannot make a published job look unpublished)."""
    terminal = parse_event(row["terminal_json"].encode()) if row["terminal_json"] else None
    assert terminal is None or isinstance(terminal, Succeeded | Failed)
    return JobRecord(
        job=Job.model_validate_json(row["job_json"]),
        status=JobStatus(row["status"]),
        published=bool(row["published"]) or row["job_id"] in confirmed,
        attempt=row["attempt"],
        worker_id=row["worker_id"],
        terminal=terminal,
        updated_at=datetime.fromisoformat(row["updated_at"]),
    )


def _write(db: sqlite_utils.Database, sql: str, *params: Any) -> None:
    with immediate(db):
        db.execute(sql, list(params))
