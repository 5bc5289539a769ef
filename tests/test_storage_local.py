"""The local-folder store: round trip, atomic writes, file URLs, refused keys."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest
from PIL import Image

from storage import LocalStore, LocalStoreSettings, ObjectStore, create_store
from storage.base import ImageMeta
from storage.exceptions import InvalidKey, ObjectNotFound, StorageError
from storage.png import read_text

JOB = "3f2b8c1e-9a4d-4e6f-8b7a-0c1d2e3f4a5b"
CAT = "一只猫 🐱"
WHEN = datetime(2024, 7, 5, 23, 59, tzinfo=UTC)


def make_png(width: int = 20, height: int = 10) -> bytes:
    out = BytesIO()
    Image.new("RGB", (width, height), (200, 30, 90)).save(out, format="PNG")
    return out.getvalue()


def meta(prompt: str = CAT, index: int = 0) -> ImageMeta:
    return ImageMeta(
        job_id=JOB, index=index, prompt=prompt, seed=7, workflow="demo", created_at=WHEN
    )


@pytest.fixture
async def store(tmp_path: Path) -> LocalStore:
    local = LocalStore(tmp_path / "images")
    await local.start()
    return local


async def test_put_then_get_round_trips_with_metadata(store: LocalStore) -> None:
    stored = await store.put_image(make_png(20, 10), meta())
    assert stored.key == f"2024/07/05/{JOB}/0.png"
    assert (stored.width, stored.height, stored.content_type) == (20, 10, "image/png")
    data = await store.get(stored.key)
    assert len(data) == stored.size
    assert read_text(data)["prompt"] == CAT
    with Image.open(BytesIO(data)) as image:
        assert image.getpixel((3, 3)) == (200, 30, 90)


async def test_is_an_object_store(store: LocalStore) -> None:
    assert isinstance(store, ObjectStore)


async def test_writes_leave_no_temporary_files(store: LocalStore) -> None:
    for index in range(3):
        await store.put_image(make_png(), meta(index=index))
    await store.put_image(make_png(), meta("again"))
    files = sorted(p.relative_to(store.root).as_posix() for p in store.root.rglob("*"))
    folder = f"2024/07/05/{JOB}"
    assert [f for f in files if f.endswith(".png") or "tmp" in f] == [
        f"{folder}/0.png",
        f"{folder}/1.png",
        f"{folder}/2.png",
    ]


async def test_failed_write_keeps_the_old_file_and_leaves_no_temp(
    store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await store.put_image(make_png(), meta("first"))

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StorageError, match="No space left"):
        await store.put_image(make_png(), meta("second"))
    monkeypatch.undo()
    assert read_text(await store.get(first.key))["prompt"] == "first"
    assert [p.name for p in (store.root / first.key).parent.iterdir()] == ["0.png"]


async def test_same_job_and_index_overwrites(store: LocalStore) -> None:
    first = await store.put_image(make_png(), meta("first"))
    second = await store.put_image(make_png(), meta("second"))
    assert first.key == second.key
    assert read_text(await store.get(second.key))["prompt"] == "second"


async def test_url_is_a_file_uri_to_the_image(store: LocalStore) -> None:
    stored = await store.put_image(make_png(), meta())
    url = urlparse(stored.url)
    assert url.scheme == "file"
    path = Path(url2pathname(url.path))
    assert path.is_absolute()
    assert await asyncio.to_thread(path.read_bytes) == await store.get(stored.key)


async def test_url_uses_the_public_base_when_set(tmp_path: Path) -> None:
    local = LocalStore(tmp_path, public_base_url="http://localhost:8080/images/")
    await local.start()
    stored = await local.put_image(make_png(), meta())
    assert stored.url == f"http://localhost:8080/images/{stored.key}"


@pytest.mark.parametrize(
    "key",
    ["../secret.png", "/etc/passwd", "2024/../../x.png", "2024\\x.png", "x\x00.png", ""],
)
async def test_get_and_url_refuse_keys_that_escape_the_root(store: LocalStore, key: str) -> None:
    (store.root.parent / "secret.png").write_bytes(b"not yours")
    with pytest.raises(InvalidKey):
        await store.get(key)
    with pytest.raises(InvalidKey):
        await store.url_for(key)


async def test_get_of_a_missing_key_raises_not_found(store: LocalStore) -> None:
    with pytest.raises(ObjectNotFound):
        await store.get(f"2024/07/05/{JOB}/9.png")


async def test_put_refuses_bytes_that_are_not_a_png(store: LocalStore) -> None:
    with pytest.raises(StorageError, match="signature"):
        await store.put_image(b"GIF89a not a png", meta())


async def test_check_refuses_a_missing_or_unwritable_root(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="writable"):
        await LocalStore(tmp_path / "nowhere").check()
    a_file = tmp_path / "file"
    a_file.write_bytes(b"")
    with pytest.raises(StorageError):
        await LocalStore(a_file).start()


async def test_create_store_without_s3_is_local_under_data_dir(tmp_path: Path) -> None:
    settings = LocalStoreSettings(_env_file=None, data_dir=tmp_path, public_base_url=None)
    store = create_store(None, settings)
    assert isinstance(store, LocalStore)
    assert store.root == tmp_path / "images"
    await store.start()
    await store.close()
    await store.close()
    assert (tmp_path / "images").is_dir()


def test_empty_variables_mean_unset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BRIGADE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("BRIGADE_PUBLIC_BASE_URL", "")
    settings = LocalStoreSettings(_env_file=None)
    assert settings.public_base_url is None
    assert settings.root == tmp_path / "images"
