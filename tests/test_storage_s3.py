"""The S3 store against a real S3 server (SeaweedFS, started by tests/fixtures/s3server.py)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from io import BytesIO
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import aioboto3
import aiohttp
import pytest
from aiohttp import web
from botocore.exceptions import ClientError
from PIL import Image
from pydantic import SecretStr

from storage import ObjectStore, S3Settings, S3Store, create_store
from storage.base import ImageMeta
from storage.exceptions import InvalidKey, ObjectNotFound, StorageError, StorageUnavailable
from storage.png import read_text
from storage.settings import LocalStoreSettings
from tests.fixtures.s3server import S3StoreFactory

if TYPE_CHECKING:
    from types_aiobotocore_s3.client import S3Client

pytestmark = pytest.mark.s3

CAT = "一只猫 🐱"
WHEN = datetime(2024, 7, 5, 12, 0, tzinfo=UTC)
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=10)


def make_png(width: int = 32, height: int = 24) -> bytes:
    out = BytesIO()
    Image.new("RGB", (width, height), (10, 120, 240)).save(out, format="PNG")
    return out.getvalue()


def meta(prompt: str = CAT, index: int = 0, job_id: str | None = None) -> ImageMeta:
    return ImageMeta(
        job_id=job_id or str(uuid.uuid4()),
        index=index,
        prompt=prompt,
        seed=42,
        workflow="sdxl-base",
        negative="blurry",
        created_at=WHEN,
    )


@asynccontextmanager
async def raw_client(settings: S3Settings, secret: str | None = None) -> AsyncIterator[S3Client]:
    """A plain aioboto3 client, to look at the bucket behind the store's back."""
    assert settings.access_key_id is not None
    assert settings.secret_access_key is not None
    async with aioboto3.Session().client(
        "s3",
        endpoint_url=settings.endpoint_url,
        region_name=settings.region,
        aws_access_key_id=settings.access_key_id.get_secret_value(),
        aws_secret_access_key=secret or settings.secret_access_key.get_secret_value(),
    ) as client:
        yield client


async def http_get(url: str) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session,
        session.get(url) as response,
    ):
        return response.status, await response.read()


async def test_put_gives_a_presigned_url_that_downloads_the_png(s3_store: S3Store) -> None:
    job = str(uuid.uuid4())
    stored = await s3_store.put_image(make_png(32, 24), meta(job_id=job, index=1))
    assert stored.key.endswith(f"/2024/07/05/{job}/1.png")
    assert (stored.width, stored.height) == (32, 24)
    assert "X-Amz-Signature=" in stored.url

    status, body = await http_get(stored.url)
    assert status == 200
    assert len(body) == stored.size
    with Image.open(BytesIO(body)) as image:
        image.load()
        assert image.size == (32, 24)
        assert image.text["prompt"] == CAT  # type: ignore[attr-defined]
    assert read_text(body)["job_id"] == job
    assert await s3_store.get(stored.key) == body


async def test_object_metadata_and_headers_are_set(
    s3_store: S3Store, s3_settings: S3Settings
) -> None:
    stored = await s3_store.put_image(make_png(), meta("a cat, " * 1000))
    async with raw_client(s3_settings) as client:
        head = await client.head_object(Bucket=s3_settings.bucket, Key=stored.key)
    assert head["ContentType"] == "image/png"
    assert head["CacheControl"] == "public, max-age=31536000, immutable"
    assert head["ContentLength"] == stored.size
    metadata = head["Metadata"]
    assert unquote(metadata["workflow"]) == "sdxl-base"
    assert metadata["seed"] == "42"
    assert metadata["index"] == "0"
    assert ("a cat, " * 1000).startswith(unquote(metadata["prompt"]))
    assert len(metadata["prompt"]) > 100


async def test_presigned_url_stops_working_after_it_expires(
    s3_store_factory: S3StoreFactory,
) -> None:
    # Two seconds, not one: X-Amz-Date has whole seconds, so a one-second URL may
    # already be stale by the first request.
    store = await s3_store_factory(presign_seconds=2)
    stored = await store.put_image(make_png(), meta())
    status, _ = await http_get(stored.url)
    assert status == 200
    await asyncio.sleep(3.5)
    status, body = await http_get(stored.url)
    assert status == 403, body[:300]


async def test_tampered_presigned_url_is_refused(s3_store: S3Store) -> None:
    stored = await s3_store.put_image(make_png(), meta())
    other = stored.url.replace("/0.png?", "/1.png?")
    status, _ = await http_get(other)
    assert status == 403


async def test_public_base_url_gives_base_slash_key(s3_store_factory: S3StoreFactory) -> None:
    store = await s3_store_factory(public_base_url="https://cdn.example.com/brigade/")
    stored = await store.put_image(make_png(), meta())
    assert stored.url == f"https://cdn.example.com/brigade/{stored.key}"
    assert await store.url_for(stored.key) == stored.url


async def test_same_job_and_index_overwrites(s3_store: S3Store) -> None:
    job = str(uuid.uuid4())
    first = await s3_store.put_image(make_png(), meta("first", job_id=job))
    second = await s3_store.put_image(make_png(), meta("second", job_id=job))
    assert first.key == second.key
    assert read_text(await s3_store.get(first.key))["prompt"] == "second"


async def test_wrong_secret_is_refused_by_the_server(
    s3_settings: S3Settings, s3_store_factory: S3StoreFactory
) -> None:
    wrong = "wrong-" + uuid.uuid4().hex
    with pytest.raises(StorageError) as caught:
        await s3_store_factory(secret_access_key=SecretStr(wrong))
    assert not isinstance(caught.value, StorageUnavailable)
    assert s3_settings.bucket in str(caught.value)
    assert wrong not in str(caught.value)
    assert s3_settings.secret_access_key is not None
    assert s3_settings.secret_access_key.get_secret_value() not in str(caught.value)

    # And a write signed with the wrong secret does not land.
    key = f"unsigned/{uuid.uuid4()}.png"
    async with raw_client(s3_settings, secret=wrong) as client:
        with pytest.raises(ClientError, match=r"SignatureDoesNotMatch|AccessDenied"):
            await client.put_object(Bucket=s3_settings.bucket, Key=key, Body=b"x")
    async with raw_client(s3_settings) as client:
        listed = await client.list_objects_v2(Bucket=s3_settings.bucket, Prefix=key)
    assert listed.get("KeyCount", 0) == 0


async def test_start_on_a_missing_bucket_raises(s3_store_factory: S3StoreFactory) -> None:
    with pytest.raises(StorageError, match="missing-"):
        await s3_store_factory(bucket=f"missing-{uuid.uuid4().hex[:12]}")


async def test_check_raises_once_the_bucket_is_gone(
    s3_settings: S3Settings, s3_store_factory: S3StoreFactory
) -> None:
    bucket = f"doomed-{uuid.uuid4().hex[:12]}"
    async with raw_client(s3_settings) as client:
        await client.create_bucket(Bucket=bucket)
        store = await s3_store_factory(bucket=bucket)
        await store.check()
        await client.delete_bucket(Bucket=bucket)
    with pytest.raises(StorageError, match=bucket) as caught:
        await store.check()
    assert not isinstance(caught.value, StorageUnavailable)


async def test_create_bucket_makes_a_missing_bucket(
    s3_settings: S3Settings, s3_store_factory: S3StoreFactory
) -> None:
    bucket = f"fresh-{uuid.uuid4().hex[:12]}"
    store = await s3_store_factory(bucket=bucket, create_bucket=True)
    stored = await store.put_image(make_png(), meta())
    assert (await http_get(stored.url))[0] == 200
    again = await s3_store_factory(bucket=bucket, create_bucket=True)
    await again.check()
    async with raw_client(s3_settings) as client:
        await client.delete_object(Bucket=bucket, Key=stored.key)
        await client.delete_bucket(Bucket=bucket)


async def test_unreachable_endpoint_is_transient(s3_settings: S3Settings) -> None:
    # A port nothing listens on: the connection is refused at once.
    closed = s3_settings.model_copy(
        update={"endpoint_url": "http://127.0.0.1:9", "max_attempts": 1, "timeout_seconds": 2}
    )
    store = S3Store(closed)
    with pytest.raises(StorageUnavailable, match=r"127\.0\.0\.1:9"):
        await store.start()
    await store.close()


async def test_get_of_a_missing_key_raises_not_found(s3_store: S3Store) -> None:
    prefix = (await s3_store.put_image(make_png(), meta())).key.split("/")[0]
    with pytest.raises(ObjectNotFound):
        await s3_store.get(f"{prefix}/2024/01/01/{uuid.uuid4()}/0.png")


async def test_keys_outside_the_prefix_are_refused(s3_store: S3Store) -> None:
    with pytest.raises(InvalidKey):
        await s3_store.url_for("someone-else/2024/01/01/x/0.png")
    with pytest.raises(InvalidKey):
        await s3_store.get("../etc/passwd")


async def test_repr_and_settings_hide_the_secret(s3_settings: S3Settings) -> None:
    assert s3_settings.secret_access_key is not None
    secret = s3_settings.secret_access_key.get_secret_value()
    assert secret not in repr(s3_settings)
    assert secret not in repr(S3Store(s3_settings))


async def test_create_store_with_s3_settings_is_s3(s3_settings: S3Settings) -> None:
    store = create_store(s3_settings, LocalStoreSettings(_env_file=None))
    assert isinstance(store, S3Store)
    assert isinstance(store, ObjectStore)
    await store.start()
    await store.close()
    await store.close()


def offline_settings(endpoint: str, **fields: Any) -> S3Settings:
    """Settings for a stand-in server: one attempt, so errors surface at once."""
    return S3Settings(
        _env_file=None,
        endpoint_url=endpoint,
        access_key_id=SecretStr("stand-in"),
        secret_access_key=SecretStr("stand-in-secret"),
        public_base_url=None,
        max_attempts=1,
        **fields,
    )


@asynccontextmanager
async def fake_s3(status: int, code: str) -> AsyncIterator[str]:
    """An HTTP server that answers HEAD with 200 and everything else with an S3 error."""

    async def answer(request: web.Request) -> web.Response:
        if request.method == "HEAD":
            return web.Response(status=200)
        body = f"<Error><Code>{code}</Code><Message>said no</Message></Error>"
        return web.Response(status=status, text=body, content_type="application/xml")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("status", "code", "transient"),
    [
        (503, "SlowDown", True),
        (500, "InternalError", True),
        (503, "ServiceUnavailable", True),
        (403, "AccessDenied", False),
        (403, "InvalidAccessKeyId", False),
        (404, "NoSuchBucket", False),
    ],
)
async def test_error_answers_are_classified(status: int, code: str, transient: bool) -> None:
    async with fake_s3(status, code) as endpoint:
        store = S3Store(offline_settings(endpoint))
        await store.start()
        try:
            with pytest.raises(StorageError, match=code) as caught:
                await store.put_image(make_png(), meta())
        finally:
            await store.close()
    assert isinstance(caught.value, StorageUnavailable) is transient
    assert endpoint in str(caught.value)


async def test_a_server_that_never_answers_is_a_transient_timeout() -> None:
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up and closes
        writer.close()

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = S3Store(offline_settings(f"http://127.0.0.1:{port}", timeout_seconds=0.5))
    try:
        with pytest.raises(StorageUnavailable, match="Timeout"):
            await store.start()
    finally:
        await store.close()
        server.close()
        await server.wait_closed()


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S3_ENDPOINT_URL", "")
    monkeypatch.setenv("S3_PUBLIC_BASE_URL", "")
    monkeypatch.setenv("S3_SECRET_ACCESS_KEY", "s3cr3t-value")
    monkeypatch.setenv("S3_PRESIGN_SECONDS", "60")
    settings = S3Settings(_env_file=None)
    assert settings.endpoint_url is None
    assert settings.public_base_url is None
    assert settings.presign_seconds == 60
    assert "s3cr3t-value" not in repr(settings)
    assert "s3cr3t-value" not in repr(S3Store(settings))
    monkeypatch.setenv("S3_PRESIGN_SECONDS", str(7 * 24 * 3600 + 1))
    with pytest.raises(ValueError, match="presign_seconds"):
        S3Settings(_env_file=None)
