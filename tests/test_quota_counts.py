"""The quota counts of an admission (``jobs/quotas.py``, ``reserve``): each is read from
the index entries it counts, never from every reservation the tenant ever made. A busy
guild has hundreds of thousands, and these reads happen in every admission's write
transaction (before, 100,000 old reservations cost each admission about 12 ms here)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils

from jobs import quotas
from jobs.ledger import Ledger
from jobs.models import utcnow
from jobs.quotas import QuotaSettings
from jobs.sql import immediate
from tests.fixtures.jobs import job

ALL_LIMITS = QuotaSettings(
    images_per_day=1000, images_per_user_per_day=100, concurrent_per_user=5, pending_per_tenant=50
)


def _reservations(db: sqlite_utils.Database) -> None:
    """Old days of a busy guild, and today's mix for ann and bob."""
    now = utcnow()
    rows: list[tuple[Any, ...]] = [
        (f"old-{n}", "g", f"u{n % 7}", 1, "charged", (now - timedelta(days=2 + n % 30)).isoformat())
        for n in range(300)
    ]
    rows += [
        ("old-reserved", "g", "ann", 1, "reserved", (now - timedelta(days=1)).isoformat()),
        ("ann-1", "g", "ann", 2, "charged", now.isoformat()),
        ("ann-2", "g", "ann", 1, "reserved", now.isoformat()),
        ("ann-3", "g", "ann", 4, "refunded", now.isoformat()),
        ("bob-1", "g", "bob", 3, "reserved", now.isoformat()),
        ("other-guild", "h", "ann", 9, "charged", now.isoformat()),
    ]
    with immediate(db):
        db.conn.executemany(
            "INSERT INTO reservations (job_id, tenant, user, images, state, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )


async def test_the_counts_are_right_and_read_only_what_they_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    await ledger.open()
    try:
        await ledger._run(_reservations)
        usage = await ledger.usage("g", "ann", ALL_LIMITS)
        # Today's reserved and charged (not refunded, not other days, not other guilds);
        # in flight and pending: every reservation not yet settled, whatever its day.
        assert (usage.tenant_images_today, usage.user_images_today) == (2 + 1 + 3, 2 + 1)
        assert (usage.user_in_flight, usage.tenant_pending) == (2, 3)

        read: list[tuple[str, list[Any]]] = []
        scalar = quotas._Counts._scalar

        def recorded(self: quotas._Counts, sql: str, params: list[Any]) -> int:
            read.append((sql, params))
            return scalar(self, sql, params)

        monkeypatch.setattr(quotas._Counts, "_scalar", recorded)
        for n, (limits, reads) in enumerate(
            ((ALL_LIMITS, 4), (QuotaSettings(concurrent_per_user=5), 1))
        ):
            read.clear()
            await ledger.admit(job(n, user="ann"), limits)  # within every limit
            assert len(read) == reads  # only the counts of the limits that are set
            plans = await ledger._run(lambda db: [_plan(db, *each) for each in read])
            for plan in plans:
                assert not any(step.startswith("SCAN") for step in plan), plan
                # Every search is narrower than the tenant: by day, by user, or in the
                # partial index of the reservations not yet settled.
                assert all(
                    "created_at>" in step or "user=" in step or "idx_reservations_reserved" in step
                    for step in plan
                ), plan
    finally:
        await ledger.close()


def _plan(db: sqlite_utils.Database, sql: str, params: list[Any]) -> list[str]:
    return [str(row[3]) for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", params).fetchall()]


async def test_a_file_from_before_gets_the_new_indexes(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    db = sqlite_utils.Database(path)
    db.table("reservations").create(
        {"job_id": str, "tenant": str, "user": str, "images": int, "state": str, "created_at": str},
        pk="job_id",
    )
    db.table("reservations").create_index(["tenant", "created_at"])
    db.table("reservations").create_index(["tenant", "user", "state"])
    db.conn.close()

    ledger = Ledger(path)
    await ledger.open()
    try:
        names = await ledger._run(
            lambda db: {index.name for index in db.table("reservations").indexes}
        )
    finally:
        await ledger.close()
    assert {
        "idx_reservations_day",
        "idx_reservations_user_day",
        "idx_reservations_reserved",
    } <= names
    assert not names & {
        "idx_reservations_tenant_created_at",
        "idx_reservations_tenant_user_state",
    }
