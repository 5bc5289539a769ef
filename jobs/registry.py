"""The fleet as a frontend sees it: the latest heartbeat of every renderer.

Memory only, on purpose: heartbeats are news. A frontend that restarts knows the fleet
again within one heartbeat interval.
"""

from __future__ import annotations

from datetime import timedelta

import structlog
from pydantic import ValidationError

from jobs.broker import Delivery, Subscription
from jobs.bus import JobBus
from jobs.models import Heartbeat, WorkerState, utcnow

log = structlog.get_logger(__name__)

#: A renderer silent for this many of its own intervals is taken for gone.
MISSED_BEATS = 3


class WorkerRegistry:
    def __init__(self, bus: JobBus, frontend_id: str) -> None:
        self._bus = bus
        self._frontend_id = frontend_id
        self._beats: dict[str, Heartbeat] = {}
        self._subscription: Subscription | None = None

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
