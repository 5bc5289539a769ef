"""The renderer's worker loop: take a job, render it, store the images, report, ack.

Acknowledgement policy (one place, written once):

* **ack** only after every output is stored and the ``succeeded`` event is confirmed by
  the broker, or after ``failed`` is confirmed for a job that will never render;
* **dead-letter** (reject, no requeue) a job that failed permanently (invalid, cancelled)
  or transiently on its last permitted delivery, right after publishing its ``failed``;
* **requeue** after a transient failure (backend down, out of memory, store
  unreachable, a bug), after a short backoff, so another attempt (maybe on another
  worker) can succeed; the queue's delivery limit bounds the attempts;
* **ack** a cancelled job after publishing its ``failed`` (reason ``cancelled``): a cancel
  is final and there is nothing to retry;
* a **crash** settles nothing: the broker returns the job, counts the delivery, and the
  next attempt renders it again under the same job id, so its storage keys (and the
  frontend's ledger) make the repeat harmless.

On stop (SIGTERM) the worker takes no new job, lets the current one finish for up to
``RENDERER_DRAIN_SECONDS``, then cancels it, which hands it back to the queue.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import random
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from pydantic import ValidationError

from jobs.affinity import AFFINITY_FOLDERS
from jobs.broker import Delivery, Subscription
from jobs.bus import JobBus
from jobs.control import CANCELLED_MESSAGE
from jobs.exceptions import JobsError
from jobs.models import (
    Accepted,
    Control,
    ControlAction,
    Event,
    Failed,
    FailureReason,
    Heartbeat,
    Job,
    Output,
    Preview,
    Progress,
    Succeeded,
    WorkerState,
)
from jobs.recent import RecentIds
from renderer.affinity import ModelAffinity
from renderer.backends.base import Backend, RenderTask
from renderer.exceptions import InvalidWorkflow, RenderError
from renderer.lanes import LaneScheduler
from renderer.previews import PreviewThrottle
from renderer.settings import RendererSettings
from storage import (
    ImageMeta,
    InvalidKey,
    ObjectNotFound,
    ObjectStore,
    StorageError,
    StorageUnavailable,
)
from workflows import Catalog, ParameterError, Template, UnknownWorkflow, WorkflowError

log = structlog.get_logger(__name__)

#: Jitter for backoffs, apart from the global ``random`` (tests and libraries share that).
_JITTER = random.Random()

#: Upload tries per image before the job is handed back (the store may be restarting).
STORE_ATTEMPTS = 6
#: Longest pause between two upload tries, and before a requeue.
MAX_BACKOFF_SECONDS = 30.0
#: Cancelled job ids a worker remembers, to skip them if they are delivered later.
REMEMBERED_CANCELS = 10_000
#: Unknown control actions a worker remembers having logged (each is logged once).
REMEMBERED_UNKNOWN_ACTIONS = 64


def backoff(attempt: int, base: float) -> float:
    """Exponential backoff with full jitter, capped: attempt 1 waits up to ``base``."""
    return _JITTER.uniform(0, min(MAX_BACKOFF_SECONDS, base * 2 ** (attempt - 1)))


@dataclass(frozen=True, slots=True)
class Failure:
    reason: FailureReason
    transient: bool
    message: str


def classify(exc: BaseException) -> Failure:
    """The one place that decides what an exception means for a job."""
    if isinstance(exc, RenderError):
        return Failure(exc.reason, exc.transient, exc.user_message)
    if isinstance(exc, ParameterError):
        return Failure(FailureReason.INVALID, False, f"The job's parameters are invalid: {exc}")
    if isinstance(exc, UnknownWorkflow):
        # This renderer lacks the workflow; another one may have it.
        return Failure(FailureReason.INVALID, True, "No renderer here knows this workflow.")
    if isinstance(exc, WorkflowError):
        return Failure(FailureReason.INVALID, False, "The workflow is broken; tell an admin.")
    if isinstance(exc, StorageError):
        return Failure(FailureReason.INTERNAL, True, "The image store could not be reached.")
    if isinstance(exc, JobsError):
        return Failure(FailureReason.INTERNAL, True, "The job queue could not be reached.")
    return Failure(FailureReason.INTERNAL, True, "Something went wrong while rendering.")


class EventEmitter:
    """Publishes one attempt's events with a monotonic ``seq``."""

    def __init__(self, bus: JobBus, job: Job, attempt: int, worker_id: str) -> None:
        self._bus = bus
        self._job = job
        self._attempt = attempt
        self._worker_id = worker_id
        self._seq = itertools.count()

    def _fields(self) -> dict[str, Any]:
        return {
            "job_id": self._job.job_id,
            "attempt": self._attempt,
            "worker_id": self._worker_id,
            "seq": next(self._seq),
        }

    async def emit(self, event_type: Callable[..., Event], **fields: Any) -> bool:
        event = event_type(**self._fields(), **fields)
        return await self._bus.emit(event, self._job.origin.reply_to)


class JobReporter:
    """The :class:`~renderer.backends.base.Reporter` a backend gets: progress and throttled
    previews become droppable events."""

    def __init__(self, emitter: EventEmitter, throttle: PreviewThrottle) -> None:
        self._emitter = emitter
        self._throttle = throttle
        self._started = time.monotonic()
        self.previews_sent = 0
        self.previews_dropped = 0

    async def progress(self, step: int, total: int, node: str | None = None) -> None:
        await self._emitter.emit(
            Progress,
            step=step,
            total=max(total, 1),
            node=node,
            elapsed=round(time.monotonic() - self._started, 3),
        )

    def wants_preview(self) -> bool:
        return self._throttle.ready()

    async def preview(self, image: bytes, mime: str, step: int | None = None) -> None:
        if not self._throttle.should_send():
            self.previews_dropped += 1
            return
        if await self._emitter.emit(Preview, mime=mime, image=image, step=step):
            self.previews_sent += 1
        else:
            self.previews_dropped += 1


class Renderer:
    """``render(job) -> outputs``: bind, render, store. No broker: testable alone."""

    def __init__(
        self, backend: Backend, store: ObjectStore, catalog: Catalog, settings: RendererSettings
    ) -> None:
        self.backend = backend
        self.store = store
        self.catalog = catalog
        self.settings = settings

    async def render(
        self, job: Job, attempt: int, reporter: JobReporter
    ) -> tuple[list[Output], dict[str, float]]:
        if job.template is not None:  # a tenant's own workflow, carried by the job
            template = Template.from_documents(
                job.template.get("manifest"), job.template.get("graph"), Path(f"job-{job.job_id}")
            )
        else:
            template = self.catalog.get(job.workflow)
        if self.backend.name not in template.manifest.backends:
            raise InvalidWorkflow(
                f"The workflow {job.workflow!r} cannot run on the {self.backend.name} backend."
            )
        graph = template.bind(job.params)  # refuses bad parameters before any upload
        images, names = await self._inputs(template, job)
        if names:
            graph = template.bind(job.params, images=names)
        task = RenderTask(job.job_id, attempt, job.workflow, graph, job.params, images)
        started = time.perf_counter()
        result = await self.backend.render(task, reporter)
        rendered = time.perf_counter()
        if not result.images:
            raise InvalidWorkflow("The workflow produced no image.")
        outputs = [await self._store(job, index, png) for index, png in enumerate(result.images)]
        timings = {
            **result.timings,
            "render": round(rendered - started, 4),
            "upload": round(time.perf_counter() - rendered, 4),
        }
        return outputs, timings

    async def _inputs(
        self, template: Template, job: Job
    ) -> tuple[dict[str, bytes], dict[str, str]]:
        """Read each input image of ``job`` from the store and hand it to the backend.

        Returns the bytes and the backend's file name per ``image`` parameter. An input
        that is not in the store (or not an input key of this store) fails the job for
        good; a store or backend that cannot be reached is transient, as everywhere.
        """
        images: dict[str, bytes] = {}
        names: dict[str, str] = {}
        for name, param in template.manifest.params.items():
            key = job.params.get(name)
            if param.type != "image" or not isinstance(key, str):
                continue
            try:
                data = await self.store.get_input(key)
            except (InvalidKey, ObjectNotFound) as exc:
                raise InvalidWorkflow(
                    f"The input image for {name!r} is no longer available; send it again.",
                    detail=str(exc),
                ) from exc
            upload = getattr(self.backend, "upload_image", None)
            if upload is None:
                raise InvalidWorkflow(f"The {self.backend.name} backend cannot take input images.")
            names[name] = await upload(key.rsplit("/", 1)[-1], data)
            images[name] = data
        return images, names

    async def _store(self, job: Job, index: int, png: bytes) -> Output:
        meta = ImageMeta(
            job_id=job.job_id,
            index=index,
            prompt=job.prompt,
            seed=job.seed,
            workflow=job.workflow,
            negative=str(job.params.get("negative", "")),
            created_at=job.created_at,
        )
        for attempt in range(1, STORE_ATTEMPTS + 1):
            try:
                stored = await self.store.put_image(png, meta)
            except StorageUnavailable as exc:
                if attempt == STORE_ATTEMPTS:
                    raise
                delay = backoff(attempt, self.settings.retry_backoff_seconds)
                log.warning(
                    "job.retry",
                    phase="upload",
                    attempt=attempt,
                    delay=round(delay, 2),
                    error=str(exc),
                )
                await asyncio.sleep(delay)
            else:
                return Output(
                    url=stored.url,
                    key=stored.key,
                    size=stored.size,
                    width=stored.width,
                    height=stored.height,
                    content_type=stored.content_type,
                )
        raise AssertionError("unreachable")  # pragma: no cover


class Worker:
    """Consumes the configured lanes and runs each job through a :class:`Renderer`.

    It also listens on its control queue (cancel a job, here or when it arrives) and
    publishes a heartbeat every ``RENDERER_HEARTBEAT_SECONDS``.
    """

    def __init__(self, bus: JobBus, renderer: Renderer, settings: RendererSettings) -> None:
        self._bus = bus
        self._renderer = renderer
        self._settings = settings
        self._subscriptions: list[Subscription] = []
        self._running: set[asyncio.Task[Any]] = set()
        self._renders: dict[str, asyncio.Task[tuple[list[Output], dict[str, float]]]] = {}
        self._cancelled = RecentIds(REMEMBERED_CANCELS)
        #: Control actions of newer frontends that this renderer does not know (told once;
        #: a bounded memory, as the message comes from the wire).
        self._unknown_actions = RecentIds(REMEMBERED_UNKNOWN_ACTIONS)
        self._idle = asyncio.Event()
        self._idle.set()
        self._state = WorkerState.IDLE
        self._beating: asyncio.Task[None] | None = None
        self._lanes = LaneScheduler(settings.lanes, settings.lane_weights, 1)
        #: Model affinity, when the topology has it (renderer/affinity.py).
        self.affinity: ModelAffinity | None = None
        self.completed = 0
        self.failed = 0
        self.previews_sent = 0
        self.previews_dropped = 0

    @property
    def worker_id(self) -> str:
        return self._settings.worker_id

    @property
    def backend(self) -> Backend:
        return self._renderer.backend

    async def check_broker(self) -> None:
        """Raise when this worker's broker does not answer (readiness)."""
        await self._bus.broker.depth(self._bus.topology.lane_queue(self._settings.lanes[0]))

    @property
    def prefetch(self) -> int:
        """``RENDERER_PREFETCH``, or what suits the backend: a ComfyUI renders best with
        one prompt queued behind the running one (its queue stays fed), others with 1."""
        if self._settings.prefetch is not None:
            return self._settings.prefetch
        return 2 if self._renderer.backend.name == "comfyui" else 1

    async def start(self) -> None:
        self._lanes = LaneScheduler(
            self._settings.lanes, self._settings.lane_weights, self.prefetch
        )
        self._subscriptions = [await self._bus.consume_control(self.worker_id, self._on_control)]
        # Each lane may fill every slot alone, and with several lanes each holds one job
        # more, so that when a slot frees every lane with work has a job here to weigh
        # (with the slots' prefetch alone the next job of the lane that just finished
        # would still be on its way, and the other lane would always win).
        held = self.prefetch + (1 if len(self._settings.lanes) > 1 else 0)
        for lane in self._settings.lanes:
            self._subscriptions += await self._bus.consume_jobs(
                [lane], functools.partial(self._on_delivery, lane), prefetch=held
            )
        if self._bus.topology.affinity:
            self.affinity = ModelAffinity(
                self._bus,
                self._settings.lanes,
                functools.partial(self._on_delivery, first=False),
                models=self._affine_models,
                idle=lambda: self._lanes.free > 0 and self._lanes.waiting == 0,
                poll_seconds=self._settings.affinity_poll_seconds,
                idle_poll_seconds=self._settings.affinity_idle_poll_seconds,
                prefetch=self.prefetch,
                load_seconds=lambda: _load_seconds(
                    self._renderer.backend.describe().get("model_load_seconds")
                ),
            )
            await self.affinity.start()
        self._beating = asyncio.create_task(self._heartbeats(), name=f"heartbeats:{self.worker_id}")
        log.info(
            "worker.started",
            worker_id=self.worker_id,
            lanes=self._settings.lanes,
            backend=self._renderer.backend.name,
        )

    async def stop(self, drain_seconds: float | None = None) -> None:
        """Take no new job; give running ones ``drain_seconds``, then hand them back."""
        drain = self._settings.drain_seconds if drain_seconds is None else drain_seconds
        self._state = WorkerState.DRAINING
        if self.affinity is not None:
            await self.affinity.stop()
        for subscription in self._subscriptions:
            await subscription.cancel()
        self._subscriptions = []
        try:
            if self._running:  # (wait_for with a timeout of 0 times out even when idle)
                await asyncio.wait_for(self._idle.wait(), timeout=drain)
        except TimeoutError:
            log.warning("worker.drain_timeout", running=len(self._running))
            for task in list(self._running):
                task.cancel()
            await asyncio.gather(*self._running, return_exceptions=True)
        self._state = WorkerState.STOPPED
        if self._beating is not None:
            self._beating.cancel()
            await asyncio.gather(self._beating, return_exceptions=True)
            self._beating = None
            with suppress(JobsError):
                await self._bus.heartbeat(self.heartbeat())
        log.info("worker.stopped", worker_id=self.worker_id, completed=self.completed)

    def heartbeat(self) -> Heartbeat:
        """This worker as the fleet registry should see it now."""
        described = self._renderer.backend.describe()
        models = described.get("models")
        return Heartbeat(
            worker_id=self.worker_id,
            backend=self._renderer.backend.name,
            lanes=list(self._settings.lanes),
            state=self._state,
            job_id=next(iter(self._renders), None),
            device=None if described.get("device") is None else str(described["device"]),
            vram_total=_int(described.get("vram_total")),
            vram_free=_int(described.get("vram_free")),
            models=[str(m) for m in models] if isinstance(models, list) else [],
            model_load_seconds=_load_seconds(described.get("model_load_seconds")),
            available_models=_available(described.get("available_models")),
            healthy=bool(described.get("healthy", True)),
            restarts=_int(described.get("restarts")) or 0,
            completed=self.completed,
            interval=self._settings.heartbeat_seconds,
        )

    async def _heartbeats(self) -> None:
        while True:
            try:
                await self._bus.heartbeat(self.heartbeat())
            except JobsError as exc:
                log.warning("worker.heartbeat_failed", error=str(exc))
            await asyncio.sleep(self._settings.heartbeat_seconds)

    async def _on_control(self, delivery: Delivery) -> None:
        try:
            message = Control.model_validate_json(delivery.body)
        except ValidationError as exc:
            action = _unknown_action(exc)
            if action is None:
                log.warning("control.malformed", error=str(exc)[:300])
            elif action not in self._unknown_actions:
                # A newer frontend's (a rolling upgrade): not for this renderer to act on.
                self._unknown_actions.add(action)
                log.info("control.unknown_action", action=action)
        else:
            if message.action is ControlAction.CANCEL and message.job_id:
                self._cancelled.add(message.job_id)
                render = self._renders.get(message.job_id)
                if render is not None:
                    log.info("job.cancelling", job_id=message.job_id, by=message.requested_by)
                    render.cancel()
            elif (
                message.action is ControlAction.WAKE
                and self.affinity is not None
                and self._serves(message)
            ):
                self.affinity.wake()
        await delivery.ack()

    def _serves(self, message: Control) -> bool:
        """A wake for a lane this renderer serves and a model it can load."""
        return message.lane in self._settings.lanes and message.model in self._affine_models()

    def _affine_models(self) -> list[str]:
        """The model files this renderer's backend can load, for model affinity."""
        available = self._renderer.backend.describe().get("available_models")
        if not isinstance(available, dict):
            return []
        return [
            str(file)
            for folder in AFFINITY_FOLDERS
            for file in available.get(folder) or ()
            if isinstance(file, str)
        ]

    async def _on_delivery(self, lane: str, delivery: Delivery, *, first: bool = True) -> None:
        """A job from ``lane``'s queue (``first``: it comes before the lane's jobs from a
        model's queue, having waited its bound or needing no model) or from the resident
        model's queue."""
        task = asyncio.current_task()
        assert task is not None
        held = getattr(self.backend, "held", None)  # renderer.backends.base.HoldsJobs
        if held is not None and delivery.delivery_count and delivery.message_id:
            held(delivery.message_id)
        self._running.add(task)
        self._idle.clear()
        try:
            async with self._lanes.turn(lane, first=first):
                if self._state is WorkerState.IDLE:
                    self._state = WorkerState.BUSY
                await self._handle(delivery)
        finally:
            self._running.discard(task)
            if not self._running:
                self._idle.set()
                if self._state is WorkerState.BUSY:
                    self._state = WorkerState.IDLE

    async def _handle(self, delivery: Delivery) -> None:
        try:
            job = Job.from_wire(delivery.body)
        except ValidationError as exc:
            log.error("job.unreadable", message_id=delivery.message_id, error=str(exc)[:500])
            await delivery.dead_letter()
            return
        limit = self._bus.topology.delivery_limit
        attempt = job.attempt(delivery.delivery_count, limit)
        last = delivery.delivery_count >= limit
        structlog.contextvars.bind_contextvars(
            job_id=job.job_id, attempt=attempt, worker_id=self.worker_id
        )
        emitter = EventEmitter(self._bus, job, attempt, self.worker_id)
        if job.job_id in self._cancelled:
            await self._cancelled_job(delivery, emitter)
            return
        if self.affinity is not None:
            try:
                await self.affinity.follow(job.model)
            except JobsError as exc:  # it renders anyway; the next job tries again
                log.warning("affinity.follow_failed", model=job.model, error=str(exc))
        reporter = JobReporter(emitter, PreviewThrottle(self._settings.preview_interval_seconds))
        started = time.perf_counter()
        queued = max(0.0, time.time() - job.created_at.timestamp())
        await emitter.emit(Accepted, gpu=str(self._renderer.backend.describe().get("device")))
        log.info("job.accepted", workflow=job.workflow, queued_seconds=round(queued, 3))
        render = asyncio.create_task(self._renderer.render(job, attempt, reporter))
        self._renders[job.job_id] = render
        try:
            outputs, timings = await render
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if job.job_id in self._cancelled and current is not None and not current.cancelling():
                await self._cancelled_job(delivery, emitter)
                return
            log.warning("job.retry", reason="worker stopping")
            raise
        except Exception as exc:  # noqa: BLE001 - classify() decides what any failure means
            await self._fail(delivery, emitter, exc, attempt=attempt, last=last)
            return
        finally:
            self._renders.pop(job.job_id, None)
        timings["queued"] = round(queued, 4)
        if self.affinity is not None:
            self.affinity.rendered(timings["render"])
        await emitter.emit(Succeeded, outputs=outputs, seed=job.seed, timings=timings)
        await delivery.ack()
        self.completed += 1
        self.previews_sent += reporter.previews_sent
        self.previews_dropped += reporter.previews_dropped
        log.info(
            "job.succeeded",
            seconds=round(time.perf_counter() - started, 4),
            images=len(outputs),
            previews_sent=reporter.previews_sent,
            previews_dropped=reporter.previews_dropped,
            **timings,
        )

    async def _cancelled_job(self, delivery: Delivery, emitter: EventEmitter) -> None:
        """A cancelled job ends here: its ``failed`` is published and it is acked (nothing
        to keep for a retry)."""
        log.info("job.failed", reason=FailureReason.CANCELLED.value)
        await emitter.emit(Failed, reason=FailureReason.CANCELLED, message=CANCELLED_MESSAGE)
        await delivery.ack()

    async def _fail(
        self, delivery: Delivery, emitter: EventEmitter, exc: Exception, *, attempt: int, last: bool
    ) -> None:
        failure = classify(exc)
        if failure.reason is FailureReason.CANCELLED:
            await self._cancelled_job(delivery, emitter)
            return
        if failure.transient and not last:
            delay = backoff(attempt, self._settings.retry_backoff_seconds)
            log.warning(
                "job.retry",
                reason=failure.reason.value,
                delay=round(delay, 2),
                error=repr(exc),
                exc_info=not isinstance(exc, RenderError),
            )
            await asyncio.sleep(delay)
            await delivery.requeue()
            return
        log.warning(
            "job.failed",
            reason=failure.reason.value,
            error=repr(exc),
            exc_info=failure.reason is FailureReason.INTERNAL,
        )
        await emitter.emit(Failed, reason=failure.reason, message=failure.message)
        await delivery.dead_letter()
        self.failed += 1


def _int(value: object) -> int | None:
    """An integer a backend described (VRAM bytes), or None when it has none."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


def _load_seconds(value: object) -> dict[str, float]:
    """Model load times a backend described, keeping only well-formed entries."""
    if not isinstance(value, dict):
        return {}
    return {
        str(file): float(seconds)
        for file, seconds in value.items()
        if isinstance(seconds, int | float) and not isinstance(seconds, bool)
    }


def _available(value: object) -> dict[str, list[str]]:
    """Model files a backend listed per folder, keeping only well-formed entries."""
    if not isinstance(value, dict):
        return {}
    return {
        str(folder): [str(file) for file in files if isinstance(file, str)]
        for folder, files in value.items()
        if isinstance(files, list)
    }


def _unknown_action(error: ValidationError) -> str | None:
    """The action of a control message whose only fault is an action this renderer does
    not know (a newer frontend sent it), else None (the message is malformed)."""
    problems = error.errors()
    if problems and all(
        problem["loc"] == ("action",) and problem["type"] == "enum" for problem in problems
    ):
        return str(problems[0]["input"])[:100]
    return None
