"""The object store: where finished images go, and the links users get to them.

Build one store per process with :func:`create_store` from the settings, ``start()``
it, and hand it to whoever stores images (the renderer) or serves them (the API).
"""

from __future__ import annotations

from storage.base import ImageMeta, ObjectStore, StoredImage
from storage.exceptions import InvalidKey, ObjectNotFound, StorageError, StorageUnavailable
from storage.inputs import InputImage, InvalidImage, check_image, validate_image
from storage.local import LocalStore
from storage.s3 import S3Store
from storage.settings import InputImageSettings, LocalStoreSettings, S3Settings

__all__ = [
    "ImageMeta",
    "InputImage",
    "InputImageSettings",
    "InvalidImage",
    "InvalidKey",
    "LocalStore",
    "LocalStoreSettings",
    "ObjectNotFound",
    "ObjectStore",
    "S3Settings",
    "S3Store",
    "StorageError",
    "StorageUnavailable",
    "StoredImage",
    "check_image",
    "create_store",
    "validate_image",
]


def create_store(s3: S3Settings | None, local: LocalStoreSettings) -> ObjectStore:
    """The S3 store when ``s3`` is given, else the local folder ``local.root``.

    The store is not started yet: the caller owns ``start()`` and ``close()``.
    """
    if s3 is not None:
        return S3Store(s3)
    return LocalStore(local.root, public_base_url=local.public_base_url)
