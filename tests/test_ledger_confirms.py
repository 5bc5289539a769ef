"""``Ledger.confirmed``: a job the broker confirmed is published for every read at once,
and the write lands in the background (batched), at the latest when the ledger closes."""

from __future__ import annotations

import asyncio
from pathlib import Path

from jobs.ledger import CONFIRM_BATCH_SECONDS, Ledger
from tests.fixtures.jobs import job


async def test_a_confirmed_job_reads_as_published_before_and_after_its_write(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path)
    await ledger.open()
    jobs = [job(n) for n in range(5)]
    for each in jobs:
        _, _, claim = await ledger.admit(each, window=10)
        assert [record.job.job_id for record in claim.records] == [each.job_id]

    for each in jobs:
        ledger.confirmed(each.job_id)
    # Before the background write: every read already counts them as published.
    record = await ledger.get(jobs[0].job_id)
    assert record is not None and record.published
    by_key = await ledger.get_by_key(jobs[1].idempotency_key)
    assert by_key is not None and by_key.published
    assert await ledger.unpublished() == []
    assert await ledger.position(jobs[4].job_id) is not None

    await ledger.flush()
    assert await ledger.unpublished() == []
    last = jobs.pop()
    ledger.confirmed("not-a-job")  # harmless: no row to mark
    await ledger.close()  # writes what is still pending

    again = Ledger(path)
    await again.open()
    try:
        for each in [*jobs, last]:
            record = await again.get(each.job_id)
            assert record is not None and record.published, each.job_id
        assert await again.unpublished() == []
    finally:
        await again.close()


async def test_a_job_confirmed_and_never_written_is_published_again(tmp_path: Path) -> None:
    """The write is lost (here: the ledger was closed under it): the row stays unpublished
    and claimed, so a later release publishes it again once the claim lapses."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    await ledger.open()
    admitted = job(0)
    await ledger.admit(admitted, window=10)
    await ledger._file.close()  # the file goes before the background write runs
    ledger.confirmed(admitted.job_id)
    await ledger.flush()  # logs the loss, raises nothing

    await ledger._file.open()
    try:
        record = await ledger.get(admitted.job_id)
        assert record is not None and not record.published
        assert [r.job.job_id for r in await ledger.unpublished()] == [admitted.job_id]
    finally:
        await ledger.close()


async def test_confirms_in_a_row_share_one_write_and_keep_their_order(tmp_path: Path) -> None:
    """Admissions in a row do not each pay a second transaction: confirms that come
    within ``CONFIRM_BATCH_SECONDS`` are written together, each with the moment it was
    confirmed, so queue positions still follow the order jobs were released in."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    await ledger.open()
    statements: list[str] = []
    ledger._file._db.conn.set_trace_callback(statements.append)  # type: ignore[union-attr]

    def marking_transactions() -> int:
        """Transactions that wrote "published" marks."""
        count, marking = 0, False
        for sql in statements:
            marking = marking or sql.startswith("UPDATE jobs SET published")
            if sql == "COMMIT":
                count, marking = count + marking, False
        return count

    try:
        jobs = [job(n) for n in range(6)]
        for each in jobs:
            await ledger.admit(each, window=10)
            ledger.confirmed(each.job_id)
        await asyncio.sleep(CONFIRM_BATCH_SECONDS * 4)  # the batch's own timer, no flush
        assert 1 <= marking_transactions() < len(jobs), statements
        assert await ledger.unpublished() == []
        assert [await ledger.position(each.job_id) for each in jobs] == [1, 2, 3, 4, 5, 6]
    finally:
        await ledger.close()
