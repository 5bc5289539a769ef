"""The object store interface every backend of ``storage/`` implements.

The renderer stores each output image through :meth:`ObjectStore.put_image`; frontends
only ever see the :class:`StoredImage` it returns (a key and a URL). Keys are built by
:func:`storage.keys.image_key` and can never leave the store's prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class ImageMeta:
    """What we know about an image; written into PNG text chunks and object metadata."""

    job_id: str
    index: int
    prompt: str
    seed: int | None
    workflow: str
    negative: str = ""
    created_at: datetime | None = None
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StoredImage:
    """An image that is in the store: where it is and how a user reaches it."""

    key: str
    url: str
    size: int
    width: int
    height: int
    content_type: str = "image/png"


@runtime_checkable
class ObjectStore(Protocol):
    """Where finished images go. Implementations: ``S3Store`` and ``LocalStore``."""

    async def start(self) -> None:
        """Open clients and make sure the bucket or folder is usable."""

    async def close(self) -> None:
        """Release clients. Safe to call twice."""

    async def check(self) -> None:
        """Raise ``StorageUnavailable`` when the store cannot be reached (for readiness)."""

    async def put_image(self, png: bytes, meta: ImageMeta) -> StoredImage:
        """Store one PNG under its stable key, with ``meta`` in its text chunks and metadata.

        Storing the same ``(job_id, index)`` twice overwrites: a redelivered job is
        idempotent. Raises ``StorageUnavailable`` (transient) or ``StorageError``.
        """

    async def url_for(self, key: str) -> str:
        """A URL a user can open: public/CDN base when configured, else presigned."""

    async def get(self, key: str) -> bytes:
        """Read an object back (tests, the API's local file serving)."""

    async def put_input(self, data: bytes) -> str:
        """Store an input image a frontend accepted (``storage.inputs.check_image``).

        Content-addressed: returns ``<prefix>/inputs/<sha256>.<png|jpg|webp>``; storing
        the same bytes again writes the same key. Raises ``InvalidKey`` for bytes that are
        not PNG, JPEG or WebP, ``StorageUnavailable`` (transient) or ``StorageError``.
        """

    async def get_input(self, key: str) -> bytes:
        """Read an input image back (the renderer, before it uploads it to its backend).

        Only keys :func:`storage.inputs.input_key` makes under this store's prefix are
        read; any other key raises ``InvalidKey``, a missing one ``ObjectNotFound``.
        """
