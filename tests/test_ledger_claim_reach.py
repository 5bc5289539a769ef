"""A claim reads the held jobs only as far as its fair order goes (``jobs/claims.py``):
tenants, then a tenant's users in order, then a user's oldest jobs per model, through
``idx_jobs_unclaimed``. It must release exactly what ordering every held job released:
the same jobs, in the same order, with the same tags, the same ``more`` and the same
count of held jobs."""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path

import sqlite_utils
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.fairness import Release, Waiting, fair_order
from jobs.ledger import (
    CLAIM_SECONDS,
    Ledger,
    _as_waiting,
    _claim,
    _tags,
    _waiting_at_broker,
    _waiting_by_model,
    _write,
)
from jobs.models import Accepted, Job, utcnow
from tests.fixtures.jobs import job as make_job

MODELS = [None, "a_sd15.safetensors", "b_sd15.safetensors"]
LONG_AGO = "2000-01-01T00:00:00+00:00"


@dataclass(frozen=True)
class Held:
    """A job to admit: whose (tenant, user index; tenant None: no tenant), which model."""

    tenant: str | None
    user: int
    model: str | None


@dataclass(frozen=True)
class Step:
    """A release before the claim under test: its window, whether it is per model, how
    many of its jobs the broker confirms, how many of those a renderer takes, and what
    becomes of its other claims: kept (being published), lapsed (the release died long
    ago) or undone (the publish failed)."""

    window: int
    per_model: bool
    confirmed: int
    taken: int
    rest: str


held_jobs = st.lists(
    st.builds(
        Held,
        tenant=st.sampled_from([None, "g1", "g2", "g3"]),
        user=st.integers(0, 3),
        model=st.sampled_from(MODELS),
    ),
    min_size=0,
    max_size=40,
)
steps = st.lists(
    st.builds(
        Step,
        window=st.integers(1, 6),
        per_model=st.booleans(),
        confirmed=st.integers(0, 6),
        taken=st.integers(0, 6),
        rest=st.sampled_from(["kept", "lapsed", "undone"]),
    ),
    max_size=4,
)


def _job(n: int, held: Held) -> Job:
    if held.tenant is None:
        return make_job(n, held.model)
    return make_job(n, held.model, user=f"u{held.user}", tenant=held.tenant)


async def _build(path: Path, jobs: list[Held], before: list[Step]) -> None:
    """A ledger holding ``jobs``, after the releases ``before`` (which leave fair tags,
    jobs at the broker, claims fresh and lapsed)."""
    ledger = Ledger(path)
    await ledger.open()
    try:
        for n, held in enumerate(jobs):
            await ledger.admit(_job(n, held), window=0)  # held
        for step in before:
            ledger.per_model = step.per_model
            claim = await ledger.release("fast", step.window)
            published = claim.records[: step.confirmed]
            for record in published:
                await ledger.mark_published(record.job.job_id)
            for record in published[: step.taken]:
                accepted = Accepted(job_id=record.job.job_id, attempt=1, worker_id="w", seq=0)
                await ledger.apply(accepted)
            for record in claim.records[step.confirmed :]:
                if step.rest == "lapsed":
                    await ledger._run(partial(_lapse, job_id=record.job.job_id))
                elif step.rest == "undone":
                    await ledger.unclaim(record.job.job_id)
    finally:
        await ledger.close()


def _lapse(db: sqlite_utils.Database, job_id: str) -> None:
    """A claim whose release died long ago."""
    _write(db, "UPDATE jobs SET claimed_at = ? WHERE job_id = ?", LONG_AGO, job_id)


def _every_held(db: sqlite_utils.Database, stale: str, new: Waiting | None) -> list[Waiting]:
    """What a claim read before ``jobs/claims.py``: every held job not freshly claimed."""
    waiting = [
        Waiting(job_id, tenant or "", user or "", created_at, model)
        for job_id, tenant, user, created_at, model in db.execute(
            "SELECT job_id, tenant, user, created_at, model FROM jobs WHERE lane = 'fast' "
            "AND status = 'queued' AND published = 0 AND (claimed_at IS NULL OR claimed_at < ?)",
            [stale],
        ).fetchall()
    ]
    return waiting if new is None else [*waiting, new]


def _reference(
    db: sqlite_utils.Database, window: int, per_model: bool, stale: str, new: Waiting | None
) -> tuple[list[Release], bool, int | None, list[Waiting]]:
    """The order, ``more`` and held count a claim gave when it read every held job (and
    what it read); no count when the window had no room."""
    waiting = _every_held(db, stale, new)
    if per_model:
        rooms = {model: window - n for model, n in _waiting_by_model(db, "fast", stale).items()}
        order = fair_order(waiting, _tags(db, "fast", waiting), room=rooms, default_room=window)
        return order, len(waiting) > len(order) > 0, len(waiting), waiting
    room = window - _waiting_at_broker(db, "fast", stale)
    if room <= 0:
        return [], False, None, waiting
    order = fair_order(waiting, _tags(db, "fast", waiting), limit=room)
    return order, len(waiting) > len(order) and len(order) == room, len(waiting), waiting


def _fair_tags(db: sqlite_utils.Database) -> dict[tuple[str, str], tuple[int, int]]:
    return {
        (str(tenant), str(user)): (int(tenant_tag), int(user_tag))
        for tenant, user, tenant_tag, user_tag in db.execute(
            "SELECT tenant, user, tenant_tag, user_tag FROM fair_tags WHERE lane = 'fast'"
        ).fetchall()
    }


def _compare(
    path: Path, window: int, per_model: bool, with_new: bool, new_model: str | None = "any"
) -> list[str]:
    """The claim under test beside the reference, in one transaction rolled back after
    (``with_new``: admitting u1 of g1's job, of ``new_model``, else one of the window's
    choosing); the keys of the jobs it released."""
    db = sqlite_utils.Database(sqlite3.connect(path))
    model = MODELS[window % 3] if new_model == "any" else new_model
    admitted = make_job(10_000, model, user="u1", tenant="g1") if with_new else None
    moment = utcnow()
    stale = (moment - timedelta(seconds=CLAIM_SECONDS)).isoformat()
    try:
        db.execute("BEGIN IMMEDIATE")
        new = None if admitted is None else _as_waiting(admitted)
        expected, more, held, waiting = _reference(db, window, per_model, stale, new)
        tags = _fair_tags(db)
        by_id = {job.job_id: job for job in waiting}
        for release in expected:
            tags[(by_id[release.job_id].tenant, by_id[release.job_id].user)] = (
                release.tenant_tag,
                release.user_tag,
            )

        claim, own = _claim(db, "fast", window, moment, per_model, admitted)

        assert [record.job.job_id for record in claim.records] == [
            release.job_id for release in expected
        ]
        assert claim.more == more
        assert claim.held == held
        assert _fair_tags(db) == tags
        for release in expected:
            if admitted is not None and release.job_id == admitted.job_id:
                assert own == release
            else:
                row = db.execute(
                    "SELECT tenant_tag, user_tag FROM jobs WHERE job_id = ?", [release.job_id]
                ).fetchone()
                assert tuple(row) == (release.tenant_tag, release.user_tag)
        return [record.job.idempotency_key for record in claim.records]
    finally:
        db.conn.rollback()
        db.conn.close()


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    jobs=held_jobs,
    before=steps,
    window=st.integers(1, 8),
    per_model=st.booleans(),
    with_new=st.booleans(),
)
def test_a_claim_releases_what_reading_every_held_job_released(
    jobs: list[Held], before: list[Step], window: int, per_model: bool, with_new: bool
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ledger.sqlite3"
        asyncio.run(_build(path, jobs, before))
        _compare(path, window, per_model, with_new)


def test_a_model_that_fills_during_a_claim_makes_a_tenants_oldest_job_newer(
    tmp_path: Path,
) -> None:
    """g2's oldest job needs model a, whose window fills with g1's job: g2's next job,
    of model b, is newer than g3's, so g3 goes first. (Read before the claim, g2's place
    was ahead of g3's: it must be read again once a model fills.)"""
    path = tmp_path / "ledger.sqlite3"
    a, b = MODELS[1], MODELS[2]
    jobs = [Held("g1", 0, a), Held("g2", 1, a), Held("g3", 2, b), Held("g2", 1, b)]
    asyncio.run(_build(path, jobs, []))

    assert _compare(path, window=1, per_model=True, with_new=False) == ["job-0", "job-2"]


def test_a_model_that_fills_during_a_claim_makes_a_users_oldest_job_newer(
    tmp_path: Path,
) -> None:
    """One tenant, a window of one per model. u0's job fills a; u1's next (b) waits
    behind u2's, which fills b; then u1's next (no model) is newer than u3's, so u3
    goes: each model that fills makes u1's place later."""
    path = tmp_path / "ledger.sqlite3"
    none, a, b = MODELS
    jobs = [
        Held("g1", 0, a),
        Held("g1", 1, a),
        Held("g1", 2, b),
        Held("g1", 1, b),
        Held("g1", 3, none),
        Held("g1", 1, none),
    ]
    asyncio.run(_build(path, jobs, []))

    assert _compare(path, window=1, per_model=True, with_new=False) == [
        "job-0",
        "job-2",
        "job-4",
    ]


def test_a_model_that_fills_makes_the_admitted_jobs_user_wait_its_turn(
    tmp_path: Path,
) -> None:
    """u1's place is known before the claim reads its tenant's other users (its job is
    being admitted, not yet written): its oldest job needs a, which u0's job fills. Its
    next is the admitted one, newer than u2's: u2 goes first."""
    path = tmp_path / "ledger.sqlite3"
    none, a, b = MODELS
    asyncio.run(_build(path, [Held("g1", 0, a), Held("g1", 1, a), Held("g1", 2, b)], []))

    released = _compare(path, window=1, per_model=True, with_new=True, new_model=none)

    assert released == ["job-0", "job-2", "job-10000"]


def test_tenants_whose_oldest_jobs_were_made_at_the_same_moment_go_by_job_id(
    tmp_path: Path,
) -> None:
    """g1 and g2 each have a job made at the same moment; g1's has the smaller id, so g1
    goes first, as in ``fair_order``. The grouped read of the tenants gives one job id
    of each group's oldest, here g1's larger one (u0's, first in the index)."""
    path = tmp_path / "ledger.sqlite3"
    moment = utcnow()

    async def build() -> None:
        ledger = Ledger(path)
        await ledger.open()
        try:
            for n, (tenant, user, job_id) in enumerate(
                [("g1", "u0", "z"), ("g1", "u1", "a"), ("g2", "u0", "m")]
            ):
                job = make_job(n, user=user, tenant=tenant)
                await ledger.admit(
                    job.model_copy(update={"job_id": job_id, "created_at": moment}), window=0
                )
        finally:
            await ledger.close()

    asyncio.run(build())

    assert _compare(path, window=1, per_model=False, with_new=False) == ["job-1"]


async def test_a_claim_reads_the_held_jobs_from_the_index_alone(tmp_path: Path) -> None:
    """Each statement that reads the unclaimed held jobs searches ``idx_jobs_unclaimed``
    (or its twin in tenant and model order) and reads no table row: its cost is an
    index entry per held job it looks at. Only the read of a tenant's users sorts (by
    their places, in SQLite); users are read only as far as the claim goes.
    The lapsed claims are a range of the window's index (made unclaimed)."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    await ledger.open()
    try:
        for n in range(30):
            await ledger.admit(_job(n, Held("g1", n % 3, MODELS[n % 2])), window=0)
        statements: list[str] = []

        def claim(db: sqlite_utils.Database) -> list[tuple[str, list[str]]]:
            db.conn.set_trace_callback(statements.append)
            try:
                with db.conn:
                    _claim(db, "fast", 4, utcnow())  # room 4: the next jobs of each user too
            finally:
                db.conn.set_trace_callback(None)
            return [
                (sql, [str(step[3]) for step in db.execute(f"EXPLAIN QUERY PLAN {sql}")])
                for sql in statements
                if "idx_jobs_unclaimed" in sql or "claimed_at <" in sql
            ]

        plans = await ledger._run(claim)
    finally:
        await ledger.close()
    (lapsed_sql, lapsed), *unclaimed = plans
    assert lapsed_sql.startswith("UPDATE jobs SET claimed_at = NULL")
    assert len(lapsed) == 1 and "idx_jobs_window" in lapsed[0] and "claimed_at<?" in lapsed[0]
    # The tenants, g1's users in order, then each user's oldest jobs per model (three
    # users: u0 is served twice, read once).
    assert len(unclaimed) == 1 + 1 + 3
    for sql, plan in unclaimed:
        searches = [step for step in plan if "jobs" in step and "fair_tags" not in step]
        assert searches and all("COVERING INDEX idx_jobs_unclaimed" in s for s in searches), plan
        sorts = [step for step in plan if "TEMP B-TREE" in step]
        assert not sorts or "ORDER BY tag, first" in sql, (sql, plan)
    tenants = unclaimed[0][1]
    assert len(tenants) == 1 and "COVERING INDEX idx_jobs_unclaimed_models" in tenants[0]
    assert sum("ORDER BY tag, first" in sql for sql, _ in unclaimed) == 1


async def test_an_admission_with_nothing_of_its_tenant_held_reads_no_users(
    tmp_path: Path,
) -> None:
    """While renderers keep up, the job being admitted is its tenant's only held job: the
    claim reads the tenants' counts, and of g1's users nothing (no read of its users in
    order, none of its user's jobs). g2's held job, older, still goes first: its users
    are read."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    await ledger.open()
    try:
        await ledger.admit(_job(0, Held("g2", 0, None)), window=0)  # held
        admitted = _job(1, Held("g1", 1, None))
        statements: list[str] = []

        def claim(db: sqlite_utils.Database) -> list[str]:
            db.conn.set_trace_callback(statements.append)
            try:
                with db.conn:
                    found, _ = _claim(db, "fast", 2, utcnow(), admitted=admitted)
            finally:
                db.conn.set_trace_callback(None)
            return [record.job.idempotency_key for record in found.records]

        released = await ledger._run(claim)
    finally:
        await ledger.close()
    assert released == ["job-0", "job-1"]
    reads = [sql for sql in statements if "idx_jobs_unclaimed" in sql]
    # The tenants' counts; g2's users in order; g2's user's jobs. Nothing of g1's.
    assert len(reads) == 3, reads
    assert "idx_jobs_unclaimed_models" in reads[0]
    assert all("'g1'" not in sql for sql in reads[1:]), reads


def test_no_tenant_and_an_empty_tenant_are_one_tenant(tmp_path: Path) -> None:
    """A job without a tenant or user (the CLI's) and one whose tenant and user are ""
    take turns as one tenant's one user, as in ``fair_order`` (which reads both as "")."""
    path = tmp_path / "ledger.sqlite3"

    async def build() -> None:
        ledger = Ledger(path)
        await ledger.open()
        try:
            for n in range(4):
                made = make_job(n)  # no tenant, no user
                if n % 2:
                    origin = made.origin.model_copy(update={"tenant": "", "user": ""})
                    made = made.model_copy(update={"origin": origin})
                await ledger.admit(made, window=0)
            await ledger.admit(make_job(4, user="u0", tenant="g1"), window=0)
        finally:
            await ledger.close()

    asyncio.run(build())

    assert _compare(path, window=3, per_model=False, with_new=False) == [
        "job-0",
        "job-4",
        "job-1",
    ]
