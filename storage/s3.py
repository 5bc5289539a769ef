"""The S3 store: images in one bucket, reached through aioboto3.

This is the only module that imports ``aioboto3`` or ``botocore``. One client is opened
by :meth:`S3Store.start` and kept until :meth:`S3Store.close`. Every request has
botocore's connect and read timeouts, botocore's standard retries (``max_attempts``),
and an overall deadline around them. Errors leave as ours: network failures, timeouts,
5xx and throttling as :class:`StorageUnavailable` (retry later), anything else (denied,
missing bucket, bad signature) as :class:`StorageError`. Messages name the bucket and the
endpoint, never a credential.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aioboto3
import aiohttp
import structlog
from aiobotocore.config import AioConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    SSLError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from pydantic import SecretStr

from storage.base import ImageMeta, StoredImage
from storage.exceptions import ObjectNotFound, StorageError, StorageUnavailable
from storage.inputs import CONTENT_TYPES, check_input_key, input_key
from storage.keys import check_key, image_key, normalize_prefix
from storage.png import embed_text, meta_chunks, object_metadata, png_size
from storage.settings import S3Settings

if TYPE_CHECKING:
    from types_aiobotocore_s3.client import S3Client

log = structlog.get_logger(__name__)

CACHE_CONTROL = "public, max-age=31536000, immutable"
"""A key names one job's output forever (a rerun writes the same bytes), so caches may keep it."""

_MAX_BACKOFF_SECONDS = 20.0
"""botocore's standard retry mode waits at most this long between two attempts."""

_TRANSIENT = (
    BotoConnectionError,  # refused, DNS, connect timeout
    HTTPClientError,  # read timeout, connection closed mid-response
    IncompleteReadError,
    aiohttp.ClientError,  # raised while streaming a body, outside botocore's mapping
    TimeoutError,  # our overall deadline
    OSError,
)
_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "RequestTimeout",
        "RequestTimeoutException",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "RequestLimitExceeded",
    }
)
_MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_MISSING_BUCKET_CODES = frozenset({"NoSuchBucket", "404", "NotFound"})


class S3Store:
    """An :class:`~storage.base.ObjectStore` on an S3 bucket (AWS, MinIO, SeaweedFS...)."""

    def __init__(self, settings: S3Settings) -> None:
        self._settings = settings
        self._prefix = normalize_prefix(settings.prefix)
        self._where = f"bucket {settings.bucket!r} at {settings.endpoint_url or 'AWS S3'}"
        waits = settings.max_attempts - 1
        self._deadline = (
            settings.timeout_seconds * settings.max_attempts + _MAX_BACKOFF_SECONDS * waits
        )
        self._stack: AsyncExitStack | None = None
        self._client: S3Client | None = None
        self._log = log.bind(bucket=settings.bucket, endpoint=settings.endpoint_url)

    def __repr__(self) -> str:
        return f"S3Store({self._where}, prefix={self._prefix!r})"

    async def start(self) -> None:
        """Open the client and check the bucket (creating it when ``create_bucket`` is set).

        Raises ``StorageUnavailable`` when the endpoint cannot be reached and
        ``StorageError`` when the bucket is missing or the credentials are refused; the
        client is closed again in both cases. Starting a started store does nothing.
        """
        if self._client is not None:
            return
        settings = self._settings
        config = AioConfig(
            signature_version="s3v4",
            s3={"addressing_style": settings.addressing_style},
            connect_timeout=settings.timeout_seconds,
            read_timeout=settings.timeout_seconds,
            retries={"max_attempts": settings.max_attempts, "mode": "standard"},
        )
        session = aioboto3.Session()
        self._stack = AsyncExitStack()
        try:
            self._client = await self._stack.enter_async_context(
                session.client(
                    "s3",
                    endpoint_url=settings.endpoint_url,
                    region_name=settings.region,
                    aws_access_key_id=_reveal(settings.access_key_id),
                    aws_secret_access_key=_reveal(settings.secret_access_key),
                    config=config,
                )
            )
            if settings.create_bucket:
                await self._ensure_bucket()
            else:
                await self.check()
        except BaseException:
            await self.close()
            raise
        self._log.info("storage.started", prefix=self._prefix)

    async def close(self) -> None:
        """Close the client. Safe to call twice, and on a store that never started."""
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()
            self._log.info("storage.closed")

    async def check(self) -> None:
        """Raise unless the bucket answers ``HeadBucket`` with our credentials.

        ``StorageUnavailable`` when the endpoint is unreachable or failing;
        ``StorageError`` when the bucket is missing or access is denied.
        """
        client = self._require_client()
        async with self._errors("HeadBucket"):
            await client.head_bucket(Bucket=self._settings.bucket)

    async def put_image(self, png: bytes, meta: ImageMeta) -> StoredImage:
        """Upload ``png`` under its stable key, with ``meta`` in its text chunks and metadata.

        The key's date is ``meta.created_at`` (now, when unset: pass the job's creation
        time so that a redelivery on another day writes the same key). Uploading the same
        job and index again overwrites the object.
        """
        client = self._require_client()
        created = meta.created_at or datetime.now(UTC)
        key = image_key(self._prefix, meta.job_id, meta.index, created)
        try:
            body = await asyncio.to_thread(embed_text, png, meta_chunks(meta))
        except ValueError as exc:
            raise StorageError(f"image {meta.index} of job {meta.job_id}: {exc}") from exc
        width, height = png_size(body)
        started = time.perf_counter()
        try:
            async with self._errors("PutObject", key):
                await client.put_object(
                    Bucket=self._settings.bucket,
                    Key=key,
                    Body=body,
                    ContentType="image/png",
                    CacheControl=CACHE_CONTROL,
                    Metadata=object_metadata(meta),
                )
        except StorageError as exc:
            self._log.warning(
                "storage.put_failed",
                key=key,
                error=str(exc),
                transient=isinstance(exc, StorageUnavailable),
                seconds=round(time.perf_counter() - started, 3),
            )
            raise
        self._log.info(
            "storage.put", key=key, bytes=len(body), seconds=round(time.perf_counter() - started, 3)
        )
        url = await self.url_for(key)
        return StoredImage(key=key, url=url, size=len(body), width=width, height=height)

    async def url_for(self, key: str) -> str:
        """``{public_base_url}/{key}`` when configured, else a presigned GET URL.

        Presigned URLs live ``presign_seconds``. Keys outside the prefix raise ``InvalidKey``.
        """
        check_key(self._prefix, key)
        if self._settings.public_base_url:
            return f"{self._settings.public_base_url.rstrip('/')}/{key}"
        client = self._require_client()
        async with self._errors("presign GetObject", key):
            return await client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self._settings.bucket, "Key": key},
                ExpiresIn=self._settings.presign_seconds,
            )

    async def get(self, key: str) -> bytes:
        """Download the object under ``key``; ``ObjectNotFound`` when there is none."""
        check_key(self._prefix, key)
        client = self._require_client()
        async with self._errors("GetObject", key):
            response = await client.get_object(Bucket=self._settings.bucket, Key=key)
            async with response["Body"] as stream:
                return await stream.read()

    async def put_input(self, data: bytes) -> str:
        """Upload an accepted input image under its content address; return the key."""
        client = self._require_client()
        key = input_key(self._prefix, data)
        started = time.perf_counter()
        async with self._errors("PutObject", key):
            await client.put_object(
                Bucket=self._settings.bucket,
                Key=key,
                Body=data,
                ContentType=CONTENT_TYPES[key.rsplit(".", 1)[1]],
                CacheControl=CACHE_CONTROL,
            )
        self._log.info(
            "storage.put", key=key, bytes=len(data), seconds=round(time.perf_counter() - started, 3)
        )
        return key

    async def get_input(self, key: str) -> bytes:
        """Download an input image; ``InvalidKey`` for anything but an input key of ours."""
        check_input_key(self._prefix, key)
        return await self.get(key)

    async def _ensure_bucket(self) -> None:
        """Create the bucket when ``HeadBucket`` says it is missing (development only)."""
        client = self._require_client()
        bucket = self._settings.bucket
        async with self._errors("HeadBucket"):
            try:
                await client.head_bucket(Bucket=bucket)
            except ClientError as exc:
                if _code(exc) not in _MISSING_BUCKET_CODES:
                    raise
            else:
                return
        extra: dict[str, Any] = {}
        if self._settings.region != "us-east-1":
            # us-east-1 is the default location, and S3 refuses it when spelled out.
            extra["CreateBucketConfiguration"] = {"LocationConstraint": self._settings.region}
        async with self._errors("CreateBucket"):
            try:
                await client.create_bucket(Bucket=bucket, **extra)
            except ClientError as exc:
                # Another process may have created it between our HEAD and our CREATE.
                if _code(exc) != "BucketAlreadyOwnedByYou":
                    raise
        self._log.info("storage.bucket_created")

    def _require_client(self) -> S3Client:
        if self._client is None:
            raise StorageError(f"S3Store for {self._where} is not started")
        return self._client

    @asynccontextmanager
    async def _errors(self, operation: str, key: str | None = None) -> AsyncIterator[None]:
        """Bound the block by the overall deadline and turn outside errors into ours."""
        what = f"S3 {operation}" + (f" of {key!r}" if key else "") + f" on {self._where}"
        try:
            async with asyncio.timeout(self._deadline):
                yield
        except ClientError as exc:
            raise _client_error(exc, what, about_object=key is not None) from exc
        except SSLError as exc:
            # A certificate problem does not heal by itself, unlike other connect errors.
            raise StorageError(f"{what} failed: TLS error: {exc}") from exc
        except _TRANSIENT as exc:
            raise StorageUnavailable(f"{what} failed: {type(exc).__name__}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"{what} failed: {type(exc).__name__}: {exc}") from exc


def _client_error(exc: ClientError, what: str, *, about_object: bool) -> StorageError:
    """Classify an error answer from S3 by its code and HTTP status.

    A bare 404 means a missing object when the request named one, else a missing bucket.
    """
    code = _code(exc)
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    message = exc.response.get("Error", {}).get("Message", "")
    text = f"{what} failed: {code} (HTTP {status})" + (f": {message}" if message else "")
    if status >= 500 or status in {408, 429} or code in _TRANSIENT_CODES:
        return StorageUnavailable(text)
    if about_object and code in _MISSING_KEY_CODES:
        return ObjectNotFound(text)
    if code in _MISSING_BUCKET_CODES:
        return StorageError(f"{text}; the bucket does not exist (S3_CREATE_BUCKET creates it)")
    if code in {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
        return StorageError(f"{text}; check S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY")
    return StorageError(text)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "Unknown"))


def _reveal(secret: SecretStr | None) -> str | None:
    """The plain value of an optional ``SecretStr``, only to hand it to botocore."""
    return None if secret is None else secret.get_secret_value()
