"""Cancelling jobs, wherever they are, and retrying dead ones.

A cancel is recorded in the frontend's ledger at once (the user sees ``cancelled`` right
away, and a result that still arrives is dropped as a second terminal event), then sent
to every renderer on the control fanout: the renderer running the job stops it (the
ComfyUI backend interrupts exactly that prompt), and any renderer that is later handed
the job while it remembers the cancel skips it.

A retry takes a failed job out of the dead-letter queue (``take_dead``), puts it back to
``queued`` in the ledger with its images reserved again, and publishes it once more with
``retries`` counted up, so its attempts go on counting and its events are news.
"""

from __future__ import annotations

from enum import Enum

import structlog

from jobs.bus import JobBus
from jobs.deadletters import SYSTEM_WORKER, take_dead
from jobs.ledger import Ledger
from jobs.models import Control, ControlAction, Failed, FailureReason, JobStatus
from jobs.tracker import JobTracker

log = structlog.get_logger(__name__)

CANCELLED_MESSAGE = "This job was cancelled."


class RetryOutcome(str, Enum):
    RETRIED = "retried"
    NOT_FAILED = "not_failed"
    CANCELLED = "cancelled"
    NOT_DEAD = "not_dead"
    NOT_FOUND = "not_found"


class CancelOutcome(str, Enum):
    CANCELLED = "cancelled"
    ALREADY_FINISHED = "already_finished"
    NOT_FOUND = "not_found"


class JobControl:
    def __init__(self, bus: JobBus, ledger: Ledger, tracker: JobTracker) -> None:
        self._bus = bus
        self._ledger = ledger
        self._tracker = tracker

    async def cancel(self, job_id: str, *, requested_by: str | None = None) -> CancelOutcome:
        record = await self._ledger.get(job_id)
        if record is None:
            return CancelOutcome.NOT_FOUND
        if record.status.terminal:
            return CancelOutcome.ALREADY_FINISHED
        await self._bus.control(
            Control(action=ControlAction.CANCEL, job_id=job_id, requested_by=requested_by)
        )
        await self._tracker.record(
            Failed(
                job_id=job_id,
                attempt=max(record.attempt or 1, 1),
                worker_id=SYSTEM_WORKER,
                seq=0,
                reason=FailureReason.CANCELLED,
                message=CANCELLED_MESSAGE,
            )
        )
        log.info("job.failed", job_id=job_id, reason="cancelled", requested_by=requested_by)
        return CancelOutcome.CANCELLED

    async def retry(self, job_id: str, *, requested_by: str | None = None) -> RetryOutcome:
        """Send a failed job from the dead-letter queue back to its lane."""
        record = await self._ledger.get(job_id)
        if record is None:
            return RetryOutcome.NOT_FOUND
        if record.status is not JobStatus.FAILED:
            return RetryOutcome.NOT_FAILED
        if (
            isinstance(record.terminal, Failed)
            and record.terminal.reason is FailureReason.CANCELLED
        ):
            return RetryOutcome.CANCELLED  # someone meant it to stop
        async with take_dead(self._bus, job_id) as dead:
            if dead is None:
                return RetryOutcome.NOT_DEAD
            job = dead.model_copy(update={"retries": dead.retries + 1})
            detail = f"retried by {requested_by or 'an admin'}"
            if not await self._ledger.reopen(job, detail):
                return RetryOutcome.NOT_FAILED
            self._tracker.reopen(job_id)
            await self._bus.submit(job)
            await self._ledger.mark_published(job_id)
        log.info("job.retried", job_id=job_id, retries=job.retries, requested_by=requested_by)
        return RetryOutcome.RETRIED
