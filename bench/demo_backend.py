"""How fast the demo backend renders, with no pacing: median seconds per job and per step.

Run from the repository root::

    .venv/bin/python -m bench.demo_backend [--jobs 5] [--size 512] [--steps 20]

It measures CPU, and CUDA too when torch sees it. Each device renders one untimed job
first (torch start-up, CUDA context, allocator warm-up), then ``--jobs`` timed jobs with
different seeds. Previews are throttled as in production (one per second) and
``demo_step_seconds`` is 0, so the numbers are the backend's own work.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time
from typing import Literal

import structlog

from renderer.backends.base import RenderTask, Scalar
from renderer.backends.demo import create
from renderer.settings import RendererSettings


class _Discard:
    async def progress(self, step: int, total: int, node: str | None = None) -> None:
        pass

    async def preview(self, image: bytes, mime: str, step: int | None = None) -> None:
        pass

    def wants_preview(self) -> bool:
        return True


async def _bench(
    device: Literal["cpu", "cuda"], jobs: int, size: int, steps: int, batch: int
) -> list[float]:
    backend = create(RendererSettings(device=device, demo_step_seconds=0.0))
    await backend.start()
    try:
        seconds = []
        for seed in range(jobs + 1):
            params: dict[str, Scalar] = {
                "prompt": "a lighthouse at dusk, oil on canvas",
                "seed": seed,
                "steps": steps,
                "width": size,
                "height": size,
                "batch": batch,
            }
            task = RenderTask(f"bench-{seed}", 1, "demo", {}, params)
            began = time.perf_counter()
            await backend.render(task, _Discard())
            seconds.append(time.perf_counter() - began)
        return seconds[1:]
    finally:
        await backend.close()


async def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    import torch

    devices: list[Literal["cpu", "cuda"]] = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"{args.jobs} jobs of {args.size}x{args.size} x{args.batch}, {args.steps} steps"
    )
    for device in devices:
        seconds = await _bench(device, args.jobs, args.size, args.steps, args.batch)
        job = statistics.median(seconds)
        name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
        print(
            f"{name}: median {job:.3f} s per job, {job / args.steps * 1000:.1f} ms per step "
            f"(min {min(seconds):.3f} s, max {max(seconds):.3f} s)"
        )


if __name__ == "__main__":
    asyncio.run(_main())
