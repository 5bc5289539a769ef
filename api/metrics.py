"""Prometheus metrics of one API process (``GET /metrics``).

Counters are updated as things happen: requests, admissions, rejections by reason, job
phase durations from each ``succeeded`` event's ``timings`` (``queued``, ``render``,
``upload``), preview frames this frontend received and wrote to event streams, and the
droppable events (progress and previews) the tracker dropped because a stream's reader
was slow. Gauges of the outside world (queue depth per lane from the broker, jobs
queued and running from the ledger, renderers and their GPU memory from the heartbeat
registry) are read when Prometheus scrapes, so they are never stale.

Each app has its own registry: nothing global, so tests may build many apps.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from jobs.models import Event, Failed, Heartbeat, Preview, Succeeded

#: Phases of a job measured by the renderer, as named in ``Succeeded.timings``.
PHASES = ("queued", "render", "upload")
#: Seconds: a job waits from instants to many minutes; renders take one to a few hundred.
PHASE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


@dataclass
class FleetSnapshot:
    """What the broker, the ledger and the registry said at the last scrape."""

    broker_up: bool = True
    depth: dict[str, int] = field(default_factory=dict)
    jobs: dict[tuple[str, str], int] = field(default_factory=dict)
    workers: list[Heartbeat] = field(default_factory=list)


class _FleetCollector:
    def __init__(self, snapshot: FleetSnapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        snap = self.snapshot
        up = GaugeMetricFamily("brigade_broker_up", "1 when the broker answered the last scrape")
        up.add_metric([], 1.0 if snap.broker_up else 0.0)
        yield up
        depth = GaugeMetricFamily(
            "brigade_queue_depth", "Jobs ready in each lane's queue (the broker)", labels=["lane"]
        )
        for lane, count in sorted(snap.depth.items()):
            depth.add_metric([lane], float(count))
        yield depth
        jobs = GaugeMetricFamily(
            "brigade_jobs",
            "Jobs of this frontend queued or running, per lane (the ledger)",
            labels=["lane", "status"],
        )
        for (lane, status), count in sorted(snap.jobs.items()):
            jobs.add_metric([lane, status], float(count))
        yield jobs
        labels = ["worker", "device"]
        total = GaugeMetricFamily(
            "brigade_worker_vram_total_bytes", "GPU memory of each renderer", labels=labels
        )
        free = GaugeMetricFamily(
            "brigade_worker_vram_free_bytes", "Free GPU memory of each renderer", labels=labels
        )
        busy = GaugeMetricFamily(
            "brigade_worker_info",
            "1 per live renderer, with its state and backend",
            labels=["worker", "backend", "state", "healthy"],
        )
        restarts = CounterMetricFamily(
            "brigade_comfyui_restarts",
            "Times each renderer's supervisor restarted its ComfyUI",
            labels=["worker"],
        )
        for beat in snap.workers:
            restarts.add_metric([beat.worker_id], float(beat.restarts))
            names = [beat.worker_id, beat.device or ""]
            if beat.vram_total is not None:
                total.add_metric(names, float(beat.vram_total))
            if beat.vram_free is not None:
                free.add_metric(names, float(beat.vram_free))
            busy.add_metric(
                [beat.worker_id, beat.backend, beat.state.value, str(beat.healthy).lower()], 1.0
            )
        yield total
        yield free
        yield busy
        yield restarts


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "brigade_api_requests",
            "HTTP requests answered, by route and status",
            ["method", "route", "status"],
            registry=registry,
        )
        self.admissions = Counter(
            "brigade_api_admissions",
            "Jobs admitted through the API (replays of an Idempotency-Key not counted)",
            ["lane", "workflow"],
            registry=registry,
        )
        self.replays = Counter(
            "brigade_api_admission_replays",
            "Submits answered with the job already admitted under their Idempotency-Key",
            registry=registry,
        )
        self.rejections = Counter(
            "brigade_api_rejections",
            "Submits refused, by reason (invalid, quota.<limit>, unavailable, ...)",
            ["reason"],
            registry=registry,
        )
        self.phase_seconds = Histogram(
            "brigade_job_phase_seconds",
            "Seconds per phase of jobs that succeeded (the renderer's timings)",
            ["phase"],
            buckets=PHASE_BUCKETS,
            registry=registry,
        )
        self.finished = Counter(
            "brigade_jobs_finished",
            "Jobs of this frontend that ended, by status and failure reason",
            ["status", "reason"],
            registry=registry,
        )
        self.previews_received = Counter(
            "brigade_previews_received",
            "Preview frames this frontend received from renderers",
            registry=registry,
        )
        self.previews_sent = Counter(
            "brigade_previews_sent",
            "Preview frames written to event streams",
            registry=registry,
        )
        self.stream_events_dropped = Counter(
            "brigade_stream_events_dropped",
            "Progress and preview events the tracker dropped for a slow event stream",
            registry=registry,
        )
        self.streams = Gauge("brigade_event_streams", "Event streams open now", registry=registry)
        self.snapshot = FleetSnapshot()
        registry.register(_FleetCollector(self.snapshot))

    async def on_event(self, event: Event) -> None:
        """A tracker listener: every fresh event of this frontend's jobs."""
        if isinstance(event, Preview):
            self.previews_received.inc()
        elif isinstance(event, Succeeded):
            self.finished.labels("succeeded", "").inc()
            for phase in PHASES:
                seconds = event.timings.get(phase)
                if seconds is not None:
                    self.phase_seconds.labels(phase).observe(seconds)
        elif isinstance(event, Failed):
            self.finished.labels("failed", event.reason.value).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
