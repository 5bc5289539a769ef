"""The weight-free ``demo`` backend (``renderer.backends.demo``) against a fake reporter."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import io
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from PIL import Image

from jobs.models import FailureReason
from renderer.backends import demo
from renderer.backends.base import Backend, RenderResult, RenderTask, Scalar
from renderer.exceptions import BackendUnavailable, InvalidWorkflow
from renderer.settings import RendererSettings

ROOT = Path(__file__).resolve().parents[1]
SMALL: dict[str, Scalar] = {"prompt": "a lighthouse at dusk", "seed": 7, "width": 64, "height": 64}


class RecordingReporter:
    def __init__(self) -> None:
        self.progress_calls: list[tuple[int, int, str | None]] = []
        self.previews: list[tuple[bytes, str, int | None]] = []
        self.progressed = asyncio.Event()

    async def progress(self, step: int, total: int, node: str | None = None) -> None:
        self.progress_calls.append((step, total, node))
        self.progressed.set()

    async def preview(self, image: bytes, mime: str, step: int | None = None) -> None:
        self.previews.append((image, mime, step))

    def wants_preview(self) -> bool:
        return True


def settings(**overrides: Any) -> RendererSettings:
    values: dict[str, Any] = {
        "device": "cpu",
        "demo_step_seconds": 0.0,
        "preview_max_side": 32,
        "preview_interval_seconds": 0.0,
    }
    values.update(overrides)
    return RendererSettings(**values)


def task(**params: Scalar) -> RenderTask:
    merged = {**SMALL, "steps": 4, **params}
    return RenderTask(job_id="job-1", attempt=1, workflow="demo", graph={}, params=merged)


@pytest.fixture
async def backend() -> AsyncIterator[demo.DemoBackend]:
    instance = demo.create(settings())
    await instance.start()
    yield instance
    await instance.close()


async def render(backend: demo.DemoBackend, **params: Scalar) -> RenderResult:
    return await backend.render(task(**params), RecordingReporter())


def pixels(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    image.load()
    return image


async def test_same_inputs_give_identical_png(backend: demo.DemoBackend) -> None:
    first = await render(backend)
    second = await render(backend)

    assert first.images == second.images
    assert pixels(first.images[0]).size == (64, 64)


async def test_a_fresh_process_gives_the_same_png(backend: demo.DemoBackend) -> None:
    here = await render(backend)
    script = (
        "import asyncio, hashlib, sys\n"
        "from renderer.backends.base import RenderTask\n"
        "from renderer.backends.demo import create\n"
        "from renderer.settings import RendererSettings\n"
        "class Quiet:\n"
        "    async def progress(self, step, total, node=None): pass\n"
        "    async def preview(self, image, mime, step=None): pass\n"
        f"t = RenderTask('job-1', 1, 'demo', {{}}, {dict(SMALL, steps=4)!r})\n"
        "b = create(RendererSettings(device='cpu', demo_step_seconds=0))\n"
        "r = asyncio.run(b.render(t, Quiet()))\n"
        "sys.stdout.write(hashlib.sha256(r.images[0]).hexdigest())\n"
    )
    completed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "random"},
    )

    assert completed.stdout.strip().splitlines()[-1] == hashlib.sha256(here.images[0]).hexdigest()


async def test_different_seed_gives_different_image(backend: demo.DemoBackend) -> None:
    one = await render(backend, seed=1)
    two = await render(backend, seed=2)

    assert pixels(one.images[0]).tobytes() != pixels(two.images[0]).tobytes()


async def test_different_prompt_gives_different_image(backend: demo.DemoBackend) -> None:
    one = await render(backend, prompt="a red fox")
    two = await render(backend, prompt="a red fox.")

    assert pixels(one.images[0]).tobytes() != pixels(two.images[0]).tobytes()


def test_prompt_picks_the_palette() -> None:
    assert demo.palette("a red fox") == demo.palette("a red fox")
    assert demo.palette("a red fox") != demo.palette("a blue whale")
    assert all(0.0 <= c <= 1.0 for colour in demo.palette("x") for c in colour)


def test_generator_seed_is_stable_and_distinct() -> None:
    # Pinned: Python's hash() would change between processes, SHA-256 does not.
    digest = hashlib.sha256(b'["a", 1]').digest()
    assert demo.generator_seed("a", 1) == int.from_bytes(digest[:8], "big")
    assert demo.generator_seed("a", 1) != demo.generator_seed("a", 2)
    assert demo.generator_seed("a", 12) != demo.generator_seed("a1", 2)


async def test_progress_for_every_step_in_order(backend: demo.DemoBackend) -> None:
    reporter = RecordingReporter()

    await backend.render(task(steps=6), reporter)

    assert reporter.progress_calls == [(step, 6, "demo") for step in range(1, 7)]


async def test_previews_decode_within_max_side() -> None:
    instance = demo.create(settings(preview_max_side=16))
    reporter = RecordingReporter()

    await instance.render(task(width=64, height=40, steps=5), reporter)

    assert len(reporter.previews) == 5
    for data, mime, step in reporter.previews:
        image = Image.open(io.BytesIO(data))
        assert image.format is not None
        assert Image.MIME[image.format] == mime
        assert max(image.size) <= 16
        assert image.size == (16, 10)
        assert step is not None
    assert [step for _, _, step in reporter.previews] == [1, 2, 3, 4, 5]


async def test_previews_are_throttled_but_the_last_step_always_has_one() -> None:
    instance = demo.create(settings(preview_interval_seconds=3600.0))
    reporter = RecordingReporter()

    await instance.render(task(steps=8), reporter)

    assert [step for _, _, step in reporter.previews] == [1, 8]


async def test_last_preview_shows_the_final_image(backend: demo.DemoBackend) -> None:
    reporter = RecordingReporter()

    result = await backend.render(task(), reporter)

    final = pixels(result.images[0]).resize((32, 32), Image.Resampling.BILINEAR)
    last = Image.open(io.BytesIO(reporter.previews[-1][0])).convert("RGB")
    error = sum(abs(a - b) for a, b in zip(final.tobytes(), last.tobytes(), strict=True))
    assert error / (32 * 32 * 3) < 12


async def test_batch_gives_distinct_images_of_the_right_size(backend: demo.DemoBackend) -> None:
    result = await render(backend, batch=3, width=48, height=32)

    assert len(result.images) == 3
    decoded = [pixels(png) for png in result.images]
    assert all(image.size == (48, 32) and image.mode == "RGB" for image in decoded)
    assert len({image.tobytes() for image in decoded}) == 3


async def test_batch_item_i_is_the_image_for_seed_plus_i(backend: demo.DemoBackend) -> None:
    batch = await render(backend, batch=3, seed=10)
    single = await render(backend, seed=12)

    assert batch.images[2] == single.images[0]


async def test_defaults_apply(backend: demo.DemoBackend) -> None:
    reporter = RecordingReporter()
    bare = RenderTask(job_id="j", attempt=1, workflow="demo", graph={}, params={"prompt": "x"})

    result = await backend.render(bare, reporter)

    assert pixels(result.images[0]).size == (512, 512)
    assert reporter.progress_calls[-1] == (20, 20, "demo")
    assert (
        result.images
        == (await render(backend, prompt="x", seed=0, width=512, height=512, steps=20)).images
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("steps", 0),
        ("steps", 201),
        ("steps", 2.5),
        ("steps", True),
        ("width", 0),
        ("width", 4096),
        ("height", -8),
        ("height", "64"),
        ("batch", 0),
        ("batch", 9),
        ("seed", "seven"),
        ("prompt", 12),
    ],
)
async def test_bad_params_raise_invalid_workflow_naming_the_param(
    backend: demo.DemoBackend, name: str, value: Scalar
) -> None:
    reporter = RecordingReporter()

    with pytest.raises(InvalidWorkflow) as caught:
        await backend.render(task(**{name: value}), reporter)

    assert name in caught.value.user_message
    assert caught.value.reason is FailureReason.INVALID
    assert reporter.progress_calls == []


async def test_result_timings_and_log_events() -> None:
    instance = demo.create(settings())
    with structlog.testing.capture_logs() as logs:
        await instance.start()
        result = await instance.render(task(steps=3), RecordingReporter())

    assert result.timings["render"] > 0
    events = {entry["event"]: entry for entry in logs}
    assert events["demo.started"]["device"] == "cpu"
    rendered = events["demo.rendered"]
    assert rendered["steps"] == 3
    assert rendered["size"] == "64x64"
    assert rendered["seconds"] >= 0


async def test_each_step_lasts_at_least_demo_step_seconds() -> None:
    instance = demo.create(settings(demo_step_seconds=0.05))
    began = time.monotonic()

    await instance.render(task(steps=4), RecordingReporter())

    assert time.monotonic() - began >= 0.2


async def test_cancel_propagates_promptly() -> None:
    instance = demo.create(settings(demo_step_seconds=5.0))
    reporter = RecordingReporter()
    running = asyncio.create_task(instance.render(task(steps=50), reporter))
    await asyncio.wait_for(reporter.progressed.wait(), timeout=10)

    running.cancel()
    began = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await running

    assert time.monotonic() - began < 1.0
    assert running.cancelled()
    assert len(reporter.progress_calls) == 1


async def test_cancel_during_a_thread_step_waits_for_it() -> None:
    finished = False

    def slow() -> None:
        nonlocal finished
        time.sleep(0.2)
        finished = True

    running = asyncio.create_task(demo._in_thread(slow))
    await asyncio.sleep(0.05)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running

    assert finished


def test_describe_says_demo_and_no_models() -> None:
    instance = demo.create(settings())

    before = instance.describe()

    assert before["backend"] == "demo"
    assert before["models"] == []


async def test_describe_after_start_names_the_device(backend: demo.DemoBackend) -> None:
    info = backend.describe()

    assert info["device"] == "cpu"
    assert info["models"] == []
    assert "demo" in info["note"]


async def test_close_is_safe_twice(backend: demo.DemoBackend) -> None:
    await backend.close()
    await backend.close()

    assert backend.describe()["device"] == "not started"


async def test_start_without_torch_is_backend_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    instance = demo.create(settings())

    with pytest.raises(BackendUnavailable) as caught:
        await instance.start()

    assert "renderer" in caught.value.user_message
    assert caught.value.transient


async def test_cuda_asked_for_but_absent_is_backend_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    instance = demo.create(settings(device="cuda"))

    with pytest.raises(BackendUnavailable) as caught:
        await instance.start()

    assert "CUDA" in caught.value.user_message


@pytest.mark.gpu
async def test_cuda_and_cpu_give_identical_png(backend: demo.DemoBackend) -> None:
    """Runs only with ``pytest -m gpu`` on a machine with CUDA (deselected by default)."""
    on_gpu = demo.create(settings(device="cuda"))
    await on_gpu.start()
    try:
        params: dict[str, Scalar] = {"width": 192, "height": 128, "batch": 2, "steps": 5}
        gpu = await on_gpu.render(task(**params), RecordingReporter())
    finally:
        await on_gpu.close()
    cpu = await render(backend, **params)

    assert gpu.images == cpu.images


def test_importing_the_module_does_not_import_torch() -> None:
    code = "import renderer.backends.demo, sys; assert 'torch' not in sys.modules"

    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=50)


def test_create_satisfies_the_backend_protocol() -> None:
    instance: Backend = demo.create(settings())

    assert instance.name == "demo"
    assert isinstance(instance, demo.DemoBackend)
    for method in ("start", "close", "render"):
        assert inspect.iscoroutinefunction(getattr(instance, method))
    assert callable(instance.describe)
    assert list(inspect.signature(demo.create).parameters) == ["settings"]
    assert list(inspect.signature(instance.render).parameters) == ["task", "report"]
