"""Preview encoding and throttling (``renderer.previews``)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from renderer import previews
from renderer.previews import PreviewThrottle, encode_preview


def decode(data: bytes, mime: str) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format is not None
    assert Image.MIME[image.format] == mime
    image.load()
    return image


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [
        ((400, 200), 100, (100, 50)),
        ((200, 400), 100, (50, 100)),
        ((300, 300), 256, (256, 256)),
        ((1000, 3), 100, (100, 1)),
    ],
)
def test_downscales_to_max_side_keeping_aspect(
    size: tuple[int, int], max_side: int, expected: tuple[int, int]
) -> None:
    data, mime = encode_preview(Image.new("RGB", size, (200, 30, 90)), max_side)

    assert decode(data, mime).size == expected


def test_never_upscales() -> None:
    data, mime = encode_preview(Image.new("RGB", (40, 30), (10, 20, 30)), 256)

    assert decode(data, mime).size == (40, 30)


def test_prefers_webp() -> None:
    _, mime = encode_preview(Image.new("RGB", (8, 8)), 8)

    assert mime == ("image/webp" if previews._webp_supported() else "image/jpeg")


def test_falls_back_to_jpeg_without_webp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(previews, "_webp_supported", lambda: False)

    data, mime = encode_preview(Image.new("RGB", (64, 48), (0, 128, 255)), 32)

    assert mime == "image/jpeg"
    assert data.startswith(b"\xff\xd8")
    assert decode(data, mime).size == (32, 24)


def test_accepts_encoded_bytes() -> None:
    png = io.BytesIO()
    Image.new("RGB", (120, 60), (1, 2, 3)).save(png, format="PNG")

    data, mime = encode_preview(png.getvalue(), 60)

    assert decode(data, mime).size == (60, 30)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "I;16"])
def test_any_mode_becomes_rgb(mode: str) -> None:
    data, mime = encode_preview(Image.new(mode, (20, 10)), 10)

    image = decode(data, mime)
    assert image.mode == "RGB"
    assert image.size == (10, 5)


def test_rejects_bad_arguments() -> None:
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="max_side"):
        encode_preview(image, 0)
    with pytest.raises(ValueError, match="quality"):
        encode_preview(image, 8, quality=0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_throttle_lets_one_through_per_interval() -> None:
    clock = FakeClock()
    throttle = PreviewThrottle(1.0, clock=clock)

    assert throttle.should_send() is True
    assert throttle.should_send() is False
    clock.now += 0.5
    assert throttle.should_send() is False
    clock.now += 0.5
    assert throttle.should_send() is True
    clock.now += 0.99
    assert throttle.should_send() is False
    clock.now += 5.0
    assert throttle.should_send() is True
    assert throttle.should_send() is False


def test_throttle_interval_counts_from_the_last_preview_sent() -> None:
    clock = FakeClock()
    throttle = PreviewThrottle(2.0, clock=clock)
    sent = []
    for _ in range(10):
        sent.append(throttle.should_send())
        clock.now += 0.75

    # Sent at t=0, 2.25, 4.5, 6.75: each at least 2 s after the one before.
    assert sent == [True, False, False, True, False, False, True, False, False, True]


def test_zero_interval_sends_everything() -> None:
    throttle = PreviewThrottle(0.0, clock=FakeClock())

    assert all(throttle.should_send() for _ in range(5))


def test_throttle_rejects_negative_interval() -> None:
    with pytest.raises(ValueError, match="interval_seconds"):
        PreviewThrottle(-1.0)


def test_ready_peeks_without_taking_the_slot() -> None:
    clock = FakeClock()
    throttle = PreviewThrottle(1.0, clock=clock)

    assert throttle.ready() and throttle.ready()
    assert throttle.should_send()
    assert not throttle.ready()
    clock.now += 1.0
    assert throttle.ready()
