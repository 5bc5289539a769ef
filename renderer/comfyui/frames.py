"""ComfyUI's binary WebSocket frames: preview images, with or without metadata.

Every binary frame starts with a 4-byte big-endian event type. Two carry previews:

* type 1 (``PREVIEW_IMAGE``), what a plain client gets: a 4-byte big-endian image format
  (1 = JPEG, 2 = PNG), then the image. It names no prompt: the client attributes it to
  the prompt executing at the time.
* type 4 (``PREVIEW_IMAGE_WITH_METADATA``), what a client gets after it sent
  ``{"type": "feature_flags", "data": {"supports_preview_metadata": true}}``: a 4-byte
  big-endian length, that many bytes of JSON (``node_id``, ``prompt_id``,
  ``display_node_id``, ``parent_node_id``, ``real_node_id``, ``image_type``), then the image.

Other types (2, raw pixels; 3, text) are not previews this client uses: :func:`parse_binary_frame`
returns ``None`` for them.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum

_HEADER = struct.Struct(">I")
_FORMATS = {1: "image/jpeg", 2: "image/png"}


class BinaryEventType(IntEnum):
    PREVIEW_IMAGE = 1
    UNENCODED_PREVIEW_IMAGE = 2
    TEXT = 3
    PREVIEW_IMAGE_WITH_METADATA = 4


class FrameError(ValueError):
    """A binary frame that claims to be a preview but cannot be one (truncated, bad JSON)."""


@dataclass(frozen=True, slots=True)
class PreviewFrame:
    """One preview image as ComfyUI sent it (full size, usually 512 px)."""

    image: bytes
    mime: str
    event_type: BinaryEventType
    #: Only type-4 frames name their prompt and node.
    prompt_id: str | None = None
    node_id: str | None = None


def parse_binary_frame(data: bytes) -> PreviewFrame | None:
    """The preview in ``data``, or ``None`` when the frame is not a preview.

    Raises :class:`FrameError` for a preview frame that is truncated or malformed.
    """
    if len(data) < _HEADER.size:
        raise FrameError(f"binary frame of {len(data)} bytes has no event type")
    (event_type,) = _HEADER.unpack_from(data, 0)
    if event_type == BinaryEventType.PREVIEW_IMAGE:
        return _legacy_preview(data)
    if event_type == BinaryEventType.PREVIEW_IMAGE_WITH_METADATA:
        return _metadata_preview(data)
    return None


def _legacy_preview(data: bytes) -> PreviewFrame:
    if len(data) < 2 * _HEADER.size:
        raise FrameError("type-1 preview frame has no image format")
    (image_format,) = _HEADER.unpack_from(data, _HEADER.size)
    mime = _FORMATS.get(image_format)
    if mime is None:
        raise FrameError(f"type-1 preview frame has unknown image format {image_format}")
    image = data[2 * _HEADER.size :]
    if not image:
        raise FrameError("type-1 preview frame has no image")
    return PreviewFrame(image=image, mime=mime, event_type=BinaryEventType.PREVIEW_IMAGE)


def _metadata_preview(data: bytes) -> PreviewFrame:
    if len(data) < 2 * _HEADER.size:
        raise FrameError("type-4 preview frame has no metadata length")
    (length,) = _HEADER.unpack_from(data, _HEADER.size)
    start = 2 * _HEADER.size
    if len(data) < start + length:
        raise FrameError(f"type-4 preview frame is shorter than its {length}-byte metadata")
    try:
        metadata = json.loads(data[start : start + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(f"type-4 preview frame metadata is not JSON: {exc}") from exc
    if not isinstance(metadata, dict):
        raise FrameError("type-4 preview frame metadata is not a JSON object")
    image = data[start + length :]
    if not image:
        raise FrameError("type-4 preview frame has no image")
    mime = metadata.get("image_type")
    return PreviewFrame(
        image=image,
        mime=mime if isinstance(mime, str) and mime.startswith("image/") else "image/jpeg",
        event_type=BinaryEventType.PREVIEW_IMAGE_WITH_METADATA,
        prompt_id=_text(metadata.get("prompt_id")),
        node_id=_text(metadata.get("display_node_id") or metadata.get("node_id")),
    )


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
