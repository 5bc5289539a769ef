"""One renderer per GPU on a multi-GPU host: which GPUs, and each one's settings.

``brigade renderer --gpus all`` (or ``--gpus 0,2``) runs, in one process, one worker and
one supervised ComfyUI per GPU: ComfyUI ``i`` listens on the base port (``COMFYUI_URL``'s,
8188 by default) plus ``i`` with ``CUDA_VISIBLE_DEVICES`` set to that GPU alone, and its
worker is ``<worker id>-gpu<N>``. ``all`` asks ``nvidia-smi`` which GPUs there are.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

from renderer.settings import DEFAULT_SUPERVISED_URL, ComfyUISettings, RendererSettings

#: A GPU as ``CUDA_VISIBLE_DEVICES`` takes it: an index or a ``GPU-…``/``MIG-…`` UUID.
_GPU = re.compile(r"^(\d+|(GPU|MIG)-[0-9A-Za-z-]+)$")


class GpuError(ValueError):
    """The GPU list cannot be used; the message says why and what is allowed."""


def nvidia_smi_gpus(command: str = "nvidia-smi") -> list[str]:
    """The indices of the GPUs ``nvidia-smi`` sees."""
    if shutil.which(command) is None:
        raise GpuError(f"--gpus all needs {command}, which is not on PATH; list the GPUs instead")
    try:
        done = subprocess.run(
            [command, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        raise GpuError(f"{command} failed: {exc}") from exc
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def parse_gpus(spec: str, discover: Callable[[], list[str]] = nvidia_smi_gpus) -> list[str]:
    """``all`` or a comma-separated list of GPU indices or UUIDs, without repeats."""
    gpus = discover() if spec.strip() == "all" else [g.strip() for g in spec.split(",")]
    gpus = [gpu for gpu in gpus if gpu]
    if not gpus:
        raise GpuError("no GPU to run on (allowed: all, or a list such as 0,1,3)")
    for gpu in gpus:
        if not _GPU.match(gpu):
            raise GpuError(f"GPU {gpu!r} is not an index or a GPU/MIG UUID (e.g. 0,1,3)")
    if len(set(gpus)) != len(gpus):
        raise GpuError(f"a GPU is listed twice in {spec!r}")
    return gpus


def per_gpu(
    renderer: RendererSettings, comfyui: ComfyUISettings, gpus: list[str]
) -> list[tuple[RendererSettings, ComfyUISettings]]:
    """Each GPU's renderer and ComfyUI settings: its own worker id, port and device."""
    if comfyui.path is None:
        raise GpuError("--gpus runs one ComfyUI per GPU, so it needs COMFYUI_PATH")
    base = urlsplit(comfyui.url or DEFAULT_SUPERVISED_URL)
    host, port = base.hostname or "127.0.0.1", base.port or 8188
    configured = []
    for index, gpu in enumerate(gpus):
        label = gpu if gpu.isdigit() else str(index)
        netloc = f"{host}:{port + index}"
        configured.append(
            (
                renderer.model_copy(update={"worker_id": f"{renderer.worker_id}-gpu{label}"}),
                comfyui.model_copy(
                    update={
                        "url": urlunsplit((base.scheme or "http", netloc, "", "", "")),
                        "gpu": gpu,
                        "client_id": None,
                    }
                ),
            )
        )
    return configured
