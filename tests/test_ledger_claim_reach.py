"""A claim reads only the held jobs the fair order can reach (``jobs/ledger.py``,
``_claimable``): each user's oldest few per model, found through ``idx_jobs_unclaimed``.
It must release exactly what reading every held job released: the same jobs, in the
same order, with the same tags, the same ``more`` and the same count of held jobs."""

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
    """What a claim read before ``_claimable``: every held job not freshly claimed."""
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


def _compare(path: Path, window: int, per_model: bool, with_new: bool) -> None:
    """The claim under test beside the reference, in one transaction rolled back after."""
    db = sqlite_utils.Database(sqlite3.connect(path))
    admitted = make_job(10_000, MODELS[window % 3], user="u1", tenant="g1") if with_new else None
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


async def test_a_claim_reads_the_held_jobs_from_the_index_alone(tmp_path: Path) -> None:
    """Each statement that reads the unclaimed held jobs searches ``idx_jobs_unclaimed``
    and reads nothing else (no table row, no sort): its cost is an index entry per held
    job. The lapsed claims are a range of the window's index."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    await ledger.open()
    try:
        for n in range(30):
            await ledger.admit(_job(n, Held("g1", n % 3, MODELS[n % 2])), window=0)
        statements: list[str] = []

        def claim(db: sqlite_utils.Database) -> list[list[str]]:
            db.conn.set_trace_callback(statements.append)
            try:
                with db.conn:
                    _claim(db, "fast", 4, utcnow())  # room 4: the next jobs of each user too
            finally:
                db.conn.set_trace_callback(None)
            return [
                [str(step[3]) for step in db.execute(f"EXPLAIN QUERY PLAN {sql}").fetchall()]
                for sql in statements
                if "idx_jobs_unclaimed" in sql or "claimed_at <" in sql
            ]

        plans = await ledger._run(claim)
    finally:
        await ledger.close()
    # The lapsed claims, a range of idx_jobs_window (claimed before the lapse: none
    # here); then the users' oldest, then each user's next per model.
    lapsed, *unclaimed = plans
    assert len(unclaimed) == 1 + 3 * 2
    for plan in unclaimed:
        assert len(plan) == 1 and "COVERING INDEX idx_jobs_unclaimed" in plan[0], plan
    assert len(lapsed) == 1 and "idx_jobs_window" in lapsed[0] and "claimed_at<?" in lapsed[0]
