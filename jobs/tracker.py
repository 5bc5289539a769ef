"""A frontend's view of its jobs: it consumes the frontend's event queue, records what
matters in the ledger, and hands events to whoever watches.

Ack policy: an event is acked after the ledger has recorded it (persistent events) or
after it was handed out (droppable ones). A failure in between leaves it unacked, so the
broker delivers it again.

Duplicates and stale frames are dropped here, once, for every frontend: an event not
newer than the last one seen for its job (by ``(attempt, seq)``) is dropped, and a
terminal event for a job the ledger already holds as terminal (a redelivered job that
rendered twice) is dropped. So each watcher sees at most one terminal event per job.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress

import structlog
from pydantic import ValidationError

from jobs.broker import Delivery, Subscription
from jobs.bus import JobBus
from jobs.ledger import Ledger
from jobs.models import Event, Failed, Succeeded, parse_event
from jobs.recent import RecentIds

log = structlog.get_logger(__name__)

Listener = Callable[[Event], Awaitable[None]]

#: Droppable events a slow watcher may have pending before newer ones replace them.
WATCH_BUFFER = 32
#: Recent events kept per running job, replayed to a watch that starts late (a frontend
#: learns the job id only once admission returns, and a fast renderer may be ahead).
REPLAY = 16
#: Finished jobs remembered, so their late progress and previews are dropped.
REMEMBERED_FINISHED = 10_000


class JobWatch:
    """Events of one job, in order, ending with its terminal event."""

    def __init__(self, tracker: JobTracker, job_id: str) -> None:
        self.job_id = job_id
        self._tracker = tracker
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self.dropped = 0

    def offer(self, event: Event) -> None:
        if not event.persistent and self._queue.qsize() >= WATCH_BUFFER:
            self.dropped += 1
            return
        self._queue.put_nowait(event)

    async def __aenter__(self) -> JobWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._tracker._unwatch(self)

    async def __aiter__(self) -> AsyncIterator[Event]:
        # The ledger may already hold the end (it arrived before we started watching).
        record = await self._tracker.ledger.get(self.job_id)
        if record is not None and record.terminal is not None:
            yield record.terminal
            return
        while True:
            event = await self._queue.get()
            yield event
            if event.terminal:
                return


class JobTracker:
    def __init__(self, bus: JobBus, ledger: Ledger, frontend_id: str) -> None:
        self.ledger = ledger
        self.frontend_id = frontend_id
        self._bus = bus
        self._watches: dict[str, list[JobWatch]] = {}
        self._listeners: list[Listener] = []
        self._last: dict[str, tuple[int, int]] = {}
        self._recent: dict[str, deque[Event]] = {}
        self._finished = RecentIds(REMEMBERED_FINISHED)
        self._subscription: Subscription | None = None
        # Deliveries run in tasks of their own; this lock (FIFO) keeps them in queue order.
        self._in_order = asyncio.Lock()

    async def start(self) -> None:
        self._subscription = await self._bus.consume_events(self.frontend_id, self._on_delivery)
        log.info("tracker.started", frontend=self.frontend_id)

    async def stop(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            await subscription.cancel()

    def watch(self, job_id: str) -> JobWatch:
        """Watch one job. Use as ``async with tracker.watch(id) as w: async for e in w``."""
        watch = JobWatch(self, job_id)
        for event in self._recent.get(job_id, ()):
            watch.offer(event)
        self._watches.setdefault(job_id, []).append(watch)
        return watch

    def _unwatch(self, watch: JobWatch) -> None:
        watches = self._watches.get(watch.job_id, [])
        with suppress(ValueError):
            watches.remove(watch)
        if not watches:
            self._watches.pop(watch.job_id, None)

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener`` with every fresh event (the bot edits messages from here).

        Listeners run in event order, inside the tracker's ordering: one must only note
        the event and return (hand slow work to a task of its own), or every job waits."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with suppress(ValueError):
            self._listeners.remove(listener)

    def reopen(self, job_id: str) -> None:
        """Forget that ``job_id`` ended: an admin retried it, its new events are news."""
        self._finished.discard(job_id)
        self._last.pop(job_id, None)
        self._recent.pop(job_id, None)

    async def wait(self, job_id: str, timeout: float) -> Succeeded | Failed:
        """The job's terminal event, from the ledger or as it arrives."""
        async with asyncio.timeout(timeout):
            async with self.watch(job_id) as watch:
                async for event in watch:
                    if isinstance(event, Succeeded | Failed):
                        return event
        raise AssertionError("a watch ends with a terminal event")  # pragma: no cover

    async def record(self, event: Event) -> bool:
        """Apply an event this process made itself (a cancel) as if it had arrived."""
        async with self._in_order:
            if not await self._accept(event):
                return False
            await self._dispatch(event)
            return True

    async def _on_delivery(self, delivery: Delivery) -> None:
        async with self._in_order:
            await self._process(delivery)

    async def _process(self, delivery: Delivery) -> None:
        try:
            event = parse_event(delivery.body)
        except ValidationError as exc:
            # Redelivering a message we cannot read would loop forever.
            log.error("event.malformed", error=str(exc)[:500])
            await delivery.ack()
            return
        if await self._accept(event):
            await self._dispatch(event)
        await delivery.ack()

    async def _accept(self, event: Event) -> bool:
        if event.job_id in self._finished:
            return False  # a late frame, or a second terminal event
        order = (event.attempt, event.seq)
        last = self._last.get(event.job_id)
        if not event.terminal and last is not None and order <= last:
            return False
        if event.persistent and not await self.ledger.apply(event):
            return False  # unknown here, already terminal, or an older attempt's news
        if event.terminal:
            self._last.pop(event.job_id, None)
            self._recent.pop(event.job_id, None)
            self._finished.add(event.job_id)
        else:
            self._last[event.job_id] = order
            self._recent.setdefault(event.job_id, deque(maxlen=REPLAY)).append(event)
        return True

    async def _dispatch(self, event: Event) -> None:
        for watch in list(self._watches.get(event.job_id, ())):
            watch.offer(event)
        for listener in list(self._listeners):
            try:
                await listener(event)
            except Exception:
                log.exception("tracker.listener_failed", job_id=event.job_id)
