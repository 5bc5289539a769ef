"""PNG text chunks and S3 metadata: what travels with an image, and that pixels don't move."""

from __future__ import annotations

import json
import struct
import zlib
from datetime import UTC, datetime
from io import BytesIO
from urllib.parse import unquote

import pytest
from PIL import Image, PngImagePlugin

from storage.base import ImageMeta
from storage.png import (
    METADATA_LIMIT,
    embed_text,
    meta_chunks,
    object_metadata,
    png_size,
    read_text,
)

JOB = "3f2b8c1e-9a4d-4e6f-8b7a-0c1d2e3f4a5b"
CAT = "一只猫 🐱, sitting on a windowsill"
JSON_PROMPT = json.dumps({"3": {"class_type": "KSampler", "inputs": {"seed": 42}}})


def make_png(width: int = 23, height: int = 17, text: dict[str, str] | None = None) -> bytes:
    """A small RGB gradient PNG, optionally with tEXt chunks (as ComfyUI writes them)."""
    image = Image.new("RGB", (width, height))
    image.putdata(
        [(x * 11 % 256, y * 15 % 256, (x * y) % 256) for y in range(height) for x in range(width)]
    )
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    out = BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def pixels(png: bytes) -> tuple[str, tuple[int, int], bytes]:
    with Image.open(BytesIO(png)) as image:
        image.load()
        return image.mode, image.size, image.tobytes()


def chunk_types(png: bytes) -> list[bytes]:
    types, offset = [], 8
    while offset < len(png):
        (length,) = struct.unpack(">I", png[offset : offset + 4])
        types.append(png[offset + 4 : offset + 8])
        offset += 12 + length
    return types


def meta(prompt: str = CAT, **fields: object) -> ImageMeta:
    values: dict[object, object] = {
        "job_id": JOB,
        "index": 2,
        "prompt": prompt,
        "seed": 1234567890123,
        "workflow": "sdxl-base",
        "negative": "blurry, lowres",
    }
    values.update(fields)
    return ImageMeta(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("prompt", [CAT, JSON_PROMPT, "", "line one\nline two\twith tab"])
def test_embed_then_read_gives_back_the_text(prompt: str) -> None:
    png = embed_text(make_png(), {"prompt": prompt, "seed": "7"})
    assert read_text(png) == {"prompt": prompt, "seed": "7"}


def test_pillow_reads_the_chunks_as_we_wrote_them() -> None:
    chunks = meta_chunks(meta(JSON_PROMPT))
    png = embed_text(make_png(), chunks)
    with Image.open(BytesIO(png)) as image:
        image.load()
        assert image.text == chunks  # type: ignore[attr-defined]
    assert json.loads(read_text(png)["prompt"]) == json.loads(JSON_PROMPT)


def test_pixels_and_image_data_are_untouched() -> None:
    original = make_png(64, 48)
    stamped = embed_text(original, meta_chunks(meta()))
    assert pixels(stamped) == pixels(original)
    # Not re-encoded: everything after IHDR in the original is still there, byte for byte.
    assert stamped.endswith(original[33:])
    assert stamped[:33] == original[:33]


def test_chunks_go_right_after_ihdr() -> None:
    stamped = embed_text(make_png(), {"a": "1", "b": "2"})
    assert chunk_types(stamped)[:3] == [b"IHDR", b"iTXt", b"iTXt"]
    assert chunk_types(stamped)[-1] == b"IEND"


def test_written_chunks_have_valid_crcs() -> None:
    stamped = embed_text(make_png(), {"prompt": CAT})
    offset = 33
    (length,) = struct.unpack(">I", stamped[offset : offset + 4])
    body = stamped[offset + 4 : offset + 8 + length]
    (crc,) = struct.unpack(">I", stamped[offset + 8 + length : offset + 12 + length])
    assert zlib.crc32(body) == crc
    assert body.startswith(b"iTXtprompt\x00\x00\x00\x00\x00")


def test_same_keywords_already_in_the_file_are_replaced() -> None:
    comfy = make_png(text={"prompt": JSON_PROMPT, "workflow": "{}", "comfy": "kept"})
    stamped = embed_text(comfy, {"prompt": CAT, "workflow": "sdxl"})
    assert read_text(stamped) == {"prompt": CAT, "workflow": "sdxl", "comfy": "kept"}
    with Image.open(BytesIO(stamped)) as image:
        image.load()
        assert image.text["prompt"] == CAT  # type: ignore[attr-defined]


def test_reads_ztxt_and_compressed_itxt() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("z", "squeezed " * 20, zip=True)
    info.add_itxt("i", CAT * 5, zip=True)
    out = BytesIO()
    Image.new("L", (3, 3)).save(out, format="PNG", pnginfo=info)
    assert read_text(out.getvalue()) == {"z": "squeezed " * 20, "i": CAT * 5}


def test_png_size_reads_ihdr() -> None:
    assert png_size(make_png(31, 7)) == (31, 7)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GIF89a" + b"\x00" * 40, "signature"),
        (b"\x89PNG\r\n\x1a\n", "too short"),
        (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IDAT" + b"\x00" * 17, "IHDR"),
    ],
)
def test_refuses_what_is_not_a_png(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        embed_text(data, {"a": "b"})
    with pytest.raises(ValueError, match=message):
        png_size(data)


def test_refuses_a_corrupt_ihdr_and_a_truncated_file() -> None:
    png = make_png()
    corrupt = png[:20] + bytes([png[20] ^ 0xFF]) + png[21:]
    with pytest.raises(ValueError, match="CRC"):
        embed_text(corrupt, {"a": "b"})
    with pytest.raises(ValueError, match=r"truncated|past the end"):
        embed_text(png[:-20], {"a": "b"})


@pytest.mark.parametrize("keyword", ["", " lead", "trail ", "dou  ble", "x" * 80, "猫", "a\nb"])
def test_refuses_invalid_keywords(keyword: str) -> None:
    with pytest.raises(ValueError, match="keyword"):
        embed_text(make_png(), {keyword: "value"})


def test_meta_chunks_carry_our_keys_and_an_a1111_parameters_line() -> None:
    created = datetime(2024, 7, 5, 12, 30, tzinfo=UTC)
    chunks = meta_chunks(meta(extra={"sampler": "euler", "prompt": "ignored"}, created_at=created))
    assert chunks["prompt"] == CAT
    assert chunks["negative"] == "blurry, lowres"
    assert chunks["seed"] == "1234567890123"
    assert chunks["workflow"] == "sdxl-base"
    assert chunks["job_id"] == JOB
    assert chunks["Software"] == "Brigade"
    assert chunks["Creation Time"] == "2024-07-05T12:30:00+00:00"
    assert chunks["sampler"] == "euler"
    assert chunks["parameters"] == (
        f"{CAT}\nNegative prompt: blurry, lowres\nSeed: 1234567890123, Workflow: sdxl-base"
    )


def test_parameters_line_without_negative_or_seed() -> None:
    chunks = meta_chunks(meta("a cat", negative="", seed=None))
    assert chunks["parameters"] == "a cat\nWorkflow: sdxl-base"
    assert chunks["seed"] == ""


def test_object_metadata_roundtrips_through_unquote() -> None:
    metadata = object_metadata(meta(JSON_PROMPT + " %20 " + CAT))
    assert set(metadata) == {"prompt", "negative", "seed", "workflow", "job-id", "index"}
    assert unquote(metadata["prompt"]) == JSON_PROMPT + " %20 " + CAT
    assert metadata["job-id"] == JOB
    assert metadata["index"] == "2"
    assert metadata["seed"] == "1234567890123"


def test_object_metadata_keeps_edge_spaces_that_headers_would_strip() -> None:
    metadata = object_metadata(meta("  padded  "))
    assert metadata["prompt"] == "%20%20padded%20%20"
    assert unquote(metadata["prompt"]) == "  padded  "


def test_object_metadata_is_ascii_and_small_for_a_huge_prompt() -> None:
    prompt = ("一只猫 🐱 " + "masterpiece, best quality, " * 10) * 40
    assert len(prompt) >= 6000
    metadata = object_metadata(meta(prompt))
    size = sum(len("x-amz-meta-") + len(k) + len(v) for k, v in metadata.items())
    assert size <= METADATA_LIMIT < 2048
    for value in metadata.values():
        assert value.isascii()
        assert all(32 <= ord(c) < 127 for c in value)
    # The prompt is cut first, on a character boundary, and the other fields stay whole.
    kept = unquote(metadata["prompt"], errors="strict")
    assert len(kept) > 100
    assert prompt.startswith(kept)
    assert unquote(metadata["negative"]) == "blurry, lowres"
    assert metadata["job-id"] == JOB
    assert metadata["workflow"] == "sdxl-base"


def test_object_metadata_cuts_the_negative_once_the_prompt_is_gone() -> None:
    metadata = object_metadata(meta("猫" * 6000, negative="bad hands, " * 300))
    size = sum(len("x-amz-meta-") + len(k) + len(v) for k, v in metadata.items())
    assert size <= METADATA_LIMIT
    assert metadata["prompt"] == ""
    assert ("bad hands, " * 300).startswith(unquote(metadata["negative"]))
    assert len(metadata["negative"]) > 1000
