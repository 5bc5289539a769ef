"""Cancelling jobs, wherever they are.

A cancel is recorded in the frontend's ledger at once (the user sees ``cancelled`` right
away, and a result that still arrives is dropped as a second terminal event), then sent
to every renderer on the control fanout: the renderer running the job stops it (the
ComfyUI backend interrupts exactly that prompt), and any renderer that is later handed
the job while it remembers the cancel skips it.
"""

from __future__ import annotations

from enum import Enum

import structlog

from jobs.bus import JobBus
from jobs.deadletters import SYSTEM_WORKER
from jobs.ledger import Ledger
from jobs.models import Control, ControlAction, Failed, FailureReason
from jobs.tracker import JobTracker

log = structlog.get_logger(__name__)

CANCELLED_MESSAGE = "This job was cancelled."


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
