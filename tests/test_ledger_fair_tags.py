"""The fair order reads the tags of the tenants that have jobs waiting, not every user the
lane has served (``jobs/ledger.py``, ``_fair_state``): the order is the same as when it
reads the whole lane, which it still does when very many tenants wait at once."""

from __future__ import annotations

from pathlib import Path

import pytest

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


async def test_the_order_is_the_lanes_whichever_tags_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tenants served before (their tags and the lane's clock are in fair_tags; t0 set
    # the clock and has nothing waiting later), some of which have jobs again, and new
    # ones.
    early = [job(n, user="u0", tenant="t0") for n in range(5)]
    early += [job(n, user=f"u{n % 3}", tenant=f"t{n % 5}") for n in range(5, 15)]
    late = [job(100 + n, user=f"u{n % 2}", tenant=f"t{n % 4 + 3}") for n in range(12)]
    targeted, targeted_tags = await _releases(tmp_path / "a.sqlite3", early, late)
    monkeypatch.setattr(jobs.ledger, "_TENANTS_PER_READ", 0)  # always the whole lane
    whole, whole_tags = await _releases(tmp_path / "b.sqlite3", early, late)

    assert len(targeted) == 15 - 7 + 12
    assert targeted == whole
    assert targeted_tags == whole_tags
    # A tenant served before comes back at the lane's round, not ahead of new ones:
    # the first of the late jobs from t6 (never served) is not behind t3's second.
    t6 = [j.job_id for j in late if j.origin.tenant == "t6"]
    t3 = [j.job_id for j in [*early, *late] if j.origin.tenant == "t3"]
    assert targeted.index(t6[0]) < sorted(targeted.index(i) for i in t3 if i in targeted)[1]
