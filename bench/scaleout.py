"""Scale-out: 1, 2, 4, 8 renderers, each with its own emulated GPU, on one queue.

Run from the repository root, with RabbitMQ at ``AMQP_URL`` (default: guest on loopback)
and SeaweedFS's ``weed`` in the virtualenv (the dev extra)::

    .venv/bin/python -m bench.scaleout [--counts 1 2 4 8] [--jobs-per-renderer 16]
        [--steps 4] [--step-seconds 0.125] [--rounds 2] [--prefetch 2]

One GPU is one ComfyUI emulator process (``--steps`` KSampler steps of
``--step-seconds``: a fixed render time, 0.5 s by default, previews off) and one
``brigade renderer`` process on the ComfyUI backend pointed at it, as a fleet runs
one renderer per GPU. The emulators start once and serve every run (the first N for a
fleet of N). For each N a fresh fleet (new queues, N renderers with
``RENDERER_PREFETCH=--prefetch``) starts; once every renderer has logged
``worker.started`` and 2N warm-up jobs are done, ``--jobs-per-renderer`` x N jobs
(``sd15-txt2img`` at 64x64) are admitted up front through ``Admission.submit`` in this
process, timed from the first admission to the last ``succeeded`` this frontend
receives. Rounds run every N in turn, so they share the machine's moods.

Reported per N: jobs/s (the median run), the scaling ratio throughput(N) / (N x
throughput(1)) (median of the per-round ratios), the time per job against the ideal
(the render time: what N perfect GPUs would take), and CPU ms per job of the renderer
processes, of the emulators, of this process (admission, the tracker) and of the rest
of the machine (RabbitMQ, SeaweedFS, neighbours). The renderers' CPU per job is what
our side costs: a real host needs about that much CPU per job and GPU to keep its GPUs
fed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

from bench.common import quiet_logs, require_weed
from bench.pipeline import Arrivals, ComfyUISocket, Pipeline, request
from bench.services import (
    URL,
    Service,
    comfyui_emulators,
    machine_cpu,
    own_cpu,
    process_cpu,
    stop_all,
)
from bench.services import renderer as renderer_service
from brigade.app import frontend
from jobs.bus import JobBus
from jobs.models import JobRequest, Origin
from jobs.rabbitmq import RabbitBroker
from jobs.topology import build_topology
from storage.settings import S3Settings
from tests.fixtures.rabbitmq import delete_topology
from tests.fixtures.s3server import run_seaweedfs, settings_for
from workflows import Catalog

CHECKPOINT = "tiny_sd15_random.safetensors"


@dataclass
class Run:
    """One timed run of a fleet of ``n``: jobs, seconds, CPU seconds by whom."""

    n: int
    jobs: int
    seconds: float
    renderers: float
    emulators: float
    bench: float
    machine: float
    #: Seconds the GPUs' queues stood empty during the run, summed over the GPUs.
    idle: float = 0.0

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds

    def ms_per_job(self, seconds: float) -> float:
        return seconds / self.jobs * 1000

    @property
    def other(self) -> float:
        return self.machine - self.renderers - self.emulators - self.bench


@dataclass
class Fleet:
    pipeline: Pipeline
    renderers: list[Service]


@contextlib.asynccontextmanager
async def fleet(
    urls: Sequence[str], s3: S3Settings, folder: Path, prefetch: int
) -> AsyncIterator[Fleet]:
    """A frontend here and one ``brigade renderer`` per URL, on fresh queues."""
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    topology = build_topology(["fast"], prefix=prefix)
    front_id = f"{prefix}-front"
    renderers = [
        renderer_service(
            f"{prefix}-gpu{n}",
            folder,
            prefix,
            s3,
            url,
            RENDERER_PREFETCH=str(prefetch),
            COMFYUI_PREVIEW_METHOD="none",
        )
        for n, url in enumerate(urls)
    ]
    try:
        async with AsyncExitStack() as stack:
            broker = RabbitBroker(URL, topology, name=f"{prefix}:frontend")
            await broker.connect()
            stack.push_async_callback(broker.close)
            await broker.declare()
            front = await frontend(
                stack, JobBus(broker), Catalog.load(), folder / f"{prefix}.db", front_id
            )
            arrivals = Arrivals()
            front.tracker.add_listener(arrivals)
            try:
                for service in renderers:
                    service.start()
                for service in renderers:
                    await asyncio.to_thread(service.wait_for_log, "worker.started")
                yield Fleet(
                    Pipeline(front, arrivals, Origin(frontend="api", reply_to=front_id)), renderers
                )
            finally:
                stop_all(renderers)
            if arrivals.redelivered:
                print(f"  note: {arrivals.redelivered} job(s) succeeded only on a redelivery")
    finally:
        await delete_topology(URL, topology, [topology.events_queue(front_id).name])
        for service in renderers:
            for line in service.warnings()[:3]:
                print(f"  {service.name}: {line[:300]}")


async def timed(
    rig: Fleet, jobs: Sequence[JobRequest], gpus: Sequence[tuple[str, int]], wait: float
) -> Run:
    emulator_pids = [pid for _, pid in gpus]
    observers = [ComfyUISocket(url) for url, _ in gpus]
    for observer in observers:
        await observer.open()
    pids = [service.pid for service in rig.renderers]
    before = (
        sum(process_cpu(pid) for pid in pids),
        sum(process_cpu(pid) for pid in emulator_pids),
        own_cpu(),
        machine_cpu(),
    )
    began = time.perf_counter()
    ids = [await rig.pipeline.admit(job) for job in jobs]
    ends = [rig.pipeline.arrivals.expect(job_id) for job_id in ids]
    ended = max(await asyncio.wait_for(asyncio.gather(*ends), wait))
    after = (
        sum(process_cpu(pid) for pid in pids),
        sum(process_cpu(pid) for pid in emulator_pids),
        own_cpu(),
        machine_cpu(),
    )
    spent = [b - a for a, b in zip(before, after, strict=True)]
    idle = sum(observer.idle(began, ended) for observer in observers)
    for observer in observers:
        await observer.close()
    renderers, emulators, bench, machine = spent
    return Run(len(pids), len(jobs), ended - began, renderers, emulators, bench, machine, idle)


async def bench(
    args: argparse.Namespace, s3: S3Settings, folder: Path, gpus: list[tuple[str, int]]
) -> dict[int, list[Run]]:
    runs: dict[int, list[Run]] = {n: [] for n in args.counts}
    numbers = iter(range(10**9))
    render = args.steps * args.step_seconds
    for round_ in range(args.rounds):
        for n in args.counts:
            urls = [url for url, _ in gpus[:n]]
            warmup = [request(next(numbers), args.steps, CHECKPOINT) for _ in range(2 * n)]
            jobs = [
                request(next(numbers), args.steps, CHECKPOINT)
                for _ in range(args.jobs_per_renderer * n)
            ]
            wait = 60.0 + 4 * render * args.jobs_per_renderer
            async with fleet(urls, s3, folder, args.prefetch) as rig:
                await timed(rig, warmup, gpus[:n], wait)
                run = await timed(rig, jobs, gpus[:n], wait)
            runs[n].append(run)
            one = runs[args.counts[0]][-1] if args.counts[0] == 1 else None
            ratio = f", ratio {run.rate / (n * one.rate):.3f}" if one is not None else ""
            print(
                f"  round {round_ + 1}: N={n}: {run.rate:6.2f} jobs/s ({run.jobs} in "
                f"{run.seconds:.2f} s{ratio}, GPUs idle {run.idle / n:.2f} s each); CPU ms/job: "
                f"renderers "
                f"{run.ms_per_job(run.renderers):.0f}, emulators "
                f"{run.ms_per_job(run.emulators):.0f}, bench {run.ms_per_job(run.bench):.0f}, "
                f"other {run.ms_per_job(run.other):.0f}",
                flush=True,
            )
    return runs


def print_table(args: argparse.Namespace, runs: dict[int, list[Run]]) -> None:
    render = args.steps * args.step_seconds
    print()
    print(
        f"sd15-txt2img 64x64, {args.steps} steps x {args.step_seconds:g} s = {render:g} s "
        f"render (previews off), RENDERER_PREFETCH={args.prefetch}, "
        f"{args.jobs_per_renderer} jobs per renderer, {args.rounds} round(s)"
    )
    print(
        f"  {'N':>3}{'jobs/s':>8}{'ratio':>7}  {'(rounds)':<20}{'s/job/GPU':>10}{'ideal':>7}"
        f"{'idle/GPU':>10}{'busy/job':>10}"
        f"   CPU ms/job:{'renderers':>10}{'cores/renderer':>15}{'emulators':>10}{'bench':>6}"
        f"{'other':>6}"
    )
    ones = runs.get(1)
    for n, series in runs.items():
        median = sorted(series, key=lambda run: run.rate)[(len(series) - 1) // 2]
        ratios = (
            [run.rate / (n * one.rate) for run, one in zip(series, ones, strict=True)]
            if ones is not None
            else []
        )
        ratio = f"{statistics.median(ratios):7.3f}" if ratios else f"{'-':>7}"
        spread = ", ".join(f"{r:.3f}" for r in ratios)
        per_gpu = median.seconds * n / median.jobs
        renderers = median.ms_per_job(median.renderers)
        busy = (median.seconds * n - median.idle) / median.jobs
        print(
            f"  {n:>3}{median.rate:8.2f}{ratio}  {f'({spread})':<20}{per_gpu:10.3f}"
            f"{render:7.2f}{median.idle / n:8.2f} s{busy:7.3f} s{'':<14}{renderers:8.0f}"
            f"{median.renderers / median.seconds / n:15.3f}"
            f"{median.ms_per_job(median.emulators):10.0f}{median.ms_per_job(median.bench):6.0f}"
            f"{median.ms_per_job(median.other):6.0f}"
        )
    print(
        "ratio: throughput(N) / (N x throughput(1)), per round, median; s/job/GPU: wall "
        "seconds x N / jobs (the ideal is the render time); cores/renderer: CPU seconds of "
        "one renderer process per wall second; idle/GPU: seconds a GPU's queue stood empty "
        "(ComfyUI's status frames); busy/job: the rest of the GPU time per job"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--jobs-per-renderer", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="KSampler steps per job")
    parser.add_argument(
        "--step-seconds", type=float, default=0.125, help="the emulators' time per step"
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prefetch", type=int, default=2, help="RENDERER_PREFETCH")
    args = parser.parse_args()
    quiet_logs()
    weed = require_weed()
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-scaleout-") as name:
        folder = Path(name)
        with (
            run_seaweedfs(folder / "seaweedfs", weed) as server,
            comfyui_emulators(max(args.counts), args.step_seconds, folder) as gpus,
        ):
            runs = asyncio.run(bench(args, settings_for(server, "bench"), folder, gpus))
    print_table(args, runs)
    print(f"({time.monotonic() - began:.0f} s in all)")


if __name__ == "__main__":
    main()
