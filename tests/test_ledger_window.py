"""The window's count (``jobs/ledger.py``, ``_waiting_by_model``): the jobs waiting at
the broker are the published ones and those claimed since the claims' lapse, never the
backlog that fair release holds, and counting them reads only those index entries."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import sqlite_utils

from jobs.ledger import Ledger, _waiting_at_broker, _waiting_by_model, _waiting_query, _write
from jobs.models import Accepted, Job
from tests.fixtures.jobs import job

A = "a_sd15.safetensors"
STALE = "2001-01-01T00:00:00+00:00"
LONG_AGO = "2000-01-01T00:00:00+00:00"


def _per_model(jobs: list[Job]) -> dict[str | None, int]:
    counts: dict[str | None, int] = {}
    for each in jobs:
        counts[each.model] = counts.get(each.model, 0) + 1
    return counts


async def test_the_count_is_the_published_and_the_freshly_claimed_only(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    await ledger.open()
    try:
        for n in range(40):
            await ledger.admit(job(n, A if n % 2 else None), window=0)  # all held
        claimed = await ledger.release("fast", 12)
        published = claimed.records[:8]  # the broker confirmed these
        for record in published:
            ledger.confirmed(record.job.job_id)
        await ledger.flush()
        # Two published jobs were taken by a renderer: no longer at the broker.
        for record in published[:2]:
            await ledger.apply(Accepted(job_id=record.job.job_id, attempt=1, worker_id="w", seq=0))
        # One claim lapsed long ago (its release died before the publish).
        lapsed = claimed.records[8].job.job_id
        await ledger._run(
            lambda db: _write(
                db,
                "UPDATE jobs SET claimed_at = '2000-01-01T00:00:00+00:00' WHERE job_id = ?",
                lapsed,
            )
        )
        at_broker = [record.job for record in published[2:]]
        fresh_claims = [record.job for record in claimed.records[9:]]

        by_model = await ledger._run(lambda db: _waiting_by_model(db, "fast", STALE))
        assert by_model == _per_model([*at_broker, *fresh_claims])
        assert await ledger._run(lambda db: _waiting_at_broker(db, "fast")) == len(at_broker)
        in_all = await ledger._run(lambda db: _waiting_at_broker(db, "fast", STALE))
        assert in_all == len(at_broker) + len(fresh_claims)

        # It reads index ranges of the published and of the claimed since the lapse,
        # never every queued job of the lane (the 28 held here, thousands in a backlog).
        for stale in (STALE, None):
            for grouped in (True, False):
                searches = await ledger._run(
                    partial(_index_searches, stale=stale, by_model=grouped)
                )
                assert searches and all("published=?" in search for search in searches)
                assert len(searches) == (1 if stale is None else 2), searches
        # The count in all (every admission's) needs no sort.
        plan = await ledger._run(partial(_plan, stale=STALE, by_model=False))
        assert not any("TEMP B-TREE" in step for step in plan), plan
    finally:
        await ledger.close()


def _plan(db: sqlite_utils.Database, stale: str | None, by_model: bool) -> list[str]:
    """SQLite's plan for the count."""
    sql, params = _waiting_query("fast", stale, by_model=by_model)
    return [str(row[3]) for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", params).fetchall()]


def _index_searches(db: sqlite_utils.Database, stale: str | None, by_model: bool) -> list[str]:
    """What SQLite's plan for the count does with ``idx_jobs_window``."""
    return [step for step in _plan(db, stale, by_model) if "idx_jobs_window" in step]
