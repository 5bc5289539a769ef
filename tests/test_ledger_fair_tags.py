"""The fair order reads the tags of the tenants that have jobs waiting, not every user the
lane has served (``jobs/ledger.py``, ``_fair_state``): the order is the same as when it
reads the whole lane, which it still does when very many tenants wait at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlite_utils

import jobs.ledger
from jobs.ledger import Ledger
from jobs.models import Job
from tests.fixtures.jobs import job


async def _releases(
    path: Path, early: list[Job], late: list[Job]
) -> tuple[list[str], list[tuple[str, str, int, int]]]:
    """Hold ``early``, release 7 of them (published), then hold ``late`` too and release
    everything: the ids in the order of that last release, and the tags it left."""
    ledger = Ledger(path)
    await ledger.open()
    try:
        for each in early:
            await ledger.admit(each, window=0)
        first = await ledger.release("fast", 7)
        for record in first.records:
            ledger.confirmed(record.job.job_id)
        await ledger.flush()
        for each in late:
            await ledger.admit(each, window=0)
        rest = await ledger.release("fast", 1000)
        tags = await ledger._run(
            lambda db: db.execute("SELECT * FROM fair_tags ORDER BY tenant, user").fetchall()
        )
        return [record.job.job_id for record in rest.records], tags
    finally:
        await ledger.close()


async def _both_ways(
    folder: Path, monkeypatch: pytest.MonkeyPatch, early: list[Job], late: list[Job]
) -> list[str]:
    """The last release's order (:func:`_releases`) as the ledger reads the tags, checked
    against the same with the whole lane's tags read: the same order, the same tags."""
    targeted, targeted_tags = await _releases(folder / "a.sqlite3", early, late)
    monkeypatch.setattr(jobs.ledger, "_TENANTS_PER_READ", 0)  # always the whole lane
    whole, whole_tags = await _releases(folder / "b.sqlite3", early, late)
    assert targeted == whole
    assert targeted_tags == whole_tags
    return targeted


async def test_the_order_is_the_lanes_whichever_tags_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tenants served before (their tags and the lane's clock are in fair_tags; t0 set
    # the clock and has nothing waiting later), some of which have jobs again, and new
    # ones.
    early = [job(n, user="u0", tenant="t0") for n in range(5)]
    early += [job(n, user=f"u{n % 3}", tenant=f"t{n % 5}") for n in range(5, 15)]
    late = [job(100 + n, user=f"u{n % 2}", tenant=f"t{n % 4 + 3}") for n in range(12)]
    targeted = await _both_ways(tmp_path, monkeypatch, early, late)

    assert len(targeted) == 15 - 7 + 12
    # A tenant served before comes back at the lane's round, not ahead of new ones:
    # the first of the late jobs from t6 (never served) is not behind t3's second.
    t6 = [j.job_id for j in late if j.origin.tenant == "t6"]
    t3 = [j.job_id for j in [*early, *late] if j.origin.tenant == "t3"]
    assert targeted.index(t6[0]) < sorted(targeted.index(i) for i in t3 if i in targeted)[1]


async def test_a_big_tenants_order_reads_the_waiting_users_tags_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A guild whose 300 users have all been served in the lane, and a small one. Then a
    # few of the guild's users, one of its new users and the small guild's users wait.
    early = [job(n, user=f"u{n}", tenant="big") for n in range(300)]
    early += [job(300 + n, user=f"s{n % 2}", tenant="small") for n in range(4)]
    late = [job(1000 + n, user=f"u{n * 37 % 300}", tenant="big") for n in range(6)]
    late += [job(1010, user="newcomer", tenant="big")]
    late += [job(1020 + n, user=f"s{n % 3}", tenant="small") for n in range(5)]
    targeted = await _both_ways(tmp_path, monkeypatch, early, late)

    assert len(targeted) == 304 - 7 + 12


async def test_the_tags_are_looked_up_through_indexes() -> None:
    ledger = Ledger(":memory:")
    await ledger.open()
    try:

        def plans(db: sqlite_utils.Database) -> list[str]:
            users = {"big": {"u1", "u2"}}
            statements: list[str] = []
            trace = db.conn.set_trace_callback
            trace(statements.append)
            try:
                jobs.ledger._waiting_tags(db, "fast", 0, users)
            finally:
                trace(None)
            return [
                str(row[3])
                for sql in statements
                if sql.startswith("SELECT")
                for row in db.execute(f"EXPLAIN QUERY PLAN {sql}").fetchall()
            ]

        # No rows yet: the tenant's lookup finds nothing and no user is read; add one.
        await ledger._run(
            lambda db: db.execute(
                "INSERT INTO fair_tags VALUES ('fast', 'big', 'u1', 3, 5)"
            ).connection.commit()
        )
        found = await ledger._run(plans)
    finally:
        await ledger.close()
    assert any("idx_fair_tags_tenant" in plan for plan in found), found
    assert any("(lane=? AND tenant=? AND user=?)" in plan for plan in found), found
    assert not any(plan.startswith("SCAN") for plan in found), found
