"""Input images: what a user may hand in, and where it is kept until a renderer reads it.

:func:`check_image` is the one judge of an uploaded file, shared by every frontend (the
bot's attachments, the API's uploads): at most ``max_bytes``, a PNG, JPEG or WebP that
Pillow identifies from its own header (never from a file name or a declared type),
at most ``max_pixels`` by its header before any pixel is decoded (the decompression-bomb
guard), not animated, and that verifies and decodes in full. Its :class:`InvalidImage`
says what was wrong and what is allowed, in words a user can act on.

Accepted bytes are stored unchanged and content-addressed:
``<prefix>/inputs/<sha256 hex>.<png|jpg|webp>`` (:func:`input_key`), so the same file
stored twice is one object and a redelivered job reads the same bytes. A store reads
back only keys of exactly that shape under its own prefix (:func:`check_input_key`).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import TypeVar

from PIL import Image, UnidentifiedImageError

from storage.exceptions import InvalidKey
from storage.keys import normalize_prefix

FORMATS = {
    "PNG": ("png", "image/png"),
    "JPEG": ("jpg", "image/jpeg"),
    "WEBP": ("webp", "image/webp"),
}
"""Pillow format name → (file extension in keys, content type)."""

CONTENT_TYPES = dict(FORMATS.values())

ALLOWED = "PNG, JPEG or WebP"

_T = TypeVar("_T")

_NAME = re.compile(r"inputs/([0-9a-f]{64})\.(png|jpg|webp)")


class InvalidImage(ValueError):
    """An uploaded file is not an image we accept; the message says why and what is allowed."""


@dataclass(frozen=True, slots=True)
class InputImage:
    """An accepted upload: its bytes as given, and what its header says."""

    data: bytes
    extension: str
    content_type: str
    width: int
    height: int


def check_image(data: bytes, *, max_bytes: int, max_pixels: int) -> InputImage:
    """Accept ``data`` as an input image, or raise :class:`InvalidImage` saying why.

    CPU-bound (it decodes the image): call it through :func:`validate_image` from async
    code.
    """
    problem = size_problem(len(data), max_bytes)
    if problem is not None:
        raise InvalidImage(problem)
    if not data:
        raise InvalidImage(f"the file is empty; send a {ALLOWED} image")
    kind, width, height, animated = _pillow(_header, data, max_pixels)
    if kind not in FORMATS:  # ``formats=`` already limits what opens; belt and braces
        raise InvalidImage(f"the file is not a {ALLOWED} image")
    if width * height > max_pixels:
        raise InvalidImage(
            f"the image is {width}×{height} ({width * height:,} pixels);"
            f" at most {max_pixels:,} pixels (width × height) are accepted"
        )
    if animated:
        raise InvalidImage(f"animated images are not accepted; send a still {ALLOWED}")
    _pillow(_decode, data, max_pixels)
    extension, content_type = FORMATS[kind]
    return InputImage(data, extension, content_type, width, height)


def size_problem(size: int, max_bytes: int) -> str | None:
    """What is wrong with a file of ``size`` bytes, or None: for checking a declared size
    (a Discord attachment's) before downloading anything."""
    if size <= max_bytes:
        return None
    return (
        f"the file is {_size(size)}; images of at most {_size(max_bytes)}"
        f" ({max_bytes:,} bytes) are accepted"
    )


async def validate_image(data: bytes, *, max_bytes: int, max_pixels: int) -> InputImage:
    """:func:`check_image` in a thread, so decoding never blocks the event loop."""
    if len(data) > max_bytes:  # cheap, and spares a thread for the common refusal
        return check_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
    return await asyncio.to_thread(check_image, data, max_bytes=max_bytes, max_pixels=max_pixels)


def sniff_extension(data: bytes) -> str:
    """The key extension of ``data`` by its magic bytes; ``InvalidKey`` for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise InvalidKey(f"only {ALLOWED} images are stored as inputs")


def input_key(prefix: str, data: bytes) -> str:
    """``<prefix>/inputs/<sha256 of data>.<extension>``: the content address of ``data``."""
    root = normalize_prefix(prefix)
    name = f"inputs/{hashlib.sha256(data).hexdigest()}.{sniff_extension(data)}"
    return f"{root}/{name}" if root else name


def check_input_key(prefix: str, key: object) -> str:
    """Return ``key`` when it is exactly an input key under ``prefix``; else ``InvalidKey``."""
    root = normalize_prefix(prefix)
    if not isinstance(key, str):
        raise InvalidKey("an input image key must be a string")
    name = key[len(root) + 1 :] if root and key.startswith(root + "/") else key
    if (root and name == key) or _NAME.fullmatch(name) is None:
        raise InvalidKey(
            f"{key[:120]!r} is not an input image key of this store"
            f" ({root + '/' if root else ''}inputs/<sha256>.png|jpg|webp)"
        )
    return key


def _header(data: bytes) -> tuple[str, int, int, bool]:
    """Format, size and animation from the header alone: no pixel is decoded here."""
    with Image.open(BytesIO(data), formats=list(FORMATS)) as image:
        width, height = image.size
        return image.format or "", width, height, bool(getattr(image, "is_animated", False))


def _decode(data: bytes) -> None:
    """Check the structure (``verify``), then decode every pixel."""
    with Image.open(BytesIO(data), formats=list(FORMATS)) as image:
        image.verify()
    with Image.open(BytesIO(data), formats=list(FORMATS)) as image:
        image.load()


def _pillow(work: Callable[[bytes], _T], data: bytes, max_pixels: int) -> _T:
    """Run Pillow ``work`` on ``data``, turning its many failures into :class:`InvalidImage`."""
    try:
        return work(data)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImage(
            f"the image has too many pixels;"
            f" at most {max_pixels:,} pixels (width × height) are accepted"
        ) from exc
    except UnidentifiedImageError as exc:
        raise InvalidImage(f"the file is not a {ALLOWED} image") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports truncated and corrupt data with any of these.
        raise InvalidImage(
            f"the image is damaged and cannot be read; send a {ALLOWED} image"
        ) from exc


def _size(count: int) -> str:
    if count >= 1024 * 1024:
        return f"{count / (1024 * 1024):.1f} MiB"
    if count >= 1024:
        return f"{count / 1024:.0f} KiB"
    return f"{count} bytes"
