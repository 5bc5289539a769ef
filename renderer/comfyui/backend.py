"""The ``comfyui`` backend: renders bound workflows on a ComfyUI over HTTP and WebSocket.

A job's id is its ComfyUI ``prompt_id``, so a redelivered job finds its earlier prompt
(finished in the history, or still queued or running) instead of rendering twice. One
this renderer interrupted itself (it gave that run up) is waited out, not followed.
Progress frames become ``report.progress``; preview frames are downscaled and re-encoded
in a worker thread and passed to ``report.preview`` (the worker throttles them).

Out of memory: ``POST /free`` and one more try on this worker under the same prompt id
(its failed history entry deleted first); a second OOM fails the job for good
(:class:`~renderer.exceptions.OutOfMemoryExhausted`). Every other failure is classified
by :mod:`renderer.comfyui.exceptions`.

A predecessor's prompts: a worker keeps its ``client_id`` across restarts, so at its
first start it finds, in ComfyUI's queue, what the process before it (killed, crashed)
submitted and never collected. Those jobs went back to the broker when it died, and most
go to another renderer. Its waiting prompts are deleted at once (nothing was rendered;
a job that comes back here is simply submitted again); its running prompt is left
``COMFYUI_ORPHAN_GRACE_SECONDS`` for its job to come back here, where the render
attaches to it, and is then interrupted, so the GPU does not render for nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Mapping
from typing import Any

import structlog

from renderer.backends.base import RenderResult, RenderTask, Reporter
from renderer.comfyui.client import (
    ComfyUIClient,
    PreviewCallback,
    ProgressCallback,
    RunResult,
    model_files,
)
from renderer.comfyui.exceptions import OOM_MESSAGE, ComfyUIUnavailable, ExecutionGlitch
from renderer.comfyui.frames import PreviewFrame
from renderer.comfyui.supervisor import ComfyUIDidNotStart, ComfyUISupervisor
from renderer.exceptions import (
    BackendUnavailable,
    OutOfMemory,
    OutOfMemoryExhausted,
    RenderError,
)
from renderer.previews import encode_preview
from renderer.settings import ComfyUISettings, RendererSettings

log = structlog.get_logger(__name__)

#: Model files are listed again (``/object_info`` of the loaders) at most this often.
AVAILABLE_INTERVAL_SECONDS = 60.0
#: Files listed per models folder in heartbeats, at most.
MAX_AVAILABLE_PER_FOLDER = 200
#: The loader input that lists each models folder's files.
LOADER_INPUTS = {
    "checkpoints": ("CheckpointLoaderSimple", "ckpt_name"),
    "loras": ("LoraLoader", "lora_name"),
    "controlnet": ("ControlNetLoader", "control_net_name"),
    "upscale_models": ("UpscaleModelLoader", "model_name"),
}
#: Seconds between two ``/system_stats`` reads for heartbeats (VRAM free, health).
STATS_INTERVAL_SECONDS = 15.0
#: Model files a heartbeat lists as probably loaded (a GPU holds a few at most).
REMEMBERED_MODELS = 4
#: Namespace of the client ids derived from worker ids (any fixed UUID would do).
#: Input images go to ComfyUI's ``input/brigade/``, away from files people put there.
UPLOAD_SUBFOLDER = "brigade"
CLIENT_ID_NAMESPACE = uuid.UUID("5b0f2f9e-8e0c-4c1e-9d6a-6f1c1e2b7a10")


def default_client_id(worker_id: str) -> str:
    """The fixed ``clientId`` of a worker: the same after a restart, distinct per worker."""
    return uuid.uuid5(CLIENT_ID_NAMESPACE, worker_id).hex


class ComfyUIBackend:
    """Drives one ComfyUI. :meth:`render` starts the backend first if needed."""

    name = "comfyui"

    def __init__(
        self,
        settings: RendererSettings,
        comfyui: ComfyUISettings,
        supervisor: ComfyUISupervisor | None = None,
    ) -> None:
        self._settings = settings
        self._comfyui = comfyui
        self._supervisor = supervisor
        #: Model files of the last prompts that ran here, most recent last: what is most
        #: likely loaded (ComfyUI does not list its loaded models).
        self._models: dict[str, None] = {}
        #: The last measured load time of each model file (seconds), newest last.
        self._load_seconds: dict[str, float] = {}
        #: The model files ComfyUI can load, per folder, and when to list them again.
        self._available: dict[str, list[str]] = {}
        self._available_at = 0.0
        self._client_id = comfyui.client_id or default_client_id(settings.worker_id)
        self._client: ComfyUIClient | None = None
        self._stats: dict[str, Any] = {}
        self._healthy = False
        self._monitor: asyncio.Task[None] | None = None
        #: A predecessor's running prompts, left their grace to be adopted by a render.
        self._orphans: set[str] = set()
        self._took_over = False
        self._orphan_timer: asyncio.Task[None] | None = None
        #: Redelivered jobs that reached this renderer before its takeover (:meth:`held`).
        self._held_early: set[str] = set()

    @property
    def client(self) -> ComfyUIClient:
        """The client to this ComfyUI (created on first use)."""
        if self._client is None:
            if not self._comfyui.url:
                raise ComfyUIUnavailable("COMFYUI_URL is not set")
            try:
                self._client = ComfyUIClient(
                    self._comfyui.url,
                    self._client_id,
                    connect_timeout=self._comfyui.connect_timeout_seconds,
                    request_timeout=self._comfyui.request_timeout_seconds,
                    reconnect_max_seconds=self._comfyui.reconnect_max_seconds,
                )
            except ValueError as exc:
                raise ComfyUIUnavailable(f"COMFYUI_URL is not usable: {exc}") from exc
        return self._client

    async def start(self) -> None:
        """Open the WebSocket and read ``/system_stats``; raise ``BackendUnavailable`` when
        ComfyUI does not answer (everything opened so far is closed again)."""
        if self._monitor is not None:
            return  # started: the client reconnects by itself
        try:
            if self._supervisor is not None and self._supervisor.pid is None:
                try:
                    await self._supervisor.start()
                except ComfyUIDidNotStart as exc:
                    raise ComfyUIUnavailable(str(exc)) from exc
            await self.client.connect()
            await self._refresh()
            if not self._took_over:
                await self._take_over()
        except BaseException:
            await self.close()
            raise
        if self._monitor is None:
            self._monitor = asyncio.create_task(self._watch(), name="comfyui-stats")
        device = self.describe()
        log.info(
            "comfyui.started",
            url=self.client.url,
            client_id=self._client_id,
            device=device.get("device"),
            version=_field(self._stats.get("system"), "comfyui_version"),
        )

    async def _take_over(self) -> None:
        """Clear what a predecessor with this ``client_id`` left queued (module docstring)."""
        mine = (await self.client.queue()).of(self._client_id)
        self._took_over = True
        if mine.pending:
            await self.client.delete_from_queue(mine.pending)
            log.info("comfyui.orphans_deleted", prompts=list(mine.pending))
        if mine.running:
            # A running prompt whose job is already back here is adopted at once.
            self._orphans.update(set(mine.running) - self._held_early)
            self._held_early.clear()
            log.info(
                "comfyui.orphans_found",
                prompts=list(mine.running),
                grace_seconds=self._comfyui.orphan_grace_seconds,
            )
            self._orphan_timer = asyncio.create_task(self._stop_orphans(), name="comfyui-orphans")

    def held(self, job_id: str) -> None:
        """A redelivered job arrived at this renderer (``HoldsJobs``): if its prompt is a
        predecessor's, running here, it is adopted, not interrupted after the grace; the
        render attaches to it once a slot is free, however long that takes."""
        if self._took_over:
            self._orphans.discard(job_id)
        else:
            self._held_early.add(job_id)

    async def _stop_orphans(self) -> None:
        """After the grace, interrupt the predecessor's prompts no render adopted."""
        await asyncio.sleep(self._comfyui.orphan_grace_seconds)
        for prompt_id in sorted(self._orphans):
            self._orphans.discard(prompt_id)
            try:
                place = await self.client.stop(prompt_id)
            except BackendUnavailable as exc:
                log.warning("comfyui.orphan_not_stopped", prompt_id=prompt_id, error=str(exc))
                continue
            if place is not None:
                log.info("comfyui.orphan_stopped", prompt_id=prompt_id, place=place)

    async def close(self) -> None:
        """Stop the stats task and close the client. Safe to call twice."""
        monitor, client = self._monitor, self._client
        self._monitor, self._client = None, None
        self._healthy = False
        timer, self._orphan_timer = self._orphan_timer, None
        for task in (monitor, timer):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if client is not None:
            await client.close()
        if self._supervisor is not None:
            await self._supervisor.stop()

    def describe(self) -> dict[str, Any]:
        """The device, its VRAM and whether ComfyUI answered, from the last ``/system_stats``."""
        devices = self._stats.get("devices")
        device = devices[0] if isinstance(devices, list) and devices else None
        return {
            "backend": self.name,
            "url": self._comfyui.url,
            "device": _field(device, "name"),
            "vram_total": _field(device, "vram_total"),
            "vram_free": _field(device, "vram_free"),
            "healthy": self._healthy
            and self._client is not None
            and self._client.connected
            and (self._supervisor is None or self._supervisor.healthy),
            "restarts": self._supervisor.restarts if self._supervisor is not None else 0,
            "models": list(reversed(self._models)),
            "model_load_seconds": dict(self._load_seconds),
            "available_models": {folder: list(files) for folder, files in self._available.items()},
        }

    async def upload_image(self, name: str, data: bytes) -> str:
        """Upload an input image into ComfyUI's ``input/brigade/`` and return the name
        ``LoadImage`` takes (``brigade/<name>``). Names are content addresses, so
        overwriting is harmless and a retried job uploads the same file again."""
        await self.start()
        try:
            return await self.client.upload_image(name, data, subfolder=UPLOAD_SUBFOLDER)
        except BackendUnavailable:
            await self._await_restart()
            raise

    async def render(self, task: RenderTask, report: Reporter) -> RenderResult:
        """Render ``task.graph`` as prompt ``task.job_id``: PNG images in output order.

        Raises the classified errors of :mod:`renderer.comfyui.exceptions`, and
        ``OutOfMemoryExhausted`` after a second OOM. On cancellation the prompt is
        stopped in ComfyUI before the cancellation goes on.
        """
        await self.start()
        client = self.client
        # A predecessor's prompt for this job: the run attaches to it (reuse), adopted.
        self._orphans.discard(task.job_id)

        async def attempt(reuse: bool) -> RunResult:
            return await client.run(
                task.job_id,
                task.graph,
                extra_data={"preview_method": self._comfyui.preview_method},
                on_progress=self._progress(report),
                on_preview=self._preview(report),
                stall_seconds=self._comfyui.stall_seconds,
                reuse=reuse,
            )

        try:
            try:
                # A first delivery's job id is new to ComfyUI: no need to look for it there.
                result = await attempt(reuse=task.attempt > 1)
            except OutOfMemory as first:
                self._fault()
                log.warning("comfyui.oom_retry", job_id=task.job_id, error=str(first))
                await client.free(unload_models=True, free_memory=True)
                self._models.clear()
                await client.delete_history([task.job_id])
                try:
                    result = await attempt(reuse=False)
                except OutOfMemory as second:
                    self._fault()
                    raise OutOfMemoryExhausted(OOM_MESSAGE, detail=str(second)) from second
        except ExecutionGlitch:
            self._fault()
            raise
        except BackendUnavailable:
            await self._await_restart()
            raise
        if self._supervisor is not None:
            self._supervisor.record_success()
        self._remember_models(task.graph, result.loads)
        log.info(
            "comfyui.rendered",
            job_id=task.job_id,
            attempt=task.attempt,
            images=len(result.images),
            reused=result.reused,
            **result.timings,
        )
        return RenderResult(images=result.images, timings=dict(result.timings))

    def _remember_models(self, graph: Mapping[str, Any], loads: Mapping[str, float]) -> None:
        for node in graph.values():
            for file in model_files(node):
                self._models.pop(file, None)
                self._models[file] = None
        for file, seconds in loads.items():
            self._load_seconds.pop(file, None)
            self._load_seconds[file] = seconds
        while len(self._models) > REMEMBERED_MODELS:
            del self._models[next(iter(self._models))]
        while len(self._load_seconds) > REMEMBERED_MODELS:
            del self._load_seconds[next(iter(self._load_seconds))]

    def _fault(self) -> None:
        """An OOM or a CUDA fault: enough of them in a row restart a supervised ComfyUI."""
        if self._supervisor is not None:
            self._supervisor.record_fault()

    async def _await_restart(self) -> None:
        """ComfyUI went away. If we run it, give the supervisor time to bring it back, so
        the job's next attempt (likely on this worker) finds it answering."""
        if self._supervisor is None:
            return
        back = await self._supervisor.wait_healthy(self._comfyui.start_timeout_seconds)
        log.info(
            "comfyui.back" if back else "comfyui.still_down", restarts=self._supervisor.restarts
        )

    async def cancel(self, prompt_id: str) -> bool:
        """Cancel ``prompt_id``: deleted from ComfyUI's queue when pending, interrupted (by
        its id) when running; its render then ends with ``RenderCancelled``. Returns
        whether there was anything to cancel."""
        if self._client is None:
            return False
        return await self._client.cancel(prompt_id)

    @staticmethod
    def _progress(report: Reporter) -> ProgressCallback:
        async def progress(step: int, total: int, node: str | None) -> None:
            await report.progress(step, total, node)

        return progress

    def _preview(self, report: Reporter) -> PreviewCallback:
        max_side = self._settings.preview_max_side

        async def preview(frame: PreviewFrame, step: int | None) -> None:
            if not report.wants_preview():
                return  # it would be throttled: spare the decode and the encode
            try:
                image, mime = await asyncio.to_thread(encode_preview, frame.image, max_side)
            except (OSError, ValueError) as exc:  # PIL.UnidentifiedImageError is an OSError
                log.debug("comfyui.bad_preview", error=str(exc))
                return
            await report.preview(image, mime, step)

        return preview

    async def _refresh(self) -> None:
        try:
            self._stats = await self.client.system_stats()
        except RenderError:
            self._healthy = False
            raise
        self._healthy = True
        now = time.monotonic()
        if now >= self._available_at:
            self._available_at = now + AVAILABLE_INTERVAL_SECONDS
            with contextlib.suppress(RenderError):
                self._available = await self._available_models()

    async def _available_models(self) -> dict[str, list[str]]:
        """The model files this ComfyUI can load, per models folder, from the value lists
        of its loader nodes' ``/object_info`` (what the bot suggests to users)."""
        found: dict[str, list[str]] = {}
        for folder, (node_class, name) in LOADER_INPUTS.items():
            info = await self.client.object_info(node_class)
            declared = (
                info.get(node_class, {}).get("input", {}).get("required", {}).get(name)
                if isinstance(info, dict)
                else None
            )
            files = _choices(declared)
            if files:
                found[folder] = files[:MAX_AVAILABLE_PER_FOLDER]
        return found

    async def _watch(self) -> None:
        """Keep the stats fresh for heartbeats, and the WebSocket up while idle (its reader
        gives up after a while; this starts it again). Failures only mark it unhealthy."""
        while True:
            await asyncio.sleep(STATS_INTERVAL_SECONDS)
            with contextlib.suppress(RenderError):
                await self._refresh()
                if not self.client.connected:
                    await self.client.connect()


def _choices(declared: object) -> list[str]:
    """A combo input's values: ``[[...], {...}]``, or ``["COMBO", {"options": [...]}]``."""
    if not isinstance(declared, list | tuple) or not declared:
        return []
    kind = declared[0]
    if kind == "COMBO" and len(declared) > 1 and isinstance(declared[1], dict):
        kind = declared[1].get("options", [])
    if not isinstance(kind, list | tuple):
        return []
    return [str(value) for value in kind if isinstance(value, str)]


def _field(mapping: object, key: str) -> Any:
    return mapping.get(key) if isinstance(mapping, dict) else None


def create(settings: RendererSettings) -> ComfyUIBackend:
    """The ``brigade.backends`` entry point: a ComfyUI backend at ``COMFYUI_URL``, not
    yet started; with ``COMFYUI_PATH``, one that runs and supervises its ComfyUI."""
    comfyui = ComfyUISettings()
    config = comfyui.supervisor_config()
    supervisor = ComfyUISupervisor(config) if config is not None else None
    return ComfyUIBackend(settings, comfyui, supervisor)
