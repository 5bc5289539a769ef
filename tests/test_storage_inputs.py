"""Input images: the shared upload check, and content-addressed storage in both stores."""

from __future__ import annotations

import hashlib
import struct
import uuid
import zlib
from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image

from storage import (
    InputImageSettings,
    InvalidImage,
    LocalStore,
    ObjectStore,
    S3Store,
    check_image,
    validate_image,
)
from storage.exceptions import InvalidKey, ObjectNotFound
from storage.inputs import check_input_key, input_key
from tests.fixtures.s3server import S3StoreFactory
from workflows.manifest import INPUT_IMAGE_KEY

LIMITS = {"max_bytes": 1024 * 1024, "max_pixels": 1024 * 1024}


def encode(fmt: str, size: tuple[int, int] = (40, 30), **save: object) -> bytes:
    out = BytesIO()
    Image.new("RGB", size, (20, 200, 90)).save(out, format=fmt, **save)
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` and whose data is a few bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("fmt", "extension", "content_type"),
    [("PNG", "png", "image/png"), ("JPEG", "jpg", "image/jpeg"), ("WEBP", "webp", "image/webp")],
)
def test_accepts_png_jpeg_webp(fmt: str, extension: str, content_type: str) -> None:
    data = encode(fmt)
    image = check_image(data, **LIMITS)
    assert (image.extension, image.content_type, image.width, image.height) == (
        extension,
        content_type,
        40,
        30,
    )
    assert image.data == data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "the file is empty"),
        (b"hello, this is text and not a picture", "not a PNG, JPEG or WebP image"),
        (encode("GIF"), "not a PNG, JPEG or WebP image"),
        (encode("BMP"), "not a PNG, JPEG or WebP image"),
        (encode("PNG")[:80], "damaged and cannot be read"),
        (encode("JPEG", (300, 300))[:400], "damaged and cannot be read"),
    ],
)
def test_refuses_what_is_not_an_accepted_image(data: bytes, message: str) -> None:
    with pytest.raises(InvalidImage) as caught:
        check_image(data, **LIMITS)
    assert message in str(caught.value)
    assert "PNG, JPEG or WebP" in str(caught.value)


def test_refuses_too_many_bytes_before_decoding() -> None:
    data = b"\x89PNG" + b"\x00" * (LIMITS["max_bytes"] + 1)
    with pytest.raises(
        InvalidImage, match=r"the file is 1\.0 MiB; images of at most 1\.0 MiB \(1,048,576 bytes\)"
    ):
        check_image(data, **LIMITS)


def test_refuses_too_many_pixels_from_the_header_alone() -> None:
    # 20000 x 20000 claimed in a ~100-byte file: decoding it would take 1.2 GB.
    bomb = png_header_only(20000, 20000)
    assert len(bomb) < 200
    with pytest.raises(InvalidImage) as caught:
        check_image(bomb, **LIMITS)
    assert "at most 1,048,576 pixels" in str(caught.value)
    with pytest.raises(InvalidImage, match=r"the image is 1025×1024"):
        check_image(encode("PNG", (1025, 1024)), **LIMITS)


def test_refuses_animation() -> None:
    out = BytesIO()
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(out, format="WEBP", save_all=True, append_images=frames[1:])
    with pytest.raises(InvalidImage, match="animated images are not accepted"):
        check_image(out.getvalue(), **LIMITS)


async def test_validate_image_runs_the_same_check() -> None:
    image = await validate_image(encode("WEBP"), **LIMITS)
    assert image.extension == "webp"
    with pytest.raises(InvalidImage, match=r"at most 1\.0 MiB"):
        await validate_image(b"x" * (2 * 1024 * 1024), **LIMITS)


def test_settings_have_sane_defaults() -> None:
    settings = InputImageSettings(_env_file=None)
    assert settings.max_bytes == 10 * 1024 * 1024
    assert settings.max_pixels == 4096 * 4096


def test_input_keys_are_content_addresses_the_manifest_accepts() -> None:
    data = encode("PNG")
    key = input_key("images", data)
    assert key == f"images/inputs/{hashlib.sha256(data).hexdigest()}.png"
    assert INPUT_IMAGE_KEY.fullmatch(key)
    assert INPUT_IMAGE_KEY.fullmatch(input_key("", encode("JPEG")))
    assert input_key("/a/b/", encode("WEBP")).startswith("a/b/inputs/")
    with pytest.raises(InvalidKey, match="only PNG, JPEG or WebP"):
        input_key("images", b"GIF89a....")


@pytest.mark.parametrize(
    "key",
    [
        "other/inputs/" + "a" * 64 + ".png",
        "images/2024/07/05/" + str(uuid.UUID(int=1)) + "/0.png",
        "images/inputs/" + "a" * 64 + ".gif",
        "images/inputs/../inputs/" + "a" * 64 + ".png",
        "images/inputs/sub/" + "a" * 64 + ".png",
        "inputs/" + "a" * 64 + ".png",
        "https://example.com/images/inputs/" + "a" * 64 + ".png",
    ],
)
def test_check_input_key_refuses_anything_else(key: str) -> None:
    with pytest.raises(InvalidKey, match="is not an input image key of this store"):
        check_input_key("images", key)


async def round_trip(store: ObjectStore, prefix: str) -> None:
    data = encode("JPEG")
    key = await store.put_input(data)
    assert key == input_key(prefix, data)
    assert await store.put_input(data) == key  # the same bytes, the same object
    assert await store.get_input(key) == data
    missing = input_key(prefix, encode("PNG", (3, 3)))
    with pytest.raises(ObjectNotFound):
        await store.get_input(missing)
    output_key = key.replace("inputs/", "2024/07/05/").rsplit("/", 1)[0] + "/0.png"
    with pytest.raises(InvalidKey):
        await store.get_input(output_key)
    with pytest.raises(InvalidKey):
        await store.put_input(b"not an image")


async def test_local_store_round_trip(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "images")
    await store.start()
    await round_trip(store, "")
    assert [p.name for p in (tmp_path / "images" / "inputs").iterdir()] == [
        input_key("", encode("JPEG")).removeprefix("inputs/")
    ]


@pytest.mark.s3
async def test_s3_store_round_trip(s3_store_factory: S3StoreFactory) -> None:
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    store: S3Store = await s3_store_factory(prefix=prefix)
    await round_trip(store, prefix)
    # Another deployment sharing the bucket cannot be read through this store.
    other: S3Store = await s3_store_factory()
    key = await other.put_input(encode("WEBP"))
    with pytest.raises(InvalidKey):
        await store.get_input(key)
