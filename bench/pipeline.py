"""The whole pipeline beside the same prompts posted straight to ComfyUI, in one run.

Run from the repository root, with RabbitMQ at ``AMQP_URL`` (default: guest on loopback)
and SeaweedFS's ``weed`` in the virtualenv (the dev extra)::

    .venv/bin/python -m bench.pipeline [--jobs 100] [--steps 4] [--step-seconds 0.05]
        [--prefetch 1 2] [--sequential-jobs 50] [--rounds 1] [--emulator-process]
        [--comfyui-url URL --checkpoint NAME] [--preview-method auto] [--direct-fetch]

ComfyUI is the emulator (``tests/emulators/comfyui.py``; only KSampler steps take time,
``--step-seconds`` each), in this process by default or as a process of its own with
``--emulator-process`` (as a real ComfyUI is: prefer it for figures), or any ComfyUI at
``--comfyui-url``. Every prompt is the ``sd15-txt2img`` template at 64x64 with
``--steps`` steps, prompt and seed from its number, the same graphs both ways, and the
same ``extra_data.preview_method`` (``--preview-method``, COMFYUI_PREVIEW_METHOD's
default unless told). Each side first runs two warm-up jobs that are not timed.

Throughput (``--jobs`` N; ``--rounds`` rounds, each a direct run then a pipeline run per
prefetch; the table shows the median run and the median of the per-round ratios):

* **direct**: one WebSocket and plain ``POST /prompt`` for all N prompts up front (ComfyUI's
  queue never runs dry), timed from the first post to the last ``executing`` frame with
  ``node: null``: the best any client can do. With ``--direct-fetch`` the client also
  downloads each image as it ends, as the renderer does (a prompt then ends once fetched).
* **pipeline**, per ``--prefetch`` (RENDERER_PREFETCH): a frontend (ledger, tracker) and a
  renderer on the ComfyUI backend, over RabbitMQ, storing into SeaweedFS S3, each with
  its own broker connection as in production, on fresh queues; N jobs admitted up front
  through ``Admission.submit``, timed from the first admission to the last ``succeeded``
  the frontend receives.

A third WebSocket follows ComfyUI's ``status`` broadcasts and adds up the time its queue
was empty during each run ("ComfyUI idle": time a GPU would have waited on us);
"busy/job" is the rest of the run per job. CPU ms per job come from ``/proc``: this
process (the pipeline, or the direct client), ComfyUI's process (0 when it runs in this
process or elsewhere), and everything else on the machine (RabbitMQ, SeaweedFS, and
anything a neighbour runs meanwhile).

Added latency (``--sequential-jobs`` jobs one at a time, the system idle in between):
per pipeline job, admission call start to ``succeeded`` received by the frontend, minus
the median direct latency (post to end frame) of the same graphs; p50 and p99 in ms. The
median time per phase: ``admission`` (the submit call), ``accepted`` (submit start to
the frontend receiving ``accepted``), and from the ``succeeded`` event's timings
``queued`` (job created to taken by the renderer), ``comfyui`` (submit to end frame and
history read), ``fetch`` (``/view`` and the history delete), ``upload`` (S3); ``rest`` is
the total minus queued, render and upload: the ``accepted`` and ``succeeded`` publishes,
binding, event transit and the tracker's ledger writes.

Everything is removed afterwards: queues, exchanges, the S3 server, the emulator.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import aiohttp

from bench.common import percentile, quiet_logs, require_weed
from brigade.app import Frontend, frontend, start_worker
from jobs.bus import JobBus
from jobs.models import Accepted, Event, Failed, JobRequest, Origin, Succeeded
from jobs.rabbitmq import RabbitBroker
from jobs.topology import build_topology
from renderer.comfyui.backend import ComfyUIBackend
from renderer.settings import ComfyUISettings, RendererSettings
from storage.s3 import S3Store
from storage.settings import S3Settings
from tests.emulators.comfyui import ComfyUIEmulator
from tests.fixtures.rabbitmq import delete_topology
from tests.fixtures.s3server import run_seaweedfs, settings_for
from workflows import Catalog

URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = "sd15-txt2img"
SIZE = 64
WARMUP_JOBS = 2
PreviewMethod = Literal["auto", "latent2rgb", "taesd", "none"]
#: COMFYUI_PREVIEW_METHOD's default: the ``extra_data.preview_method`` of every prompt.
PREVIEW_METHOD = str(ComfyUISettings.model_fields["preview_method"].default)
EMULATOR_START_SECONDS = 30.0
GUI_LINE = re.compile(r"To see the GUI go to: (http://\S+)")
TROUBLE = re.compile(r"error|traceback|invalid|failed|exception", re.IGNORECASE)


# -- the requests ----------------------------------------------------------------------


def request(n: int, steps: int, checkpoint: str) -> JobRequest:
    return JobRequest(
        workflow=WORKFLOW,
        prompt=f"a lighthouse at dusk #{n}",
        seed=n,
        steps=steps,
        width=SIZE,
        height=SIZE,
        checkpoint=checkpoint,
    )


def graph(catalog: Catalog, job: JobRequest) -> dict[str, Any]:
    """The graph the renderer submits for ``job``: resolved as admission does, bound."""
    template = catalog.get(job.workflow)
    return template.bind(template.resolve(job.role_values()))


# -- ComfyUI over a plain WebSocket ----------------------------------------------------


class ComfyUISocket:
    """One WebSocket to ComfyUI under its own ``clientId``.

    It times the end frame (``executing`` with ``node: null``) of each prompt posted
    through it, as it arrives, and records every ``status`` broadcast (queue_remaining),
    so the time ComfyUI had nothing to do can be added up. With ``fetch``, a prompt ends
    once its image is downloaded as the renderer does it (``GET /history/{id}``, ``GET
    /view``, ``POST /history`` delete), started as its end frame arrives.
    """

    def __init__(
        self, url: str, preview_method: str = PREVIEW_METHOD, *, fetch: bool = False
    ) -> None:
        self.url = url.rstrip("/")
        self.extra_data = {"preview_method": preview_method}
        self.fetch = fetch
        self._fetches: set[asyncio.Task[None]] = set()
        self.client_id = uuid.uuid4().hex
        self.status: list[tuple[float, int]] = []
        self._ends: dict[str, asyncio.Future[float]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        self._ws = await self._session.ws_connect(
            f"{self.url}/ws", params={"clientId": self.client_id}, max_msg_size=64 * 2**20
        )
        await self._ws.send_json(
            {"type": "feature_flags", "data": {"supports_preview_metadata": True}}
        )
        self._reader = asyncio.create_task(self._read(self._ws), name="bench-comfyui-socket")

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        for task in [*self._fetches, *([self._reader] if self._reader else [])]:
            task.cancel()
        await asyncio.gather(*self._fetches, return_exceptions=True)
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        for future in self._ends.values():
            future.cancel()

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for message in ws:
            if message.type is not aiohttp.WSMsgType.TEXT:
                continue  # previews
            now = time.perf_counter()
            frame = json.loads(message.data)
            data = frame.get("data")
            if not isinstance(data, dict):
                continue
            if frame.get("type") == "status":
                remaining = data.get("status", {}).get("exec_info", {}).get("queue_remaining")
                if isinstance(remaining, int):
                    self.status.append((now, remaining))
            elif frame.get("type") == "executing" and data.get("node") is None:
                prompt_id = str(data.get("prompt_id"))
                future = self._ends.get(prompt_id)
                if future is None or future.done():
                    continue
                if self.fetch:
                    task = asyncio.create_task(self._download(prompt_id, future))
                    self._fetches.add(task)
                    task.add_done_callback(self._fetches.discard)
                else:
                    future.set_result(now)
            elif frame.get("type") == "execution_error":
                future = self._ends.get(str(data.get("prompt_id")))
                if future is not None and not future.done():
                    future.set_exception(RuntimeError(f"ComfyUI failed a prompt: {data}"))

    async def _download(self, prompt_id: str, future: asyncio.Future[float]) -> None:
        assert self._session is not None
        try:
            async with self._session.get(f"{self.url}/history/{prompt_id}") as response:
                entry = (await response.json())[prompt_id]
            for output in entry["outputs"].values():
                for image in output.get("images", []):
                    params = {key: image[key] for key in ("filename", "subfolder", "type")}
                    async with self._session.get(f"{self.url}/view", params=params) as response:
                        await response.read()
            body = {"delete": [prompt_id]}
            async with self._session.post(f"{self.url}/history", json=body) as response:
                response.raise_for_status()
        except Exception as exc:  # noqa: BLE001 - the waiting run reports it
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(time.perf_counter())

    async def post(self, prompt: dict[str, Any]) -> asyncio.Future[float]:
        """``POST /prompt``; returns a future of the end frame's arrival time."""
        assert self._session is not None
        prompt_id = str(uuid.uuid4())
        future = asyncio.get_running_loop().create_future()
        self._ends[prompt_id] = future
        body = {
            "prompt": prompt,
            "client_id": self.client_id,
            "prompt_id": prompt_id,
            "extra_data": self.extra_data,
        }
        async with self._session.post(f"{self.url}/prompt", json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"POST /prompt: {response.status} {await response.text()}")
        return future

    async def forget(self) -> None:
        """Delete the history of the prompts posted so far."""
        assert self._session is not None
        ids = list(self._ends)
        self._ends.clear()
        async with self._session.post(f"{self.url}/history", json={"delete": ids}) as response:
            response.raise_for_status()

    def idle(self, began: float, ended: float) -> float:
        """Seconds in ``[began, ended]`` during which ComfyUI's queue was empty."""
        remaining = 0
        for at, value in self.status:
            if at <= began:
                remaining = value
        idle, since = 0.0, began
        for at, value in self.status:
            if at <= began or at >= ended:
                continue
            if remaining == 0:
                idle += at - since
            remaining, since = value, at
        if remaining == 0:
            idle += ended - since
        return idle


# -- the pipeline ----------------------------------------------------------------------


class Arrivals:
    """A tracker listener: when each job's events reach the frontend."""

    def __init__(self) -> None:
        self.accepted: dict[str, float] = {}
        self.succeeded: dict[str, Succeeded] = {}
        #: Jobs that succeeded on a second or later delivery (none expected here).
        self.redelivered = 0
        self._ends: dict[str, asyncio.Future[float]] = {}

    def expect(self, job_id: str) -> asyncio.Future[float]:
        future = self._ends.get(job_id)
        if future is None:
            future = self._ends[job_id] = asyncio.get_running_loop().create_future()
        return future

    async def __call__(self, event: Event) -> None:
        now = time.perf_counter()
        if isinstance(event, Accepted):
            self.accepted.setdefault(event.job_id, now)
        elif isinstance(event, Succeeded | Failed):
            future = self.expect(event.job_id)
            if future.done():
                return
            if isinstance(event, Failed):
                future.set_exception(
                    RuntimeError(f"job {event.job_id} failed: {event.reason}: {event.message}")
                )
            else:
                self.succeeded[event.job_id] = event
                self.redelivered += event.attempt > 1
                future.set_result(now)


@dataclass
class Pipeline:
    front: Frontend
    arrivals: Arrivals
    origin: Origin

    async def admit(self, job: JobRequest) -> str:
        admitted = await self.front.admission.submit(
            job, idempotency_key=str(uuid.uuid4()), origin=self.origin
        )
        return admitted.job.job_id


@contextlib.asynccontextmanager
async def pipeline(
    comfyui_url: str, s3: S3Settings, prefetch: int, ledger_dir: Path, preview_method: str
) -> AsyncIterator[Pipeline]:
    """A frontend and one renderer on fresh queues; all of it removed on exit."""
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    topology = build_topology(["fast"], prefix=prefix)
    front_id = f"{prefix}-front"
    try:
        async with AsyncExitStack() as stack:
            front_broker = RabbitBroker(URL, topology, name=f"{prefix}:frontend")
            await front_broker.connect()
            stack.push_async_callback(front_broker.close)
            await front_broker.declare()
            catalog = Catalog.load()
            front = await frontend(
                stack, JobBus(front_broker), catalog, ledger_dir / f"{prefix}.db", front_id
            )
            store = S3Store(s3.model_copy(update={"prefix": prefix}))
            await store.start()
            stack.push_async_callback(store.close)
            settings = RendererSettings(
                _env_file=None,
                backend="comfyui",
                worker_id=f"{prefix}-renderer",
                lanes=["fast"],
                prefetch=prefetch,
            )
            comfyui = ComfyUISettings(
                _env_file=None, url=comfyui_url, preview_method=cast(PreviewMethod, preview_method)
            )
            backend = ComfyUIBackend(settings, comfyui)
            await backend.start()
            stack.push_async_callback(backend.close)
            render_broker = RabbitBroker(URL, topology, name=f"{prefix}:renderer")
            await render_broker.connect()
            stack.push_async_callback(render_broker.close)
            await start_worker(stack, JobBus(render_broker), backend, store, catalog, settings)
            arrivals = Arrivals()
            front.tracker.add_listener(arrivals)
            yield Pipeline(front, arrivals, Origin(frontend="api", reply_to=front_id))
            if arrivals.redelivered:
                print(f"  note: {arrivals.redelivered} job(s) succeeded only on a redelivery")
    finally:
        await delete_topology(URL, topology, [topology.events_queue(front_id).name])


# -- measurements ----------------------------------------------------------------------


class CpuMeter:
    """CPU seconds used so far by this process, by ComfyUI's process (when it is a local
    process of its own) and by the whole machine (Linux ``/proc``; zeros elsewhere)."""

    def __init__(self, comfyui_pid: int | None) -> None:
        self.comfyui_pid = comfyui_pid
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def read(self) -> tuple[float, float, float]:
        times = os.times()
        own = times.user + times.system
        comfyui = 0.0
        if self.comfyui_pid is not None:
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{self.comfyui_pid}/stat").read_text().rsplit(")", 1)[1]
                utime, stime = fields.split()[11:13]
                comfyui = (int(utime) + int(stime)) / self._tick
        machine = 0.0
        with contextlib.suppress(OSError):
            # user nice system idle iowait irq softirq steal: busy is all but idle, iowait
            # and steal (another guest's time).
            values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:8]]
            machine = (sum(values) - values[3] - values[4]) / self._tick
        return own, comfyui, machine


@dataclass
class Run:
    """One throughput run: jobs, wall seconds, seconds ComfyUI's queue was empty, and CPU
    seconds used meanwhile by this process, ComfyUI's process and everything else."""

    jobs: int
    seconds: float
    idle: float
    cpu: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds

    def cpu_ms_per_job(self) -> tuple[float, float, float]:
        own, comfyui, machine = self.cpu
        other = machine - own - comfyui
        return own / self.jobs * 1000, comfyui / self.jobs * 1000, other / self.jobs * 1000


@contextlib.contextmanager
def metered(meter: CpuMeter, run: list[Run]) -> Iterator[None]:
    """Set the CPU use of the run appended to ``run`` inside the block."""
    before = meter.read()
    yield
    after = meter.read()
    run[-1].cpu = (after[0] - before[0], after[1] - before[1], after[2] - before[2])


@dataclass
class Latency:
    seconds: list[float]
    phases: dict[str, list[float]] = field(default_factory=dict)


async def direct_run(
    socket: ComfyUISocket, observer: ComfyUISocket, prompts: Sequence[dict[str, Any]], wait: float
) -> Run:
    began = time.perf_counter()
    ends = [await socket.post(prompt) for prompt in prompts]
    ended = max(await asyncio.wait_for(asyncio.gather(*ends), wait))
    await socket.forget()
    return Run(len(prompts), ended - began, observer.idle(began, ended))


async def direct_latency(
    socket: ComfyUISocket, prompts: Sequence[dict[str, Any]], wait: float
) -> Latency:
    seconds = []
    for prompt in prompts:
        began = time.perf_counter()
        end = await asyncio.wait_for(await socket.post(prompt), wait)
        seconds.append(end - began)
    await socket.forget()
    return Latency(seconds)


async def pipeline_run(
    rig: Pipeline, observer: ComfyUISocket, jobs: Sequence[JobRequest], wait: float
) -> Run:
    began = time.perf_counter()
    ids = [await rig.admit(job) for job in jobs]
    ends = [rig.arrivals.expect(job_id) for job_id in ids]
    ended = max(await asyncio.wait_for(asyncio.gather(*ends), wait))
    return Run(len(jobs), ended - began, observer.idle(began, ended))


async def pipeline_latency(rig: Pipeline, jobs: Sequence[JobRequest], wait: float) -> Latency:
    latency = Latency([])
    phases = ("queued", "comfyui", "fetch", "upload")
    for job in jobs:
        began = time.perf_counter()
        job_id = await rig.admit(job)
        admitted = time.perf_counter()
        end = await asyncio.wait_for(rig.arrivals.expect(job_id), wait)
        latency.seconds.append(end - began)
        timings = rig.arrivals.succeeded[job_id].timings
        got = {name: timings.get(name, 0.0) for name in phases}
        got["admission"] = admitted - began
        got["accepted"] = rig.arrivals.accepted.get(job_id, end) - began
        # What is left once the job was taken: accepted/succeeded publishes, binding,
        # the tracker's ledger write, event transit.
        got["rest"] = (
            (end - began)
            - timings.get("queued", 0.0)
            - timings.get("render", 0.0)
            - timings.get("upload", 0.0)
        )
        for name, value in got.items():
            latency.phases.setdefault(name, []).append(value)
    return latency


# -- ComfyUI: the emulator, in this process or not, or a real one -----------------------


@contextlib.asynccontextmanager
async def comfyui(
    args: argparse.Namespace, logs: Path
) -> AsyncIterator[tuple[str, str, int | None]]:
    """ComfyUI's URL, what it is in words, and its process id when it has its own here."""
    if args.comfyui_url:
        yield args.comfyui_url, f"ComfyUI at {args.comfyui_url}", None
        return
    if args.emulator_process:
        with emulator_process(args.step_seconds, logs / "emulator.log") as (url, pid):
            yield url, "emulator (its own process)", pid
        return
    emulator = ComfyUIEmulator(step_seconds=args.step_seconds)
    await emulator.start()
    try:
        yield emulator.url, "emulator (in this process)", None
    finally:
        await emulator.stop()


@contextlib.contextmanager
def emulator_process(step_seconds: float, log_path: Path) -> Iterator[tuple[str, int]]:
    command = [
        sys.executable,
        "-m",
        "tests.emulators.comfyui",
        "--listen",
        "127.0.0.1",
        "--port",
        "0",
        "--step-seconds",
        str(step_seconds),
    ]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file
        )
        try:
            deadline = time.monotonic() + EMULATOR_START_SECONDS
            while (found := GUI_LINE.search(log_path.read_text(errors="replace"))) is None:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the emulator did not start:\n{log_path.read_text(errors='replace')}"
                    )
                time.sleep(0.05)
            yield found.group(1), process.pid
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log_text = log_path.read_text(errors="replace")
            troubles = [line for line in log_text.splitlines() if TROUBLE.search(line)]
            if troubles:
                print(f"  note: the emulator logged {len(troubles)} problem line(s):")
                print("\n".join(f"    {line}" for line in troubles[:10]))


# -- the run ---------------------------------------------------------------------------


async def bench(args: argparse.Namespace, s3: S3Settings, workdir: Path) -> None:
    catalog = Catalog.load()
    jobs = [request(n, args.steps, args.checkpoint) for n in range(args.jobs)]
    sequential = jobs[: args.sequential_jobs]
    if len(sequential) < args.sequential_jobs:
        sequential = [request(n, args.steps, args.checkpoint) for n in range(args.sequential_jobs)]
    warmup = [request(10**9 + n, args.steps, args.checkpoint) for n in range(WARMUP_JOBS)]
    prompts = [graph(catalog, job) for job in jobs]
    per_job: float = args.job_timeout or 5.0 + 4 * args.steps * args.step_seconds
    wait = 30.0 + per_job * args.jobs
    direct: list[Run] = []
    piped: dict[int, list[Run]] = {p: [] for p in args.prefetch}
    latencies: dict[int, Latency] = {}
    async with comfyui(args, workdir) as (url, what, pid):
        meter = CpuMeter(pid)
        observer = ComfyUISocket(url)
        socket = ComfyUISocket(url, args.preview_method, fetch=args.direct_fetch)
        await observer.open()
        await socket.open()
        try:
            await direct_latency(socket, [graph(catalog, job) for job in warmup], per_job)
            for round_ in range(args.rounds):
                with metered(meter, direct):
                    direct.append(await direct_run(socket, observer, prompts, wait))
                report("direct", round_, direct[-1], direct[-1])
                for prefetch in args.prefetch:
                    async with pipeline(url, s3, prefetch, workdir, args.preview_method) as rig:
                        await pipeline_latency(rig, warmup, per_job)
                        with metered(meter, piped[prefetch]):
                            run = await pipeline_run(rig, observer, jobs, wait)
                            piped[prefetch].append(run)
                    name = f"pipeline prefetch={prefetch}"
                    report(name, round_, piped[prefetch][-1], direct[-1])
            baseline = await direct_latency(
                socket, [graph(catalog, job) for job in sequential], per_job
            )
            for prefetch in args.prefetch:
                async with pipeline(url, s3, prefetch, workdir, args.preview_method) as rig:
                    await pipeline_latency(rig, warmup, per_job)
                    latencies[prefetch] = await pipeline_latency(rig, sequential, per_job)
        finally:
            await socket.close()
            await observer.close()
    print_table(args, what, direct, piped, baseline, latencies)


def report(name: str, round_: int, run: Run, reference: Run) -> None:
    own, comfyui, other = run.cpu_ms_per_job()
    print(
        f"  round {round_ + 1}: {name:<20} {run.rate:6.2f} jobs/s, ratio "
        f"{run.rate / reference.rate:.3f} ({run.jobs} in {run.seconds:.2f} s, ComfyUI idle "
        f"{run.idle:.2f} s; CPU ms/job: bench {own:.0f}, ComfyUI {comfyui:.0f}, other {other:.0f})",
        flush=True,
    )


def print_table(
    args: argparse.Namespace,
    what: str,
    direct: list[Run],
    piped: dict[int, list[Run]],
    baseline: Latency,
    latencies: dict[int, Latency],
) -> None:
    def median_run(runs: list[Run]) -> Run:
        return sorted(runs, key=lambda run: run.rate)[(len(runs) - 1) // 2]

    steps = f"{args.steps} steps" + ("" if args.comfyui_url else f" x {args.step_seconds:g} s")
    print()
    print(f"ComfyUI: {what}; {WORKFLOW} {SIZE}x{SIZE}, {steps}, {args.checkpoint}")
    direct_does = "posts, downloads each image" if args.direct_fetch else "posts, waits for ends"
    print(f"previews: {args.preview_method}; the direct client {direct_does}")
    print(
        f"throughput: {args.jobs} jobs up front, {args.rounds} round(s): the median run; "
        "ratio: the median of the per-round ratios"
    )
    print(
        f"  {'':<22}{'jobs/s':>7}{'ratio':>7}{'ComfyUI idle':>14}{'busy/job':>10}"
        f"   CPU ms/job:{'bench':>6}{'ComfyUI':>8}{'other':>6}"
    )
    rows = [("direct", direct, [1.0] * len(direct))]
    for prefetch, runs in piped.items():
        ratios = [run.rate / ref.rate for run, ref in zip(runs, direct, strict=True)]
        rows.append((f"pipeline prefetch={prefetch}", runs, ratios))
    for name, runs, ratios in rows:
        run = median_run(runs)
        busy = (run.seconds - run.idle) / run.jobs * 1000
        own, comfyui, other = run.cpu_ms_per_job()
        print(
            f"  {name:<22}{run.rate:7.2f}{statistics.median(ratios):7.3f}"
            f"{run.idle:12.2f} s{busy:7.0f} ms{'':<14}{own:5.0f}{comfyui:8.0f}{other:6.0f}"
        )
    floor = statistics.median(baseline.seconds)
    print(
        f"added latency: {len(baseline.seconds)} jobs one at a time, minus the direct median "
        f"(post -> end frame: median {floor * 1000:.0f} ms, "
        f"p99 {percentile(baseline.seconds, 99) * 1000:.0f} ms)"
    )
    names = ("admission", "accepted", "queued", "comfyui", "fetch", "upload", "rest")
    print(f"  {'':<22}{'p50 ms':>7}{'p99 ms':>7}  | median ms: " + " ".join(names))
    for prefetch, latency in latencies.items():
        added = [(s - floor) * 1000 for s in latency.seconds]
        phases = " ".join(
            f"{statistics.median(latency.phases[name]) * 1000:{len(name)}.1f}" for name in names
        )
        print(
            f"  {f'pipeline prefetch={prefetch}':<22}{percentile(added, 50):7.1f}"
            f"{percentile(added, 99):7.1f}  |{'':<12}{phases}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100, help="jobs per throughput run")
    parser.add_argument("--steps", type=int, default=4, help="KSampler steps per job")
    parser.add_argument(
        "--step-seconds", type=float, default=0.05, help="the emulator's time per step"
    )
    parser.add_argument(
        "--prefetch", type=int, nargs="+", default=[1, 2], help="RENDERER_PREFETCH values"
    )
    parser.add_argument(
        "--sequential-jobs", type=int, default=50, help="jobs one at a time, for latency"
    )
    parser.add_argument("--rounds", type=int, default=1, help="throughput rounds (median)")
    parser.add_argument(
        "--emulator-process",
        action="store_true",
        help="run the emulator as a process of its own (as a real ComfyUI is)",
    )
    parser.add_argument("--comfyui-url", help="an existing ComfyUI instead of the emulator")
    parser.add_argument(
        "--checkpoint",
        default="tiny_sd15_random.safetensors",
        help="checkpoint name (one the ComfyUI at --comfyui-url has)",
    )
    parser.add_argument(
        "--preview-method",
        choices=["auto", "latent2rgb", "taesd", "none"],
        default=PREVIEW_METHOD,
        help="COMFYUI_PREVIEW_METHOD, sent with every prompt both ways ('none': no previews)",
    )
    parser.add_argument(
        "--direct-fetch",
        action="store_true",
        help="the direct client also downloads each image, as the renderer does",
    )
    parser.add_argument(
        "--job-timeout",
        type=float,
        help="seconds one job may take (default: 5 + 4 x steps x step-seconds)",
    )
    args = parser.parse_args()
    quiet_logs()
    weed = require_weed()
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as folder:
        workdir = Path(folder)
        with run_seaweedfs(workdir / "seaweedfs", weed) as server:
            asyncio.run(bench(args, settings_for(server, "bench"), workdir))


if __name__ == "__main__":
    main()
