"""The ``demo`` backend: a weight-free stand-in for a diffusion model, written in torch.

This is a DEMO, not a model. It loads no weights and understands nothing of the prompt: it
hashes the prompt and the seed into an abstract picture (soft coloured blobs, rings and
sinusoidal bands; the palette comes from the prompt, the layout from the prompt and the
seed) and then walks from noise to that picture over the requested steps as a sampler
would, reporting every step and sending real preview frames on the way. It lets Brigade
run end to end where there is no ComfyUI, no checkpoint and perhaps no GPU.

Parameters read from the task: ``prompt``, ``seed`` (0 when absent), ``steps`` (20),
``width`` and ``height`` (512) and ``batch`` (1). Out-of-range values raise
``InvalidWorkflow`` naming the parameter.

Input images (the ``image`` parameter, bytes in ``task.images``), still no model:

* **img2img-like**: the walk starts from the input image (scaled down to fit ``width``
  x ``height``, 512 by default, sides cut to a multiple of 8) instead of grey noise, and
  ends at a blend of the input and the hashed picture weighted by ``denoise`` (0: the
  input back, 1: the input ignored) — how a sampler's denoise strength behaves, without
  any understanding;
* **upscale** (a ``scale_by`` parameter): the input resized by Pillow's Lanczos filter,
  as ComfyUI's ``ImageScaleBy`` does, in one step.

Determinism: the same (prompt, seed, width, height, steps) gives byte-identical PNGs on
every run, on CPU or CUDA. Every random number is drawn on the CPU from a
``torch.Generator`` seeded with SHA-256 of the prompt and the seed, then moved to the
device. The picture is composed on the device in float64, so the few-ulp differences
between device maths libraries vanish when it is rounded to float32, and it is quantised
to 8 bits on the CPU. Item ``i`` of a batch is exactly the image for seed ``seed + i``.

torch is imported by :meth:`DemoBackend.start`, never when this module is imported.
"""

from __future__ import annotations

import asyncio
import colorsys
import ctypes
import dataclasses
import hashlib
import importlib
import io
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import structlog
from PIL import Image

from renderer.backends.base import RenderResult, RenderTask, Reporter, Scalar
from renderer.exceptions import BackendUnavailable, InvalidWorkflow, OutOfMemory
from renderer.previews import PreviewThrottle, encode_preview
from renderer.settings import RendererSettings

log = structlog.get_logger(__name__)

#: Largest width or height: one job must not be able to take the worker's memory.
MAX_SIDE = 2048
#: Most images per job, for the same reason.
MAX_BATCH = 8
#: Most steps per job: beyond this a demo only keeps the worker busy.
MAX_STEPS = 200
#: Noise lives at 1/8 of the image size, as a Stable Diffusion latent does, so the
#: previews blur into focus the way a real sampler's do.
LATENT_FACTOR = 8
#: How much fresh noise the first step adds; it decays to none at the last step.
STEP_NOISE = 0.3

#: Hue offsets of the palette schemes: analogous, complementary, triadic, split.
_SCHEMES = (
    (0.0, 0.08, -0.08, 0.16, -0.16),
    (0.0, 0.5, 0.06, 0.56, -0.06),
    (0.0, 1 / 3, 2 / 3, 0.06, 0.39),
    (0.0, 0.42, 0.58, 0.12, 0.88),
)

_P = ParamSpec("_P")
_T = TypeVar("_T")
Colour = tuple[float, float, float]


@dataclass(frozen=True, slots=True)
class DemoParams:
    """A demo job's parameters, checked and with defaults applied."""

    prompt: str
    seed: int
    steps: int
    width: int
    height: int
    batch: int
    denoise: float = 1.0
    scale_by: float | None = None

    @classmethod
    def parse(cls, params: Mapping[str, Scalar]) -> DemoParams:
        """Read ``params``; raise ``InvalidWorkflow`` naming the first bad parameter."""
        prompt = params.get("prompt", "")
        if not isinstance(prompt, str):
            raise InvalidWorkflow(f"prompt must be text, got {type(prompt).__name__}")
        scale_by = params.get("scale_by")
        return cls(
            prompt=prompt,
            seed=_int_param(params, "seed", 0),
            steps=_int_param(params, "steps", 20, 1, MAX_STEPS),
            width=_int_param(params, "width", 512, 1, MAX_SIDE),
            height=_int_param(params, "height", 512, 1, MAX_SIDE),
            batch=_int_param(params, "batch", 1, 1, MAX_BATCH),
            denoise=_float_param(params, "denoise", 1.0, 0.0, 1.0),
            scale_by=None if scale_by is None else _float_param(params, "scale_by", 1.0, 0.01, 8.0),
        )


def _float_param(
    params: Mapping[str, Scalar], name: str, default: float, low: float, high: float
) -> float:
    value = params.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidWorkflow(f"{name} must be a number, got {value!r}")
    if not low <= value <= high:
        raise InvalidWorkflow(f"{name} must be from {low:g} to {high:g}, got {value}")
    return float(value)


def fit_init(data: bytes, width: int, height: int) -> Image.Image:
    """The input image as RGB, scaled down to fit ``width`` x ``height``, sides multiples of 8."""
    with Image.open(io.BytesIO(data)) as opened:
        image = opened.convert("RGB")
    scale = min(1.0, width / image.width, height / image.height)
    size = (
        max(LATENT_FACTOR, int(image.width * scale) // LATENT_FACTOR * LATENT_FACTOR),
        max(LATENT_FACTOR, int(image.height * scale) // LATENT_FACTOR * LATENT_FACTOR),
    )
    return image.resize(size, Image.Resampling.LANCZOS)


def upscale(data: bytes, scale_by: float) -> bytes:
    """``ImageScaleBy`` with Lanczos: the input resized, no side beyond ``MAX_SIDE``."""
    with Image.open(io.BytesIO(data)) as opened:
        image = opened.convert("RGB")
    scale = min(scale_by, MAX_SIDE / image.width, MAX_SIDE / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return encode_png(image.resize(size, Image.Resampling.LANCZOS))


def from_image(torch: Any, image: Image.Image, device: Any) -> Any:
    """An 8-bit RGB image as a ``(3, H, W)`` float32 tensor in [0, 1] on ``device``."""
    raw = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    hwc = raw.view(image.height, image.width, 3)
    return hwc.permute(2, 0, 1).to(device=device, dtype=torch.float32).div_(255.0)


def _int_param(
    params: Mapping[str, Scalar],
    name: str,
    default: int,
    low: int | None = None,
    high: int | None = None,
) -> int:
    value = params.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidWorkflow(f"{name} must be a whole number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise InvalidWorkflow(f"{name} must be from {low} to {high}, got {value}")
    return value


def palette(prompt: str) -> list[Colour]:
    """The five RGB colours (0..1) a prompt paints with: the same prompt, the same colours."""
    digest = hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).digest()
    hue = int.from_bytes(digest[0:2], "big") / 65536
    offsets = _SCHEMES[digest[2] % len(_SCHEMES)]
    colours = []
    for index, offset in enumerate(offsets):
        saturation = 0.45 + 0.5 * digest[3 + index] / 255
        value = 0.55 + 0.43 * digest[8 + index] / 255
        colours.append(colorsys.hsv_to_rgb((hue + offset) % 1.0, saturation, value))
    return colours


def generator_seed(prompt: str, seed: int) -> int:
    """The 64-bit ``torch.Generator`` seed for one image: stable across processes."""
    key = json.dumps([prompt, seed]).encode("ascii")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big")


def compose(
    torch: Any, generator: Any, colours: list[Colour], height: int, width: int, device: Any
) -> Any:
    """The finished picture for one image: a ``(3, height, width)`` float32 tensor in [0, 1].

    Layout numbers come from ``generator`` (a CPU generator); the pixels are computed on
    ``device`` in float64.
    """
    f64 = torch.float64

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator, dtype=f64))

    def choice(count: int) -> int:
        return int(torch.randint(count, (), generator=generator))

    def colour(index: int, scale: float = 1.0) -> Any:
        rgb = [channel * scale for channel in colours[index]]
        return torch.tensor(rgb, dtype=f64, device=device).view(3, 1, 1)

    # Coordinates of pixel centres, scaled by the longer side so circles stay round.
    side = max(height, width)
    ys = ((torch.arange(height, dtype=f64, device=device) + (0.5 - height / 2)) / side).view(
        1, height, 1
    )
    xs = ((torch.arange(width, dtype=f64, device=device) + (0.5 - width / 2)) / side).view(
        1, 1, width
    )

    def paint(index: int, mask: Any, scale: float = 1.0) -> None:
        # One fused lerp in place: at 2048 px, temporaries cost more than the maths.
        image.lerp_(colour(index, scale), mask)

    angle = uniform(0.0, 2 * math.pi)
    ramp = (xs * math.cos(angle) + ys * math.sin(angle)).add_(0.5).clamp_(0.0, 1.0)
    image = colour(0, 0.22).expand(3, height, width).clone()
    paint(1 + choice(len(colours) - 1), ramp, 0.8)

    for _ in range(2):
        theta = uniform(0.0, math.pi)
        along = xs * math.cos(theta) + ys * math.sin(theta)
        across = ys * math.cos(theta) - xs * math.sin(theta)
        frequency, phase = uniform(2.0, 7.0), uniform(0.0, 2 * math.pi)
        warp = across.mul_(2 * math.pi * uniform(0.5, 2.5)).sin_().mul_(uniform(0.04, 0.16))
        wave = along.mul_(frequency).add_(warp).mul_(2 * math.pi).add_(phase).sin_()
        wave.mul_(0.5).add_(0.5).pow_(3).mul_(uniform(0.15, 0.35))
        paint(choice(len(colours)), wave)

    for _ in range(4 + choice(4)):
        dx = xs - uniform(-0.42, 0.42) * width / side
        dy = ys - uniform(-0.42, 0.42) * height / side
        radius, stretch, tilt = uniform(0.05, 0.24), uniform(0.6, 1.6), uniform(0.0, math.pi)
        u = (dx * math.cos(tilt) + dy * math.sin(tilt)).mul_(1 / (radius * stretch))
        v = (dy * math.cos(tilt) - dx * math.sin(tilt)).mul_(stretch / radius)
        mask = u.square_().add_(v.square_()).mul_(-0.5).exp_().mul_(uniform(0.5, 0.9))
        paint(choice(len(colours)), mask)

    for _ in range(1 + choice(2)):
        dx = xs - uniform(-0.3, 0.3) * width / side
        dy = ys - uniform(-0.3, 0.3) * height / side
        radius, thickness = uniform(0.1, 0.4), uniform(0.004, 0.02)
        ring = (dx.square_() + dy.square_()).sqrt_().sub_(radius).mul_(1 / thickness)
        mask = ring.square_().mul_(-0.5).exp_().mul_(uniform(0.3, 0.6))
        paint(choice(len(colours)), mask, 1.15)

    image.mul_((xs * xs + ys * ys).mul_(-0.5).add_(1.0))
    return image.clamp_(0.0, 1.0).to(torch.float32)


def signal_weight(step: int, steps: int) -> float:
    """How much of the finished picture shows after ``step`` of ``steps`` (cosine schedule)."""
    return 0.5 - 0.5 * math.cos(math.pi * step / steps)


def to_image(torch: Any, chw: Any) -> Image.Image:
    """Quantise a ``(3, H, W)`` float tensor in [0, 1] to an 8-bit RGB image, on the CPU."""
    pixels = chw.detach().to("cpu", torch.float32).clamp(0.0, 1.0).mul(255.0).round()
    hwc = pixels.to(torch.uint8).permute(1, 2, 0).contiguous()
    height, width, _ = hwc.shape
    # Read the bytes straight from the tensor's memory: the renderer extra installs torch
    # without numpy, so Tensor.numpy() may not exist.
    data = ctypes.string_at(hwc.data_ptr(), hwc.numel())
    return Image.frombytes("RGB", (width, height), data)


def encode_png(image: Image.Image) -> bytes:
    """The PNG bytes of ``image``, as the demo backend returns them."""
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False, compress_level=6)
    return out.getvalue()


class _Sampler:
    """One job's walk from noise to its pictures, every image of the batch at once.

    Built and stepped in a worker thread; never touched by two threads at a time.
    """

    def __init__(
        self, torch: Any, device: Any, params: DemoParams, init: Image.Image | None = None
    ) -> None:
        self._torch = torch
        self._device = device
        self._params = params
        colours = palette(params.prompt)
        self._generators = [
            torch.Generator(device="cpu").manual_seed(
                generator_seed(params.prompt, params.seed + i)
            )
            for i in range(params.batch)
        ]
        self._target = torch.stack(
            [
                compose(torch, generator, colours, params.height, params.width, device)
                for generator in self._generators
            ]
        )
        self._start = self._latent_noise().mul_(0.25).add_(0.5)
        if init is not None:
            # img2img as a demo: start at the input, end at it blended toward the picture.
            pixels = from_image(torch, init, device).unsqueeze(0).expand_as(self._target)
            self._target = torch.lerp(pixels, self._target, params.denoise)
            self._start = torch.lerp(pixels, self._start, params.denoise)
        # Reused every step: at 2048 px x 8 a fresh tensor per step is 400 MB of churn.
        self._buffer = torch.empty_like(self._target)
        self._current = self._start

    def _latent_noise(self) -> Any:
        torch, params = self._torch, self._params
        size = (3, -(-params.height // LATENT_FACTOR), -(-params.width // LATENT_FACTOR))
        noise = torch.stack([torch.randn(size, generator=g) for g in self._generators])
        return torch.nn.functional.interpolate(
            noise.to(self._device),
            size=(params.height, params.width),
            mode="bilinear",
            align_corners=False,
        )

    def step(self, step: int, preview_side: int | None) -> tuple[bytes, str] | None:
        """Advance to ``step``; return the first image's preview when ``preview_side`` is set."""
        steps = self._params.steps
        if step >= steps:
            self._current = self._target
        else:
            weight = signal_weight(step, steps)
            noise = self._latent_noise().mul_(STEP_NOISE * (1.0 - weight))
            self._torch.lerp(self._start, self._target, weight, out=self._buffer)
            self._current = self._buffer.add_(noise)
        if preview_side is None:
            return None
        return encode_preview(to_image(self._torch, self._current[0]), preview_side)

    def finish(self) -> list[bytes]:
        """The PNG of every image in the batch, in order."""
        return [encode_png(to_image(self._torch, item)) for item in self._target]


def _load_torch(wanted: str) -> tuple[Any, Any, str]:
    torch = importlib.import_module("torch")
    has_cuda = bool(torch.cuda.is_available())
    if wanted == "cuda" and not has_cuda:
        raise BackendUnavailable(
            "The demo renderer was told to use CUDA, but torch finds no CUDA device.",
            detail="RENDERER_DEVICE=cuda and torch.cuda.is_available() is false",
        )
    if wanted == "cpu" or not has_cuda:
        return torch, torch.device("cpu"), "cpu"
    index = torch.cuda.current_device()
    return torch, torch.device("cuda", index), f"cuda:{index} {torch.cuda.get_device_name(index)}"


async def _in_thread(func: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """Run ``func`` in a worker thread; on cancel, wait for it to end before re-raising."""
    task = asyncio.ensure_future(asyncio.to_thread(func, *args, **kwargs))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        # A thread cannot be interrupted: wait out this one short step so that nothing of
        # a cancelled job still runs on the device when render() returns.
        await asyncio.wait([task])
        if not task.cancelled():
            task.exception()
        raise


class DemoBackend:
    """The ``demo`` backend: deterministic abstract images from the prompt and seed, no weights.

    :meth:`start` imports torch and picks the device from ``settings.device`` (``auto``
    takes CUDA when torch sees it). :meth:`render` starts the backend first if needed.
    """

    name = "demo"

    def __init__(self, settings: RendererSettings) -> None:
        self._settings = settings
        self._torch: Any = None
        self._device: Any = None
        self._device_label = "not started"

    async def start(self) -> None:
        """Import torch and pick the device; raise ``BackendUnavailable`` when it cannot."""
        if self._torch is not None:
            return
        try:
            torch, device, label = await asyncio.to_thread(_load_torch, self._settings.device)
        except ImportError as exc:
            raise BackendUnavailable(
                "The demo renderer needs torch: install the `renderer` extra "
                "(pip install 'brigade[renderer]').",
                detail=f"cannot import torch: {exc}",
            ) from exc
        self._torch, self._device, self._device_label = torch, device, label
        log.info("demo.started", device=label)

    async def close(self) -> None:
        """Forget the device and hand cached CUDA memory back. Safe to call twice."""
        torch, device = self._torch, self._device
        self._torch, self._device, self._device_label = None, None, "not started"
        if torch is not None and device.type == "cuda":
            await asyncio.to_thread(torch.cuda.empty_cache)

    def describe(self) -> dict[str, Any]:
        """What heartbeats advertise: the device, no models, and that this is a demo."""
        info: dict[str, Any] = {
            "backend": self.name,
            "device": self._device_label,
            "models": [],
            "demo": True,
            "note": "demo backend: abstract images from a hash of the prompt and seed, "
            "no model weights",
        }
        if self._device is not None and self._device.type == "cuda":
            free, total = self._torch.cuda.mem_get_info(self._device)
            info["vram_total"] = int(total)
            info["vram_free"] = int(free)
        return info

    async def render(self, task: RenderTask, report: Reporter) -> RenderResult:
        """Render ``task``: one PNG per batch image, progress on every step, throttled previews.

        Raises ``InvalidWorkflow`` for bad parameters, ``OutOfMemory`` when CUDA runs out,
        ``BackendUnavailable`` when torch cannot be loaded.
        """
        params = DemoParams.parse(task.params)
        init_data = task.images.get("image")
        if init_data is not None and params.scale_by is not None:
            return await self._upscale(task, init_data, params.scale_by, report)
        init = None
        if init_data is not None:
            init = await _in_thread(fit_init, init_data, params.width, params.height)
            params = dataclasses.replace(params, width=init.width, height=init.height)
        await self.start()
        torch, device, settings = self._torch, self._device, self._settings
        throttle = PreviewThrottle(settings.preview_interval_seconds)
        began = time.monotonic()
        try:
            sampler = await _in_thread(_Sampler, torch, device, params, init)
            for step in range(1, params.steps + 1):
                step_began = time.monotonic()
                wants_preview = step == params.steps or throttle.should_send()
                preview = await _in_thread(
                    sampler.step, step, settings.preview_max_side if wants_preview else None
                )
                await report.progress(step, params.steps, node="demo")
                if preview is not None:
                    await report.preview(preview[0], preview[1], step)
                rest = settings.demo_step_seconds - (time.monotonic() - step_began)
                if rest > 0:
                    await asyncio.sleep(rest)
            images = await _in_thread(sampler.finish)
        except torch.cuda.OutOfMemoryError as exc:
            raise OutOfMemory(
                "The demo renderer ran out of GPU memory: try a smaller size or batch.",
                detail=f"CUDA out of memory at {params.width}x{params.height} x{params.batch}",
            ) from exc
        seconds = time.monotonic() - began
        log.info(
            "demo.rendered",
            job_id=task.job_id,
            attempt=task.attempt,
            seconds=round(seconds, 3),
            steps=params.steps,
            size=f"{params.width}x{params.height}",
            batch=params.batch,
        )
        return RenderResult(images=images, timings={"render": seconds})

    async def upload_image(self, name: str, data: bytes) -> str:
        """Nothing to upload: the demo reads ``task.images``. Returns ``name`` unchanged."""
        return name

    async def _upscale(
        self, task: RenderTask, data: bytes, scale_by: float, report: Reporter
    ) -> RenderResult:
        began = time.monotonic()
        png = await _in_thread(upscale, data, scale_by)
        await report.progress(1, 1, node="demo")
        seconds = time.monotonic() - began
        log.info("demo.upscaled", job_id=task.job_id, seconds=round(seconds, 3), scale=scale_by)
        return RenderResult(images=[png], timings={"render": seconds})


def create(settings: RendererSettings) -> DemoBackend:
    """The ``brigade.backends`` entry point: a demo backend, not yet started."""
    return DemoBackend(settings)
