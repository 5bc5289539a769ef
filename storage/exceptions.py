"""Errors of the object store, split into transient and permanent.

Callers retry :class:`StorageUnavailable` (network down, timeouts, 5xx, throttling)
with bounded backoff, and fail the job at once on any other :class:`StorageError`
(wrong credentials, missing bucket, refused key): retrying would not help.
"""

from __future__ import annotations


class StorageError(Exception):
    """A store operation failed and retrying will not help (the base of all our errors)."""


class StorageUnavailable(StorageError):
    """The store could not be reached or answered with a server error; retry later."""


class InvalidKey(StorageError):
    """A key, prefix, job id or index is malformed or would leave the store's prefix."""


class ObjectNotFound(StorageError):
    """There is no object under the key that was asked for."""
