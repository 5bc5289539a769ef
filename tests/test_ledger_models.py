"""The ledger with model affinity (``Ledger(per_model=True)``): each model's queue has
its own window, and a job's queue position counts the jobs of its model ahead of it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from jobs.ledger import Ledger
from jobs.models import Job
from tests.fixtures.jobs import job as make_job

A, B = "a_sd15.safetensors", "b_sd15.safetensors"


def job(n: int, model: str | None) -> Job:
    """Job ``n``, from one of three users of one guild (the fair order takes turns)."""
    return make_job(n, model, user=f"u{n % 3}")


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    ledger = Ledger(tmp_path / "ledger.sqlite3", per_model=True)
    await ledger.open()
    yield ledger
    await ledger.close()


async def admit(ledger: Ledger, jobs: list[Job], window: int) -> list[str]:
    """Admit ``jobs``, publishing what each admission claims; the ids published."""
    published = []
    for each in jobs:
        _, created, claim = await ledger.admit(each, window=window)
        assert created
        for record in claim.records:
            await ledger.mark_published(record.job.job_id)
            published.append(record.job.job_id)
    return published


async def test_each_model_has_its_own_window(ledger: Ledger) -> None:
    jobs = [job(n, A) for n in range(4)] + [job(n, B) for n in range(4, 8)] + [job(8, None)]

    published = await admit(ledger, jobs, window=2)

    # Two of A's, two of B's and the one that needs no model: a lane-wide window of 2
    # would have shown the renderers A's jobs only.
    assert published == [
        jobs[0].job_id,
        jobs[1].job_id,
        jobs[4].job_id,
        jobs[5].job_id,
        jobs[8].job_id,
    ]
    claim = await ledger.release("fast", 2)
    assert claim.records == [] and not claim.more


async def test_a_job_waits_behind_its_own_models_jobs_only(ledger: Ledger) -> None:
    jobs = [job(0, A), job(1, B), job(2, A), job(3, B), job(4, A), job(5, A)]

    await admit(ledger, jobs, window=2)

    positions = [await ledger.position(each.job_id) for each in jobs]
    # Released: A#0 1st, A#2 2nd of A; B#1 1st, B#3 2nd of B. Held: A#4 and A#5 come
    # after the two of A at the broker.
    assert positions == [1, 1, 2, 2, 3, 4]
