"""Object keys: where an image lives in the store, and which keys a store will serve.

An image's key is ``<prefix>/<yyyy>/<mm>/<dd>/<job_id>/<n>.png``. It depends only on the
job (id, creation date) and the output index, so a redelivered job writes the same keys
again. Every key a store reads or links to goes through :func:`check_key` first, so a
caller-supplied key can never reach outside the store's prefix.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime

from storage.exceptions import InvalidKey

MAX_INDEX = 1000
"""Images per job are numbered ``0 .. MAX_INDEX - 1``; no workflow makes more."""

_PATH = re.compile(r"[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")


def normalize_prefix(prefix: str) -> str:
    """Return ``prefix`` without surrounding slashes, or raise ``InvalidKey``.

    The empty prefix (or one made only of slashes) is allowed and means "no prefix".
    """
    stripped = prefix.strip("/")
    if stripped == "":
        return ""
    _check_path(stripped, what="prefix")
    return stripped


def image_key(prefix: str, job_id: str, index: int, created: datetime) -> str:
    """Build the key of output ``index`` of job ``job_id``, created at ``created``.

    The date parts are those of ``created`` in UTC; a naive datetime is taken to be UTC
    already. ``job_id`` must be a UUID in its canonical lowercase form and ``index`` an
    int in ``0 .. 999``; anything else raises ``InvalidKey``.
    """
    root = normalize_prefix(prefix)
    _check_job_id(job_id)
    if isinstance(index, bool) or not isinstance(index, int):
        raise InvalidKey(f"image index must be an int, not {type(index).__name__}")
    if not 0 <= index < MAX_INDEX:
        raise InvalidKey(f"image index must be in 0..{MAX_INDEX - 1}, got {index}")
    day = created.replace(tzinfo=UTC) if created.tzinfo is None else created.astimezone(UTC)
    tail = f"{day:%Y/%m/%d}/{job_id}/{index}.png"
    return f"{root}/{tail}" if root else tail


def check_key(prefix: str, key: str) -> str:
    """Return ``key`` when it is a plain relative path under ``prefix``; else raise.

    Refused with ``InvalidKey``: empty keys, absolute paths, backslashes, NUL, ``.`` or
    ``..`` segments, characters outside ``[A-Za-z0-9._-/]``, and (when the prefix is not
    empty) keys that do not start with ``prefix + "/"``.
    """
    root = normalize_prefix(prefix)
    if not isinstance(key, str) or key == "":
        raise InvalidKey("key must be a non-empty string")
    if "\x00" in key:
        raise InvalidKey("key must not contain NUL")
    if "\\" in key:
        raise InvalidKey(f"key must not contain a backslash: {key!r}")
    if key.startswith("/"):
        raise InvalidKey(f"key must be relative, not absolute: {key!r}")
    _check_path(key, what="key")
    if root and not key.startswith(root + "/"):
        raise InvalidKey(f"key {key!r} is outside the store's prefix {root!r}")
    return key


def _check_path(path: str, *, what: str) -> None:
    """Refuse anything but ``seg/seg/...`` of safe characters, with no dot segments."""
    if any(segment in {".", ".."} for segment in path.split("/")):
        raise InvalidKey(f"{what} must not contain '.' or '..' segments: {path!r}")
    if _PATH.fullmatch(path) is None:
        raise InvalidKey(
            f"{what} must be segments of [A-Za-z0-9._-] separated by single slashes: {path!r}"
        )


def _check_job_id(job_id: str) -> None:
    """Accept only the canonical form, so one job can never map to two key spellings."""
    try:
        parsed = uuid.UUID(job_id)
    except (TypeError, ValueError, AttributeError) as exc:
        raise InvalidKey(f"job id must be a UUID, got {job_id!r}") from exc
    if str(parsed) != job_id:
        raise InvalidKey(
            f"job id must be a lowercase, hyphenated UUID like {str(parsed)!r}, got {job_id!r}"
        )
