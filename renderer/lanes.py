"""Which lane a worker serves next: smooth weighted round robin over its lanes.

A worker consumes each of its lanes with the prefetch of its slots, so a lane alone can
keep it busy; deliveries that arrive while every slot renders wait here, and a freed
slot goes to the lane whose turn it is by weight (``RENDERER_LANE_WEIGHTS``, e.g.
``fast=4,relax=1``: of five jobs when both lanes wait, four fast and one relax, spread
out as f f r f f, never r r). So ``relax`` never starves, and ``fast`` waits at most for
the renders already under way, never behind a backlog of ``relax``.

The choice is the nginx "smooth weighted round robin": every lane with work gains its
weight, the lane with the most wins and loses the total. Lanes without work take no part
and gain nothing, so a lane that was idle does not come back with a burst.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager


class LaneScheduler:
    """``slots`` renders at once, granted to waiting deliveries lane by lane by weight."""

    def __init__(self, lanes: Iterable[str], weights: Mapping[str, int], slots: int) -> None:
        self._lanes = tuple(lanes)
        self._weights = {lane: max(1, int(weights.get(lane, 1))) for lane in self._lanes}
        self._current = dict.fromkeys(self._lanes, 0)
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {
            lane: deque() for lane in self._lanes
        }
        self._free = slots

    @property
    def waiting(self) -> int:
        return sum(len(queue) for queue in self._waiting.values())

    @property
    def free(self) -> int:
        """Slots no render holds."""
        return self._free

    @asynccontextmanager
    async def turn(self, lane: str, *, first: bool = False) -> AsyncIterator[None]:
        """Wait for a slot for a delivery of ``lane``; hold it for the block. ``first``:
        ahead of the lane's other waiting deliveries (a job that waited its bound)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if first:
            self._waiting[lane].appendleft(future)
        else:
            self._waiting[lane].append(future)
        self._grant()
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._free += 1  # granted just as we were cancelled: give it back
                self._grant()
            else:
                self._waiting[lane].remove(future)
            raise
        try:
            yield
        finally:
            self._free += 1
            self._grant()

    def _grant(self) -> None:
        while self._free > 0:
            ready = [lane for lane in self._lanes if self._waiting[lane]]
            if not ready:
                return
            total = sum(self._weights[lane] for lane in ready)
            for lane in ready:
                self._current[lane] += self._weights[lane]
            chosen = max(ready, key=lambda lane: self._current[lane])
            self._current[chosen] -= total
            self._free -= 1
            self._waiting[chosen].popleft().set_result(None)
