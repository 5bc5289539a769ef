"""The local store: images in a folder, for the embedded mode and for tests.

Keys are the same as in S3 without a prefix (``<yyyy>/<mm>/<dd>/<job_id>/<n>.png``),
relative to the store's root. Files are written to a temporary name in the target
folder and renamed over the final name, so a reader never sees half an image and a
crash leaves at worst a stray hidden ``.tmp`` file. The PNG's text chunks carry the
metadata; there is no sidecar file. All disk work runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import structlog

from storage.base import ImageMeta, StoredImage
from storage.exceptions import ObjectNotFound, StorageError
from storage.inputs import check_input_key, input_key
from storage.keys import check_key, image_key
from storage.png import embed_text, meta_chunks, png_size

log = structlog.get_logger(__name__)

_PREFIX = ""
"""The root folder itself plays the part of the bucket prefix."""


class LocalStore:
    """An :class:`~storage.base.ObjectStore` on a local folder."""

    def __init__(self, root: Path, public_base_url: str | None = None) -> None:
        self._root = Path(root)
        self._public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self._log = log.bind(root=str(self._root))

    def __repr__(self) -> str:
        return f"LocalStore({str(self._root)!r})"

    @property
    def root(self) -> Path:
        """The folder keys are relative to."""
        return self._root

    async def start(self) -> None:
        """Create the root folder when missing and check that it is writable."""
        try:
            await asyncio.to_thread(self._root.mkdir, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the image folder {self._root}: {exc}") from exc
        await self.check()
        self._log.info("storage.started")

    async def close(self) -> None:
        """Nothing to release; present for the interface."""

    async def check(self) -> None:
        """Raise ``StorageError`` unless the root is an existing, writable folder."""
        usable = await asyncio.to_thread(_writable_dir, self._root)
        if not usable:
            raise StorageError(f"the image folder {self._root} is not a writable directory")

    async def put_image(self, png: bytes, meta: ImageMeta) -> StoredImage:
        """Write ``png`` with ``meta`` in its text chunks under its stable key, atomically.

        Writing the same job and index again replaces the file.
        """
        created = meta.created_at or datetime.now(UTC)
        key = image_key(_PREFIX, meta.job_id, meta.index, created)
        started = time.perf_counter()
        try:
            body = await asyncio.to_thread(_stamp_and_write, self._root / key, png, meta)
        except ValueError as exc:
            raise StorageError(f"image {meta.index} of job {meta.job_id}: {exc}") from exc
        except OSError as exc:
            raise StorageError(f"cannot write {key} under {self._root}: {exc}") from exc
        width, height = png_size(body)
        self._log.info(
            "storage.put", key=key, bytes=len(body), seconds=round(time.perf_counter() - started, 3)
        )
        url = await self.url_for(key)
        return StoredImage(key=key, url=url, size=len(body), width=width, height=height)

    async def url_for(self, key: str) -> str:
        """``{public_base_url}/{key}`` when configured, else the file's ``file://`` URI."""
        check_key(_PREFIX, key)
        if self._public_base_url:
            return f"{self._public_base_url}/{key}"
        return (self._root / key).absolute().as_uri()

    async def get(self, key: str) -> bytes:
        """Read the file under ``key``; ``ObjectNotFound`` when there is none."""
        check_key(_PREFIX, key)
        path = self._root / key
        try:
            return await asyncio.to_thread(path.read_bytes)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise ObjectNotFound(f"no image {key} under {self._root}") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {key} under {self._root}: {exc}") from exc

    async def put_input(self, data: bytes) -> str:
        """Write an accepted input image under its content address, atomically; return the key."""
        key = input_key(_PREFIX, data)
        try:
            await asyncio.to_thread(_write, self._root / key, data)
        except OSError as exc:
            raise StorageError(f"cannot write {key} under {self._root}: {exc}") from exc
        self._log.info("storage.put", key=key, bytes=len(data))
        return key

    async def get_input(self, key: str) -> bytes:
        """Read an input image; ``InvalidKey`` for anything but an input key."""
        check_input_key(_PREFIX, key)
        return await self.get(key)


def _stamp_and_write(path: Path, png: bytes, meta: ImageMeta) -> bytes:
    """Embed ``meta`` into ``png`` and write it to ``path`` atomically; return the bytes."""
    body = embed_text(png, meta_chunks(meta))
    _write(path, body)
    return body


def _write(path: Path, body: bytes) -> None:
    """Write ``body`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(body)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def _writable_dir(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)
