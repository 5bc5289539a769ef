"""The fleet as a frontend sees it: the latest heartbeat of every renderer.

Memory only, on purpose: heartbeats are news. A frontend that restarts knows the fleet
again within one heartbeat interval.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from datetime import timedelta
from typing import TypeVar, cast

import structlog
from pydantic import ValidationError

from jobs.broker import Delivery, Subscription
from jobs.bus import JobBus
from jobs.models import Heartbeat, WorkerState, utcnow

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: A renderer silent for this many of its own intervals is taken for gone.
MISSED_BEATS = 3
#: What admission asks of the fleet on every job (how many renderers serve a lane, which
#: model files they can load) is worked out at most this often, and on every new beat.
SUMMARY_SECONDS = 1.0


class WorkerRegistry:
    def __init__(self, bus: JobBus, frontend_id: str) -> None:
        self._bus = bus
        self._frontend_id = frontend_id
        self._beats: dict[str, Heartbeat] = {}
        self._subscription: Subscription | None = None
        #: (what, lane) -> (when worked out, the answer): see SUMMARY_SECONDS.
        self._summaries: dict[tuple[str, str], tuple[float, object]] = {}

    async def start(self) -> None:
        self._subscription = await self._bus.consume_heartbeats(self._frontend_id, self._on_beat)

    async def stop(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            await subscription.cancel()

    async def _on_beat(self, delivery: Delivery) -> None:
        try:
            beat = Heartbeat.model_validate_json(delivery.body)
        except ValidationError as exc:
            log.warning("heartbeat.malformed", error=str(exc)[:300])
        else:
            known = self._beats.get(beat.worker_id)
            if known is None or known.at <= beat.at:
                self._beats[beat.worker_id] = beat
                self._summaries.clear()
        await delivery.ack()

    def workers(self) -> list[Heartbeat]:
        """Renderers heard from recently and not stopped, by worker id."""
        now = utcnow()
        alive = [
            beat
            for beat in self._beats.values()
            if beat.state is not WorkerState.STOPPED
            and now - beat.at <= timedelta(seconds=beat.interval * MISSED_BEATS)
        ]
        return sorted(alive, key=lambda beat: beat.worker_id)

    def serving(self, lane: str) -> int:
        """How many live renderers take ``lane``'s jobs."""
        return self._summary(
            "serving", lane, lambda: sum(1 for beat in self.workers() if lane in beat.lanes)
        )

    def loadable(self, lane: str, folders: Collection[str]) -> frozenset[str]:
        """The model files (in ``folders``) some live renderer of ``lane`` can load."""
        return self._summary(
            "loadable",
            lane,
            lambda: frozenset(
                file
                for beat in self.workers()
                if lane in beat.lanes
                for folder in folders
                for file in beat.available_models.get(folder, ())
            ),
        )

    def _summary(self, what: str, lane: str, work_out: Callable[[], T]) -> T:
        now = time.monotonic()
        known = self._summaries.get((what, lane))
        if known is not None and now - known[0] < SUMMARY_SECONDS:
            return cast(T, known[1])
        answer = work_out()
        self._summaries[(what, lane)] = (now, answer)
        return answer
