"""What a renderer's ``/metrics`` says (served by :class:`jobs.health.HealthServer` when
``RENDERER_HEALTH_PORT`` is set): each worker's jobs, previews, state, GPU memory and
ComfyUI restarts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from renderer.worker import Worker


class WorkersCollector(Collector):
    def __init__(self, workers: Sequence[Worker]) -> None:
        self._workers = workers

    def collect(self) -> Iterator[Metric]:
        labels = ["worker"]
        jobs = CounterMetricFamily(
            "brigade_renderer_jobs", "Jobs this worker finished", labels=[*labels, "outcome"]
        )
        previews = CounterMetricFamily(
            "brigade_renderer_previews", "Previews, sent or dropped", labels=[*labels, "fate"]
        )
        state = GaugeMetricFamily(
            "brigade_renderer_state", "1 for the worker's current state", labels=[*labels, "state"]
        )
        vram = GaugeMetricFamily(
            "brigade_renderer_vram_free_bytes", "Free GPU memory", labels=labels
        )
        restarts = CounterMetricFamily(
            "brigade_renderer_comfyui_restarts", "ComfyUI restarts by the supervisor", labels=labels
        )
        for worker in self._workers:
            beat = worker.heartbeat()
            name = [worker.worker_id]
            jobs.add_metric([*name, "succeeded"], worker.completed)
            jobs.add_metric([*name, "failed"], worker.failed)
            previews.add_metric([*name, "sent"], worker.previews_sent)
            previews.add_metric([*name, "dropped"], worker.previews_dropped)
            state.add_metric([*name, beat.state.value], 1.0)
            if beat.vram_free is not None:
                vram.add_metric(name, float(beat.vram_free))
            restarts.add_metric(name, float(beat.restarts))
        yield from (jobs, previews, state, vram, restarts)
