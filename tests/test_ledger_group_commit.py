"""Group commit (``Ledger.admit``): admissions that arrive together (in one turn of the
event loop) share one transaction, each in a savepoint, so one's refusal leaves the
others written. The transaction runs on the loop's thread when the file is free, else in
a worker thread."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from jobs.ledger import INLINE_HELD, Ledger
from jobs.models import Job
from jobs.quotas import QuotaExceeded, QuotaSettings
from tests.fixtures.jobs import job


def _transactions(statements: list[str]) -> int:
    return sum(1 for sql in statements if sql == "BEGIN IMMEDIATE")


async def test_a_burst_shares_one_transaction_and_a_refusal_stays_its_own(
    ledger: Ledger,
) -> None:
    statements: list[str] = []
    ledger._file._db.conn.set_trace_callback(statements.append)  # type: ignore[union-attr]
    one_at_a_time = QuotaSettings(concurrent_per_user=1)
    first = job(0, user="ann")
    again = first.model_copy(update={"job_id": "another-id"})  # same idempotency key
    over = job(1, user="ann")  # a second job in flight: over ann's limit
    others = [job(n, user=f"user{n}") for n in range(2, 8)]
    burst: list[Job] = [first, again, over, *others]
    results = await asyncio.gather(
        *(ledger.admit(each, one_at_a_time, window=100) for each in burst),
        return_exceptions=True,
    )

    assert _transactions(statements) == 1
    _, created, claim = results[0]  # type: ignore[misc]
    assert created and [r.job.job_id for r in claim.records] == [first.job_id]
    repeated, created_again, _ = results[1]  # type: ignore[misc]
    assert not created_again and repeated.job.job_id == first.job_id
    assert isinstance(results[2], QuotaExceeded)
    assert results[2].limit == "concurrent_per_user"
    for each, result in zip(others, results[3:], strict=True):
        assert not isinstance(result, BaseException), result
        assert result[1] and result[0].job.job_id == each.job_id
    # What is in the file: every admitted job, nothing of the refused one.
    assert await ledger.get(over.job_id) is None
    assert await ledger.get("another-id") is None
    for each in [first, *others]:
        assert await ledger.get(each.job_id) is not None


async def test_a_caller_cancelled_before_its_transaction_leaves_nothing(
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    await ledger.open()
    try:
        leading = asyncio.create_task(ledger.admit(job(0), window=10))
        await asyncio.sleep(0)  # its transaction is under way
        follower = asyncio.create_task(ledger.admit(job(1), window=10))
        await asyncio.sleep(0)  # waiting for the next transaction
        follower.cancel()
        with pytest.raises(asyncio.CancelledError):
            await follower
        await leading
        await ledger.close()  # waits for the writer: the cancelled job was never taken

        await ledger.open()
        assert await ledger.get_by_key("job-0") is not None
        assert await ledger.get_by_key("job-1") is None
    finally:
        await ledger.close()


async def test_admissions_while_another_connection_writes_wait_in_a_thread(
    ledger: Ledger, tmp_path: Path
) -> None:
    """Another connection (the API's tables, another process) holds the file's write
    lock: the admissions do not wait for it on the loop; a worker thread writes them,
    each once, when the lock is free."""
    other = sqlite3.connect(tmp_path / "ledger.sqlite3", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        first = asyncio.ensure_future(ledger.admit(job(0), window=10))
        await asyncio.sleep(0.2)
        later = asyncio.ensure_future(ledger.admit(job(1), window=10))
        await asyncio.sleep(0.05)
        assert not first.done() and not later.done()
        other.execute("COMMIT")
        results = await asyncio.wait_for(asyncio.gather(first, later), 10)
    finally:
        other.close()
    assert [created for _, created, _ in results] == [True, True]
    for n in (0, 1):
        assert await ledger.get_by_key(f"job-{n}") is not None


async def test_a_retry_alone_gets_its_job_though_its_reservation_fills_the_limit(
    ledger: Ledger,
) -> None:
    """The first admission's own reservation puts a retry of it over the user's limit:
    the retry still gets the job admitted first, not a refusal."""
    one_at_a_time = QuotaSettings(concurrent_per_user=1)
    first = job(0, user="ann")
    record, created, _ = await ledger.admit(first, one_at_a_time, window=10)
    again = first.model_copy(update={"job_id": "another-id"})  # same idempotency key
    repeated, created_again, claim = await ledger.admit(again, one_at_a_time, window=10)
    assert created and not created_again
    assert repeated.job.job_id == record.job.job_id == first.job_id
    assert claim.records == []
    with pytest.raises(QuotaExceeded):  # another job of ann's is refused
        await ledger.admit(job(1, user="ann"), one_at_a_time, window=10)
    assert await ledger.get("another-id") is None


async def test_admissions_behind_a_long_backlog_are_written_in_a_thread(
    tmp_path: Path,
) -> None:
    """A claim reads every held job of its lane (with model affinity's per-model windows,
    on every admission: 23 ms at 10,000). Once a lane's last claim read more than
    ``INLINE_HELD``, its admissions are written in a worker thread, not on the loop; once
    the backlog is gone, on the loop again."""
    ledger = Ledger(tmp_path / "ledger.sqlite3", per_model=True)
    await ledger.open()
    threads: set[int] = set()
    ledger._file._db.conn.set_trace_callback(  # type: ignore[union-attr]
        lambda _: threads.add(threading.get_ident())
    )
    loop_thread = threading.get_ident()

    async def written_by(n: int, window: int) -> set[int]:
        threads.clear()
        await ledger.admit(job(n, "a.safetensors"), window=window)
        return set(threads)

    try:
        assert await written_by(0, window=0) == {loop_thread}  # held: the window is 0
        for n in range(1, INLINE_HELD + 1):
            await ledger.admit(job(n, "a.safetensors"), window=0)
        # The last one's claim read INLINE_HELD + 1 held jobs.
        assert loop_thread not in await written_by(INLINE_HELD + 1, window=0)
        claim = await ledger.release("fast", INLINE_HELD + 10)  # every held job goes
        assert len(claim.records) == INLINE_HELD + 2
        # The release read them all, so the next admission still goes to a thread; its
        # claim finds one held job (itself), and the one after is on the loop again.
        assert loop_thread not in await written_by(INLINE_HELD + 2, window=0)
        assert await written_by(INLINE_HELD + 3, window=0) == {loop_thread}
    finally:
        await ledger.close()
