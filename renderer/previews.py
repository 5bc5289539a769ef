"""Preview frames as every backend sends them: small, cheap to encode, and throttled.

A preview is a droppable hint of what a job will look like, so it is downscaled to a few
hundred pixels and encoded lossily (WebP, or JPEG where this Pillow lacks WebP). Each job
gets one :class:`PreviewThrottle`, so a backend that can produce a frame every step sends
at most one per interval. Both are synchronous: callers run :func:`encode_preview` through
``asyncio.to_thread``.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from functools import cache

from PIL import Image, features


@cache
def _webp_supported() -> bool:
    return bool(features.check("webp"))


def encode_preview(
    image: Image.Image | bytes, max_side: int, *, quality: int = 70
) -> tuple[bytes, str]:
    """Return ``(data, mime)``: ``image`` shrunk so its longest side is at most ``max_side``.

    The aspect ratio is kept and a smaller image is never enlarged. ``image`` may be a Pillow
    image or encoded bytes in any format Pillow reads. The result is WebP, or JPEG when this
    Pillow was built without WebP. Raises ``ValueError`` for a bad ``max_side`` or
    ``quality`` and ``PIL.UnidentifiedImageError`` for bytes that are not an image.
    """
    if max_side < 1:
        raise ValueError(f"max_side must be at least 1, got {max_side}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be from 1 to 100, got {quality}")
    if isinstance(image, bytes):
        with Image.open(io.BytesIO(image)) as opened:
            opened.load()
            picture = _as_rgb(opened)
    else:
        picture = _as_rgb(image)
    width, height = picture.size
    longest = max(width, height)
    if longest > max_side:
        # Rounded by hand (not ``thumbnail``) so the longest side lands on max_side exactly.
        scale = max_side / longest
        size = (
            max(1, min(max_side, round(width * scale))),
            max(1, min(max_side, round(height * scale))),
        )
        picture = picture.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    out = io.BytesIO()
    if _webp_supported():
        picture.save(out, format="WEBP", quality=quality, method=0)
        return out.getvalue(), "image/webp"
    picture.save(out, format="JPEG", quality=quality)
    return out.getvalue(), "image/jpeg"


def _as_rgb(image: Image.Image) -> Image.Image:
    # Previews drop alpha and palettes: JPEG cannot carry them and a preview gains nothing.
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (0, 0, 0))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


class PreviewThrottle:
    """Lets at most one preview through per ``interval_seconds``, the first one always.

    One per job. ``clock`` is any monotonic clock in seconds (tests pass a fake one).
    """

    def __init__(
        self, interval_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if interval_seconds < 0:
            raise ValueError(f"interval_seconds must not be negative, got {interval_seconds}")
        self._interval = interval_seconds
        self._clock = clock
        self._last_sent: float | None = None

    def ready(self) -> bool:
        """Whether a preview would go now, without taking the slot (so a backend can
        skip decoding and encoding a frame that would be dropped)."""
        return self._last_sent is None or self._clock() - self._last_sent >= self._interval

    def should_send(self) -> bool:
        """Whether a preview may go now; answering yes starts the next interval."""
        now = self._clock()
        if self._last_sent is not None and now - self._last_sent < self._interval:
            return False
        self._last_sent = now
        return True
