"""The renderer's settings: every ``RENDERER_*`` variable (documented in ``.env.example``)."""

from __future__ import annotations

import shlex
import socket
import sys
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from jobs.settings import split_csv
from renderer.comfyui.supervisor import SupervisorConfig


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-0"


class RendererSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RENDERER_", env_file=".env", extra="ignore", env_ignore_empty=True
    )

    #: Which backend renders: ``auto`` takes ``comfyui`` when COMFYUI_URL is set, else ``demo``.
    backend: str = "auto"
    #: Stable name of this worker in events and heartbeats (one worker per GPU).
    worker_id: str = Field(default_factory=_default_worker_id)
    #: Lanes this worker consumes, comma-separated in the environment.
    lanes: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["fast"])
    #: How a freed slot is shared when several lanes wait: ``lane=weight`` pairs, comma
    #: separated (unlisted lanes weigh 1); see renderer/lanes.py.
    lane_weights: Annotated[dict[str, int], NoDecode] = Field(
        default_factory=lambda: {"fast": 4, "relax": 1}
    )
    #: Unacked jobs held at once. Unset: 2 for ComfyUI (the next prompt waits in ComfyUI's
    #: own queue, so the GPU never waits on us; measured in docs/benchmarks.md), else 1.
    prefetch: int | None = Field(default=None, ge=1, le=16)
    #: On SIGTERM, how long the current job may run on before it is handed back.
    drain_seconds: float = Field(default=30.0, ge=0)
    #: Pause before requeueing a job after a transient failure (grows with the attempt).
    retry_backoff_seconds: float = Field(default=1.0, ge=0)
    #: ``/healthz``, ``/readyz`` and ``/metrics`` of this renderer on this port (unset: off;
    #: 0: any free port), on ``RENDERER_HEALTH_HOST``.
    health_port: int | None = Field(default=None, ge=0, le=65535)
    health_host: str = "127.0.0.1"
    #: Seconds between two heartbeats (the fleet registry drops a worker after 3 missed).
    heartbeat_seconds: float = Field(default=5.0, gt=0, le=300)
    #: Model affinity (``AMQP_AFFINITY_WAIT_SECONDS``): how often an idle renderer looks
    #: at the other models' queues to decide whether to switch (jittered by half).
    affinity_poll_seconds: float = Field(default=0.5, gt=0, le=60)
    #: The longest pause between two such looks while every model queue was empty: the
    #: pause doubles from ``affinity_poll_seconds`` up to this, and a frontend's wake (a
    #: job published to a model's queue) brings the next look forward.
    affinity_idle_poll_seconds: float = Field(default=5.0, gt=0, le=600)
    #: Torch device for the demo backend: ``auto`` picks CUDA when present.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: Demo backend only: least wall time per step, so its progress is visible to a person.
    demo_step_seconds: float = Field(default=0.05, ge=0)
    #: Previews are downscaled so their longest side is at most this many pixels.
    preview_max_side: int = Field(default=256, ge=16, le=2048)
    #: At most one preview per job every this many seconds (previews are droppable).
    preview_interval_seconds: float = Field(default=1.0, ge=0)

    _split_lanes = field_validator("lanes", mode="before")(split_csv)

    @field_validator("lane_weights", mode="before")
    @classmethod
    def _parse_weights(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        weights: dict[str, object] = {}
        for part in filter(None, (piece.strip() for piece in value.split(","))):
            lane, sep, weight = part.partition("=")
            if not sep or not lane.strip():
                raise ValueError(f"{part!r}: write lane=weight, e.g. fast=4,relax=1")
            weights[lane.strip()] = weight.strip()
        return weights

    @field_validator("lane_weights")
    @classmethod
    def _check_weights(cls, weights: dict[str, int]) -> dict[str, int]:
        for lane, weight in weights.items():
            if not 1 <= weight <= 1000:
                raise ValueError(f"the weight of lane {lane!r} is {weight}: use 1 to 1000")
        return weights


class ComfyUISettings(BaseSettings):
    """Where the ComfyUI this renderer drives answers (the ``comfyui`` backend)."""

    model_config = SettingsConfigDict(
        env_prefix="COMFYUI_", env_file=".env", extra="ignore", env_ignore_empty=True
    )

    #: ``http://127.0.0.1:8188``. When set, ``RENDERER_BACKEND=auto`` picks ``comfyui``.
    url: str | None = None
    #: The WebSocket ``clientId`` and every prompt's ``client_id``. Unset: a fixed id
    #: derived from ``RENDERER_WORKER_ID``, so a restarted worker gets its frames back.
    client_id: str | None = None
    #: Each TCP connect and WebSocket handshake may take this long.
    connect_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    #: Each HTTP call (submit, history, one image's download, ...) may take this long.
    request_timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    #: Watchdog: no progress nor node change for this long, and the prompt is
    #: interrupted and the job retried (a first model load must fit in it).
    stall_seconds: float = Field(default=120.0, gt=0)
    #: Longest pause between two WebSocket reconnection attempts (backoff doubles to it).
    reconnect_max_seconds: float = Field(default=30.0, gt=0, le=600)
    #: A restarted worker finds its predecessor's running prompt in ComfyUI: it waits
    #: this long for that job to come back to it (and attaches), then interrupts it. A
    #: job still queued comes back within milliseconds of the worker's start; one that
    #: went to another renderer never does, and this prompt then renders for nobody.
    orphan_grace_seconds: float = Field(default=1.0, ge=0, le=3600)
    #: Previews ComfyUI draws, per prompt: ``auto`` (TAESD when installed, else
    #: latent2rgb), ``latent2rgb`` (cheap), ``taesd`` (better), ``none``.
    preview_method: Literal["auto", "latent2rgb", "taesd", "none"] = "auto"

    # -- running ComfyUI ourselves (the supervisor), when COMFYUI_PATH is set ----------
    #: Folder of ComfyUI's ``main.py``: the renderer starts and supervises it there,
    #: listening where ``COMFYUI_URL`` points (default ``http://127.0.0.1:8188``).
    path: Path | None = None
    #: The Python that runs ComfyUI (its own virtualenv, usually).
    python: str = Field(default_factory=lambda: sys.executable)
    #: Extra ComfyUI arguments, space-separated (``--lowvram --preview-method taesd``).
    args: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: ``CUDA_VISIBLE_DEVICES`` for this ComfyUI: one GPU per renderer.
    gpu: str | None = None
    #: How long ComfyUI may take to answer after it starts (model folders, custom nodes).
    start_timeout_seconds: float = Field(default=180.0, gt=0)
    #: Seconds between two health checks (``/system_stats``), and how many failed checks
    #: in a row mean it hangs (it is then killed and started again).
    health_interval_seconds: float = Field(default=10.0, gt=0)
    health_failures: int = Field(default=3, ge=1)
    #: OOM or CUDA faults in a row that restart ComfyUI (a success resets the count).
    max_faults: int = Field(default=3, ge=1)

    @field_validator("args", mode="before")
    @classmethod
    def _split_args(cls, value: object) -> object:
        return shlex.split(value) if isinstance(value, str) else value

    @property
    def effective_url(self) -> str | None:
        """``COMFYUI_URL``, or where a supervised ComfyUI listens by default."""
        if self.url:
            return self.url
        return DEFAULT_SUPERVISED_URL if self.path is not None else None

    def supervisor_config(self) -> SupervisorConfig | None:
        """How to run ComfyUI here, or None when ``COMFYUI_PATH`` is not set."""
        if self.path is None:
            return None
        url = urlsplit(self.effective_url or DEFAULT_SUPERVISED_URL)
        return SupervisorConfig(
            path=self.path,
            host=url.hostname or "127.0.0.1",
            port=url.port or 8188,
            python=self.python,
            extra_args=tuple(self.args),
            gpu=self.gpu,
            start_timeout=self.start_timeout_seconds,
            health_interval=self.health_interval_seconds,
            health_timeout=min(self.request_timeout_seconds, self.health_interval_seconds),
            health_failures=self.health_failures,
            max_faults=self.max_faults,
        )


#: Where a ComfyUI we start listens when COMFYUI_URL does not say.
DEFAULT_SUPERVISED_URL = "http://127.0.0.1:8188"


def choose_backend(renderer: RendererSettings, comfyui: ComfyUISettings) -> str:
    """The backend name ``RENDERER_BACKEND`` means: ``auto`` follows ``COMFYUI_URL`` (or
    ``COMFYUI_PATH``, a ComfyUI this renderer runs itself)."""
    if renderer.backend != "auto":
        return renderer.backend
    return "comfyui" if comfyui.effective_url else "demo"
