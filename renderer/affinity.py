"""Model affinity at the broker: a renderer takes the jobs of the model it has loaded,
switches models only when that is worth a load, and leaves late jobs to whoever is free.

How it runs (the decision itself is ``jobs/affinity.py``):

* a frontend publishes a job that needs a model file to that model's queue in its lane
  (``Topology.model_queue``) when some renderer of the lane can load the model; there it
  waits at most ``AMQP_AFFINITY_WAIT_SECONDS``, then the broker dead-letters it to the
  lane's queue, which every renderer of the lane consumes and serves first (rule 1: no
  job waits past the bound for a renderer that has its model);
* a renderer consumes the queue of its **resident** model, the model of the last job it
  started, with the prefetch of its slots: its next job of that model is at hand as soon
  as a slot frees, and a job it holds waits at most for the renders in front of it
  (rule 2);
* when the renderer has a free slot and nothing at hand, it looks at the other models'
  queues every ``RENDERER_AFFINITY_POLL_SECONDS`` (with jitter, so idle renderers do not
  all decide at once), and less often while nothing waits in any of them: the pause
  doubles after each look that found every queue empty, up to
  ``RENDERER_AFFINITY_IDLE_POLL_SECONDS``. A frontend that publishes to a model's queue
  sends a ``wake`` on the control fanout (``JobBus.submit``), and a renderer that can
  load that model looks at once (at most once per poll interval, however many wakes
  come), so an idle fleet neither keeps the broker busy with its looks (a passive
  declare per model and lane each) nor leaves a new job waiting for the next one. Each
  look counts how many jobs wait for each model and how many renderers consume
  each (the broker's consumer count: exactly the renderers that have it resident, with
  no heartbeat lag). It switches to the model :func:`jobs.affinity.choose_model` names
  (rules 3 and 4), or stays idle (rule 5). Switching moves its consumer; the load itself
  happens when the job renders. A switch to a model nobody has loaded first takes that
  model's claim at the broker (an exclusive queue, ``Topology.model_claim``), so two
  renderers that look at the same moment do not both load it. A renderer that has a
  model resident first waits, idle, as long as a load takes (its measured
  ``model_load_seconds``) for that model's next job before it pays for a load: when jobs
  trickle in, the next job of its model often comes within that, and waiting at most
  doubles what the load would have cost (the ski-rental argument).

Nothing here is a single point of failure: a renderer that dies takes its consumer
with it, its unacked job returns to the model's queue, and the bound moves anything
left waiting to the lane's queue.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import suppress

import structlog

from jobs.affinity import choose_model
from jobs.broker import Delivery, Subscription
from jobs.bus import JobBus
from jobs.exceptions import JobsError

log = structlog.get_logger(__name__)

_JITTER = random.Random()

#: Render time assumed before this renderer has measured one (seconds).
DEFAULT_RENDER_SECONDS = 5.0
#: Weight of the newest render in the running average of render times.
RENDER_AVERAGE_WEIGHT = 0.2
#: Models one decision tries before it gives up until the next look.
MAX_CHOICES = 3


class ModelAffinity:
    """One renderer's side of model affinity; see the module docstring."""

    def __init__(
        self,
        bus: JobBus,
        lanes: Iterable[str],
        handler: Callable[[str, Delivery], Awaitable[None]],
        *,
        models: Callable[[], Iterable[str]],
        idle: Callable[[], bool],
        poll_seconds: float,
        prefetch: int,
        load_seconds: Callable[[], Mapping[str, float]] = dict,
        idle_poll_seconds: float | None = None,
    ) -> None:
        self._bus = bus
        self._lanes = tuple(lanes)
        self._handler = handler
        self._models = models
        self._idle = idle
        self._poll = poll_seconds
        #: The longest pause between two looks while nothing waits (no backoff: None).
        self._idle_poll = max(poll_seconds, idle_poll_seconds or poll_seconds)
        #: The pause before the next look, and what cuts it short (:meth:`wake`).
        self._interval = poll_seconds
        self._wakeup = asyncio.Event()
        self._looked_at: float | None = None
        #: Jobs the last look found waiting in the model queues, in all.
        self.waiting = 0
        #: Looks at the model queues so far.
        self.looks = 0
        self._prefetch = prefetch
        self._load_seconds = load_seconds
        self._idle_since: float | None = None
        self._bound = bus.topology.affinity_wait_ms / 1000
        self._subscriptions: dict[str, Subscription] = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        #: The model whose claim this renderer holds (it switched to it first).
        self._claimed: str | None = None
        #: The model of the last job this renderer started (what its GPU holds).
        self.resident: str | None = None
        #: Running average of this renderer's render times, for rule 4.
        self.render_seconds = DEFAULT_RENDER_SECONDS

    async def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="model-affinity")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        async with self._lock:
            subscriptions, self._subscriptions = self._subscriptions, {}
            for subscription in subscriptions.values():
                await subscription.cancel()
            claimed, self._claimed = self._claimed, None
            if claimed is not None:
                with suppress(JobsError):
                    await self._bus.release_model(claimed)

    def rendered(self, seconds: float) -> None:
        """A render took ``seconds``: update the average rule 4 uses."""
        self.render_seconds += RENDER_AVERAGE_WEIGHT * (seconds - self.render_seconds)

    async def follow(self, model: str | None) -> None:
        """A job for ``model`` starts here: its model is now resident."""
        if model is not None and model != self.resident:
            await self._switch(model)

    async def _switch(self, model: str, *, claimed: bool = False) -> None:
        async with self._lock:
            if model == self.resident and self._subscriptions:
                return
            previous, self._subscriptions = self._subscriptions, {}
            for subscription in previous.values():
                await subscription.cancel()
            if self._claimed is not None and self._claimed != model:
                await self._bus.release_model(self._claimed)
            self._claimed = model if claimed else None
            log.info("affinity.switch", model=model, previous=self.resident)
            self.resident = model
            for lane in self._lanes:
                self._subscriptions[lane] = await self._bus.consume_model(
                    lane, model, functools.partial(self._handler, lane), prefetch=self._prefetch
                )

    def wake(self) -> None:
        """Jobs were published for a model this renderer can load: look now (or, when it
        looked less than a poll interval ago, once that interval is over)."""
        self._interval = self._poll
        self._wakeup.set()

    async def _watch(self) -> None:
        while True:
            with suppress(TimeoutError):
                async with asyncio.timeout(self._interval * _JITTER.uniform(0.5, 1.5)):
                    await self._wakeup.wait()
            if self._wakeup.is_set() and self._looked_at is not None:
                # Woken: at most one look per poll interval, however many wakes come.
                await asyncio.sleep(self._poll - (time.monotonic() - self._looked_at))
            self._wakeup.clear()
            if not self._idle():
                self._idle_since = None
                self._interval = self._poll
                continue
            now = time.monotonic()
            if self._idle_since is None:
                self._idle_since = now
            try:
                await self.decide(idle_for=now - self._idle_since)
            except JobsError as exc:
                log.warning("affinity.poll_failed", error=str(exc))
                continue
            # Every queue it can take from was empty: look less often until a job comes.
            self._interval = (
                self._poll if self.waiting else min(self._interval * 2, self._idle_poll)
            )

    async def decide(self, idle_for: float = float("inf")) -> str | None:
        """Look at the model queues and switch if :func:`jobs.affinity.choose_model` says
        so; the model switched to, or None. A switch to a model no renderer has loaded
        takes the model's claim first: of two idle renderers that chose it at once, one
        gets it and the other chooses again, as if the model were loaded elsewhere."""
        counts, elsewhere = await self._survey()
        for _ in range(MAX_CHOICES):
            model = choose_model(
                counts,
                self.resident,
                elsewhere,
                bound=self._bound,
                render_seconds=self.render_seconds,
            )
            if model is None or model == self.resident:
                return None
            cold = not elsewhere.get(model)
            if cold and self.resident is not None and idle_for < self._linger(model):
                return None  # the resident model's next job may still come
            if cold and not await self._bus.claim_model(model):
                elsewhere[model] = 1
                continue
            await self._switch(model, claimed=cold)
            return model
        return None

    def _linger(self, model: str) -> float:
        """How long to wait, idle, for the resident model's next job before loading
        ``model``: its measured load time (or the mean of those measured)."""
        measured = self._load_seconds()
        if model in measured:
            return measured[model]
        return sum(measured.values()) / len(measured) if measured else 0.0

    async def _survey(self) -> tuple[dict[str, int], dict[str, int]]:
        """Jobs waiting per model, and how many other renderers have each resident (the
        consumers of its queues; ours is on the resident model's only)."""
        counts: dict[str, int] = {}
        elsewhere: dict[str, int] = {}
        for model in dict.fromkeys(self._models()):
            for lane in self._lanes:
                info = await self._bus.inspect_model(lane, model)
                counts[model] = counts.get(model, 0) + info.messages
                others = info.consumers - (1 if model == self.resident else 0)
                elsewhere[model] = max(elsewhere.get(model, 0), others)
        self._looked_at = time.monotonic()
        self.looks += 1
        self.waiting = sum(counts.values())
        return counts, elsewhere
