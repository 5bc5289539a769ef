"""PNG text chunks: the image's metadata travels inside the file.

:func:`embed_text` adds ``iTXt`` chunks right after ``IHDR`` by splicing bytes: the
image data is copied, never decoded or re-encoded, so pixels and compression stay
exactly as the renderer made them. :func:`meta_chunks` says what we write (our own keys
plus an A1111-style ``parameters`` line that existing viewers already read), and
:func:`object_metadata` the ASCII-only, size-capped copy that goes into S3 metadata.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Iterator, Mapping
from urllib.parse import quote

from storage.base import ImageMeta

SIGNATURE = b"\x89PNG\r\n\x1a\n"

SOFTWARE = "Brigade"

METADATA_LIMIT = 2000
"""S3 caps user metadata at 2 KB (keys and values, UTF-8); keep a margin under 2048."""

_TEXT_TYPES = {b"tEXt", b"zTXt", b"iTXt"}
# After an iTXt keyword: its NUL, compression flag 0 and method 0 (stored as-is), then an
# empty language tag and an empty translated keyword, each NUL-terminated.
_ITXT_PLAIN = b"\x00" + b"\x00\x00" + b"\x00" + b"\x00"
_EDGE_SPACES = re.compile(r"^ +| +$")
_HEADER_PREFIX = "x-amz-meta-"
_SAFE = " ,.:-_"


def embed_text(png: bytes, chunks: Mapping[str, str]) -> bytes:
    """Return ``png`` with one uncompressed UTF-8 ``iTXt`` chunk per item of ``chunks``.

    The new chunks go right after ``IHDR``. Text chunks already in the file under one of
    the same keywords are dropped, so the values given here are the ones every reader
    sees (a PNG from ComfyUI carries its own ``prompt`` and ``workflow`` chunks). Raises
    ``ValueError`` when ``png`` is not a well-formed PNG or a keyword is not a valid PNG
    keyword (1-79 Latin-1 printable characters, no leading, trailing or double spaces).
    """
    parsed = list(_chunks(png))
    keywords = {keyword: _keyword_bytes(keyword) for keyword in chunks}
    replaced = set(keywords.values())
    out = [SIGNATURE, png[parsed[0].start : parsed[0].end]]
    for keyword, text in chunks.items():
        out.append(_chunk(b"iTXt", keywords[keyword] + _ITXT_PLAIN + text.encode("utf-8")))
    for chunk in parsed[1:]:
        if chunk.type in _TEXT_TYPES and _text_keyword(chunk.data) in replaced:
            continue
        out.append(png[chunk.start : chunk.end])
    return b"".join(out)


def read_text(png: bytes) -> dict[str, str]:
    """Return every ``tEXt``, ``zTXt`` and ``iTXt`` chunk of ``png`` as keyword → text.

    When a keyword occurs twice the later chunk wins, as in Pillow. Raises
    ``ValueError`` when ``png`` is not a well-formed PNG.
    """
    texts: dict[str, str] = {}
    for chunk in _chunks(png):
        if chunk.type in _TEXT_TYPES:
            keyword, text = _decode_text(chunk.type, chunk.data)
            texts[keyword] = text
    return texts


def png_size(png: bytes) -> tuple[int, int]:
    """Return ``(width, height)`` from the ``IHDR`` of ``png``; ``ValueError`` if not a PNG."""
    ihdr = _ihdr(png)
    width, height = struct.unpack(">II", ihdr.data[:8])
    return width, height


def meta_chunks(meta: ImageMeta) -> dict[str, str]:
    """The text chunks that describe ``meta``: our own keys and an A1111 ``parameters``.

    ``parameters`` follows the AUTOMATIC1111 layout (prompt, then ``Negative prompt:``
    when there is one, then ``Seed: …, Workflow: …``) so that image viewers and
    "PNG info" tools show the prompt. ``meta.extra`` is added under its own keys, but
    never overrides ours.
    """
    seed = "" if meta.seed is None else str(meta.seed)
    settings = f"Seed: {seed}, Workflow: {meta.workflow}" if seed else f"Workflow: {meta.workflow}"
    lines = [meta.prompt]
    if meta.negative:
        lines.append(f"Negative prompt: {meta.negative}")
    lines.append(settings)
    chunks = {
        "prompt": meta.prompt,
        "negative": meta.negative,
        "seed": seed,
        "workflow": meta.workflow,
        "job_id": meta.job_id,
        "Software": SOFTWARE,
        "parameters": "\n".join(lines),
    }
    if meta.created_at is not None:
        chunks["Creation Time"] = meta.created_at.isoformat()
    for key, value in meta.extra.items():
        chunks.setdefault(key, value)
    return chunks


def object_metadata(meta: ImageMeta) -> dict[str, str]:
    """S3 user metadata for ``meta``: percent-encoded ASCII, under :data:`METADATA_LIMIT`.

    Values are encoded with ``urllib.parse.quote`` (decode with ``unquote``). When the
    whole set would be larger than the limit, the prompt is shortened first, then the
    negative prompt, then the workflow name; the PNG's text chunks keep the full text.
    """
    values = {
        "prompt": meta.prompt,
        "negative": meta.negative,
        "seed": "" if meta.seed is None else str(meta.seed),
        "workflow": meta.workflow,
        "job-id": meta.job_id,
        "index": str(meta.index),
    }
    encoded = {key: _quote(value) for key, value in values.items()}
    for key in ("prompt", "negative", "workflow"):
        excess = _metadata_size(encoded) - METADATA_LIMIT
        if excess <= 0:
            break
        encoded[key] = _quote_within(values[key], len(encoded[key]) - excess)
    return encoded


class _Chunk:
    """One chunk of a PNG: its type, its data, and where it sits in the file."""

    __slots__ = ("data", "end", "start", "type")

    def __init__(self, type_: bytes, data: bytes, start: int, end: int) -> None:
        self.type = type_
        self.data = data
        self.start = start
        self.end = end


def _chunks(png: bytes) -> Iterator[_Chunk]:
    """Walk the chunks of ``png`` up to and including ``IEND``, checking the framing."""
    first = _ihdr(png)
    yield first
    offset = first.end
    while True:
        if offset + 12 > len(png):
            raise ValueError(f"PNG is truncated: no IEND chunk before byte {len(png)}")
        (length,) = struct.unpack(">I", png[offset : offset + 4])
        type_ = png[offset + 4 : offset + 8]
        end = offset + 12 + length
        if end > len(png):
            raise ValueError(f"PNG chunk {type_!r} at byte {offset} runs past the end")
        yield _Chunk(type_, png[offset + 8 : end - 4], offset, end)
        if type_ == b"IEND":
            return
        offset = end


def _ihdr(png: bytes) -> _Chunk:
    """Check the signature and the ``IHDR`` chunk (length, CRC, non-zero size)."""
    if not png.startswith(SIGNATURE):
        raise ValueError("not a PNG: the 8-byte PNG signature is missing")
    if len(png) < 33:
        raise ValueError("not a PNG: too short to hold an IHDR chunk")
    length, type_ = struct.unpack(">I4s", png[8:16])
    if type_ != b"IHDR" or length != 13:
        raise ValueError("invalid PNG: the first chunk must be a 13-byte IHDR")
    data = png[16:29]
    (crc,) = struct.unpack(">I", png[29:33])
    if zlib.crc32(b"IHDR" + data) != crc:
        raise ValueError("invalid PNG: the IHDR chunk's CRC does not match")
    width, height = struct.unpack(">II", data[:8])
    if width == 0 or height == 0:
        raise ValueError(f"invalid PNG: IHDR gives an empty image ({width}x{height})")
    return _Chunk(b"IHDR", data, 8, 33)


def _chunk(type_: bytes, data: bytes) -> bytes:
    """Frame ``data`` as a PNG chunk: length, type, data, CRC of type and data."""
    crc = zlib.crc32(type_ + data)
    return struct.pack(">I", len(data)) + type_ + data + struct.pack(">I", crc)


def _keyword_bytes(keyword: str) -> bytes:
    """Encode a chunk keyword, refusing what the PNG spec forbids."""
    try:
        raw = keyword.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise ValueError(f"PNG keyword must be Latin-1: {keyword!r}") from exc
    printable = all(32 <= b <= 126 or b >= 161 for b in raw)
    spaced = keyword != keyword.strip() or "  " in keyword
    if not 1 <= len(raw) <= 79 or not printable or spaced:
        raise ValueError(
            "PNG keyword must be 1-79 printable Latin-1 characters without leading, "
            f"trailing or double spaces: {keyword!r}"
        )
    return raw


def _text_keyword(data: bytes) -> bytes:
    """The keyword of a text chunk: everything before its first NUL."""
    return data.split(b"\x00", 1)[0]


def _decode_text(type_: bytes, data: bytes) -> tuple[str, str]:
    """Decode one text chunk to ``(keyword, text)`` following the PNG spec."""
    keyword_raw, sep, rest = data.partition(b"\x00")
    if not sep:
        raise ValueError(f"invalid PNG {type_.decode()} chunk: no keyword separator")
    keyword = keyword_raw.decode("latin-1")
    if type_ == b"tEXt":
        return keyword, rest.decode("latin-1")
    if type_ == b"zTXt":
        return keyword, _inflate(rest[1:]).decode("latin-1")
    if len(rest) < 2:
        raise ValueError("invalid PNG iTXt chunk: missing compression fields")
    compressed = rest[0] == 1
    fields = rest[2:].split(b"\x00", 2)
    if len(fields) != 3:
        raise ValueError("invalid PNG iTXt chunk: missing language or translated keyword")
    text = fields[2]
    return keyword, (_inflate(text) if compressed else text).decode("utf-8")


def _inflate(data: bytes) -> bytes:
    try:
        return zlib.decompress(data)
    except zlib.error as exc:
        raise ValueError("invalid PNG text chunk: bad zlib data") from exc


def _quote(value: str) -> str:
    """Percent-encode for an HTTP header; edge spaces too, as servers strip them."""
    encoded = quote(value, safe=_SAFE)
    return _EDGE_SPACES.sub(lambda spaces: "%20" * len(spaces.group()), encoded)


def _quote_within(value: str, budget: int) -> str:
    """The encoding of the longest prefix of ``value`` that is at most ``budget`` long.

    Cutting the text before encoding never splits a ``%XX`` escape or a UTF-8 sequence.
    """
    low, high = 0, len(value)
    while low < high:
        middle = (low + high + 1) // 2
        if len(_quote(value[:middle])) <= budget:
            low = middle
        else:
            high = middle - 1
    return _quote(value[:low])


def _metadata_size(metadata: Mapping[str, str]) -> int:
    return sum(len(_HEADER_PREFIX) + len(key) + len(value) for key, value in metadata.items())
