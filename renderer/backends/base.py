"""The backend plug-in interface.

A backend turns one bound workflow into images. Backends are found through the
``brigade.backends`` entry-point group: each entry point names a factory
``create(settings: RendererSettings) -> Backend``, so a third party can ship one in its
own distribution. Built in: ``demo`` (torch, no weights) and, later, ``comfyui``.

A backend never talks to the broker, the store or a user: it reports progress and
previews through the :class:`Reporter` it is given and returns PNG bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

Scalar = str | int | float | bool


@dataclass(frozen=True, slots=True)
class RenderTask:
    """One job as a backend sees it: the bound graph and the resolved parameters.

    ``images`` holds the bytes of each ``image`` parameter the job gave (already handed
    to :meth:`Backend.upload_image`, whose answer is bound into ``graph``), for backends
    that read inputs themselves rather than through the graph.
    """

    job_id: str
    attempt: int
    workflow: str
    graph: Mapping[str, Any]
    params: Mapping[str, Scalar]
    images: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RenderResult:
    """The backend's outputs: encoded PNG images, in order."""

    images: list[bytes]
    timings: dict[str, float] = field(default_factory=dict)


class Reporter(Protocol):
    """How a backend tells the world what it is doing. Both calls are cheap and may drop."""

    async def progress(self, step: int, total: int, node: str | None = None) -> None: ...

    async def preview(self, image: bytes, mime: str, step: int | None = None) -> None: ...

    def wants_preview(self) -> bool:
        """Whether a preview sent now would be used: ask before preparing one."""
        ...


class Backend(Protocol):
    """A GPU (or CPU) engine that renders bound workflows."""

    name: str

    async def start(self) -> None:
        """Warm up: connect, load, check. Raise ``BackendUnavailable`` when it cannot."""

    async def close(self) -> None:
        """Release everything. Safe to call twice."""

    async def upload_image(self, name: str, data: bytes) -> str:
        """Make the input image ``data`` available to the engine before a render.

        ``name`` is a content address (``<sha256>.<png|jpg|webp>``), so uploading the same
        name twice is harmless. Returns the file name to bind into the graph (ComfyUI's
        ``LoadImage`` ``image`` input). Raise ``RenderError`` subclasses, like ``render``.
        """
        ...

    async def render(self, task: RenderTask, report: Reporter) -> RenderResult:
        """Render ``task``. Raise ``RenderFailed`` subclasses from ``renderer.exceptions``."""

    def describe(self) -> dict[str, Any]:
        """What heartbeats advertise: device name, memory, loaded models."""


class HoldsJobs(Protocol):
    """An optional hook of a backend that keeps work across a renderer's restart (a
    ComfyUI keeps its queue when the renderer driving it is killed): the worker calls
    ``held`` when a redelivered job arrives, before it waits for a free slot, so the
    backend knows that job is here and coming, however long it waits."""

    def held(self, job_id: str) -> None: ...
