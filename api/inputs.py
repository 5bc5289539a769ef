"""``POST /v1/inputs``: a tenant uploads an image a workflow's ``image`` parameter takes.

The body is the image itself (``Content-Type: image/png``, ``image/jpeg`` or
``image/webp``; the declared type is not trusted) or ``multipart/form-data`` with the
file in the field ``image``. It is read up to ``INPUT_IMAGE_MAX_BYTES`` and no further
(413 past it), judged by :func:`storage.inputs.check_image` (422 saying what is wrong and
what is allowed), stored content-addressed, and answered ``201`` with its ``key``: the
value to send for the parameter in ``POST /v1/jobs`` (``"params": {"image": key}``).

There is deliberately no "image URL" parameter: the API would fetch whatever a client
names, from inside our network (cloud metadata, internal services), at a size and speed
the client chooses. A client that has a URL downloads it and uploads the bytes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from api.auth import tenant
from api.context import ApiState, state
from api.http import json_response
from api.models import InputImageView
from api.problems import ApiProblem, bad_request, unavailable
from storage import InputImageSettings, InvalidImage, StorageError, validate_image
from storage.inputs import ALLOWED
from workflows import FieldError

routes = web.RouteTableDef()

#: Read the body in pieces this large, so no more than the limit (plus one piece) is held.
_CHUNK = 64 * 1024


def limits(api: ApiState) -> InputImageSettings:
    """The process's input limits, or the documented defaults when none were wired."""
    return api.services.input_limits or InputImageSettings.model_construct()


@routes.post("/v1/inputs")
async def upload(request: web.Request) -> web.Response:
    api = state(request)
    await tenant(request)
    store = api.services.store
    if store is None:
        raise unavailable("This API has no image store to keep uploads in.")
    limit = limits(api)
    data = await _read_image(request, limit.max_bytes)
    try:
        image = await validate_image(data, max_bytes=limit.max_bytes, max_pixels=limit.max_pixels)
    except InvalidImage as exc:
        raise ApiProblem(
            422,
            "invalid-image",
            "The image is not accepted",
            f"image: {exc}",
            errors=[FieldError("image", f"image: {exc}")],
        ) from exc
    try:
        key = await store.put_input(image.data)
    except StorageError as exc:
        raise unavailable(f"The image store did not take the image: {exc}") from exc
    view = InputImageView(
        key=key,
        content_type=image.content_type,
        width=image.width,
        height=image.height,
        bytes=len(image.data),
    )
    return json_response(view, 201)


async def _read_image(request: web.Request, max_bytes: int) -> bytes:
    """The uploaded file's bytes, never reading past ``max_bytes`` (413 when it is larger)."""
    if request.content_length is not None and request.content_length > max_bytes + _CHUNK:
        raise _too_large(max_bytes)
    if request.content_type == "multipart/form-data":
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if isinstance(part, BodyPartReader) and part.name == "image":
                    return await _read_capped(part.read_chunk, max_bytes)
                await part.release()
        except (ValueError, LookupError, HttpProcessingError) as exc:  # a malformed form
            raise bad_request("body", f"body: not a readable multipart form ({exc})") from exc
        raise bad_request("image", f"image: send the file in the form field 'image' ({ALLOWED})")
    if not request.content_type.startswith("image/"):
        raise ApiProblem(
            415,
            "unsupported-media-type",
            "Unsupported media type",
            f"Send the image as the body (Content-Type image/png, image/jpeg or image/webp)"
            f" or as multipart/form-data field 'image', not {request.content_type or 'no type'}.",
        )
    return await _read_capped(request.content.read, max_bytes)


async def _read_capped(read: Callable[[int], Awaitable[bytes]], max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await read(_CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(max_bytes: int) -> ApiProblem:
    return ApiProblem(
        413,
        "too-large",
        "The image is too large",
        f"image: images of at most {max_bytes:,} bytes are accepted",
        errors=[FieldError("image", f"image: at most {max_bytes:,} bytes are accepted")],
    )
