"""``WorkerRegistry``: what a frontend knows of the fleet from heartbeats, and the
summaries admission asks for on every job (renderers per lane, loadable model files),
worked out again on every new beat and when renderers fall silent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from jobs import registry as registry_module
from jobs.bus import JobBus
from jobs.memory import MemoryBroker, MemoryHub
from jobs.models import Heartbeat, WorkerState
from jobs.registry import WorkerRegistry
from jobs.topology import build_topology

FOLDERS = ("checkpoints",)


@pytest.fixture
async def fleet() -> AsyncIterator[tuple[JobBus, WorkerRegistry]]:
    broker = MemoryBroker(MemoryHub(), build_topology(["fast", "slow"], prefix="reg"))
    await broker.connect()
    await broker.declare()
    bus = JobBus(broker)
    registry = WorkerRegistry(bus, "front")
    await registry.start()
    yield bus, registry
    await registry.stop()
    await broker.close()


def beat(worker: str, lanes: list[str], files: list[str], interval: float = 5.0) -> Heartbeat:
    return Heartbeat(
        worker_id=worker,
        backend="comfyui",
        lanes=lanes,
        state=WorkerState.IDLE,
        available_models={"checkpoints": files, "loras": ["style.safetensors"]},
        interval=interval,
    )


async def _heard(registry: WorkerRegistry, count: int) -> None:
    async with asyncio.timeout(5):
        while len(registry.workers()) != count:
            await asyncio.sleep(0.01)


async def test_summaries_follow_every_new_beat(fleet: tuple[JobBus, WorkerRegistry]) -> None:
    bus, registry = fleet
    await bus.heartbeat(beat("a", ["fast"], ["sd15.safetensors"]))
    await _heard(registry, 1)
    assert registry.serving("fast") == 1 and registry.serving("slow") == 0
    assert registry.loadable("fast", FOLDERS) == {"sd15.safetensors"}

    await bus.heartbeat(beat("b", ["fast", "slow"], ["sdxl.safetensors"]))
    await _heard(registry, 2)
    # Asked again at once: the new beat counts, no waiting for the summary to age.
    assert registry.serving("fast") == 2 and registry.serving("slow") == 1
    assert registry.loadable("fast", FOLDERS) == {"sd15.safetensors", "sdxl.safetensors"}
    assert registry.loadable("slow", FOLDERS) == {"sdxl.safetensors"}


async def test_a_silent_renderer_leaves_the_summaries(
    fleet: tuple[JobBus, WorkerRegistry], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry_module, "SUMMARY_SECONDS", 0.05)
    bus, registry = fleet
    await bus.heartbeat(beat("a", ["fast"], ["sd15.safetensors"]))
    await bus.heartbeat(beat("short", ["fast"], ["sdxl.safetensors"], interval=0.1))
    await _heard(registry, 2)
    assert registry.serving("fast") == 2

    await asyncio.sleep(0.1 * registry_module.MISSED_BEATS + 0.1)  # "short" missed 3 beats
    assert registry.serving("fast") == 1
    assert registry.loadable("fast", FOLDERS) == {"sd15.safetensors"}
