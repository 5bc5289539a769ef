"""Storage keys can never escape their prefix (issue 7), whatever job id, prefix, index
or key a caller hands over; the local store never reads or writes outside its root.

Budgets are small for the suite; ``BRIGADE_HYPOTHESIS_PROFILE=thorough`` runs 20 times
as many examples by hand."""

from __future__ import annotations

import asyncio
import io
import os
import string
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from storage import LocalStore
from storage.base import ImageMeta
from storage.exceptions import InvalidKey, ObjectNotFound, StorageError
from storage.keys import MAX_INDEX, check_key, image_key, normalize_prefix

THOROUGH = os.environ.get("BRIGADE_HYPOTHESIS_PROFILE") == "thorough"


def budget(examples: int) -> settings:
    """``examples`` in the suite, twenty times as many in the thorough profile; no
    deadline (the machine is shared) and no example database in the working tree."""
    return settings(
        max_examples=examples * 20 if THOROUGH else examples, deadline=None, database=None
    )


SAFE = set(string.ascii_letters + string.digits + "._-/")
#: Pieces that path tricks are made of, mixed with arbitrary text.
TRICKS = st.sampled_from(
    ["..", ".", "/", "//", "\\", "\x00", "%2e%2e", "%2f", "~", ":", "C:", "\n", "\u2024", "．"]
)
SEGMENT = st.text(alphabet=string.ascii_letters + string.digits + "._-", min_size=1, max_size=8)
PATHISH = st.lists(st.one_of(SEGMENT, TRICKS, st.text(max_size=6)), max_size=8).map("".join)
TEXT = st.one_of(PATHISH, st.text(max_size=40))
JOB_IDS = st.one_of(
    st.uuids().map(str),
    st.uuids().map(lambda u: str(u).upper()),
    st.uuids().map(lambda u: u.hex),
    st.uuids().map(lambda u: f"../{u}"),
    st.uuids().map(lambda u: f"{u}/../../x"),
    TEXT,
)
INDEXES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-2, max_value=MAX_INDEX + 2),
    st.booleans(),
    st.floats(allow_nan=True),
    st.text(max_size=4),
    st.none(),
)
WHEN = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)) | st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)


def assert_contained(prefix: str, key: str) -> None:
    """``key`` is a plain relative path under ``prefix``: no way out of it."""
    root = normalize_prefix(prefix)
    assert key and not key.startswith("/")
    assert set(key) <= SAFE, key
    segments = key.split("/")
    assert "" not in segments and "." not in segments and ".." not in segments, key
    if root:
        assert key.startswith(root + "/"), (root, key)
    resolved = os.path.normpath(os.path.join("/r", root, "x")).rsplit("/", 1)[0]
    assert os.path.normpath(os.path.join("/r", key)).startswith(resolved + "/"), key


@given(prefix=TEXT)
@example(prefix="../images")
@example(prefix="/")
@example(prefix="a//b")
@budget(300)
def test_a_prefix_is_refused_or_safe(prefix: str) -> None:
    try:
        root = normalize_prefix(prefix)
    except InvalidKey:
        return
    assert set(root) <= SAFE and not root.startswith("/") and not root.endswith("/")
    assert ".." not in root.split("/") and "." not in root.split("/")


@given(prefix=TEXT | st.just("images"), job_id=JOB_IDS, index=INDEXES, created=WHEN)
@example(
    prefix="images", job_id="../" + str(uuid.UUID(int=1)), index=0, created=datetime(2024, 1, 1)
)
@example(prefix="images", job_id=str(uuid.UUID(int=1)), index=-1, created=datetime(2024, 1, 1))
@example(prefix="images", job_id=str(uuid.UUID(int=1)), index=True, created=datetime(2024, 1, 1))
@budget(300)
def test_an_image_key_stays_under_its_prefix(
    prefix: str, job_id: str, index: object, created: datetime
) -> None:
    try:
        key = image_key(prefix, job_id, index, created)  # type: ignore[arg-type]
    except InvalidKey:
        return
    assert_contained(prefix, key)
    assert check_key(prefix, key) == key
    assert key.endswith(f"/{job_id}/{index}.png")
    uuid.UUID(job_id)  # only a UUID ever makes a key


@given(prefix=st.sampled_from(["", "images", "a/b"]) | TEXT, key=TEXT)
@example(prefix="images", key="images/../etc/passwd")
@example(prefix="images", key="images/./x.png")
@example(prefix="images", key="imagesX/x.png")
@example(prefix="", key="/etc/passwd")
@example(prefix="", key="a\\..\\b.png")
@example(prefix="", key="a/b.png\n")
@budget(400)
def test_a_checked_key_stays_under_its_prefix(prefix: str, key: str) -> None:
    try:
        checked = check_key(prefix, key)
    except InvalidKey:
        return
    assert checked == key
    assert_contained(prefix, key)


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()


def _files(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*") if path.is_file()}


@given(key=TEXT | st.sampled_from(["../outside.png", "store/../outside.png", "%2e%2e/outside.png"]))
@example(key="../outside.png")
@budget(300)
def test_the_local_store_reads_nothing_outside_its_root(key: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        root = base / "store"
        root.mkdir()
        secret = b"not an image of the store"
        (base / "outside.png").write_bytes(secret)
        store = LocalStore(root)

        async def read() -> bytes | None:
            try:
                return await store.get(key)
            except (InvalidKey, ObjectNotFound):
                return None

        got = asyncio.run(read())
        assert got != secret


@given(job_id=JOB_IDS, index=INDEXES, prompt=st.text(max_size=50), created=WHEN | st.none())
@example(job_id=f"../{uuid.UUID(int=5)}", index=0, prompt="p", created=None)
@budget(100)
def test_the_local_store_writes_only_under_its_root(
    job_id: str, index: object, prompt: str, created: datetime | None
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        root = base / "store"
        store = LocalStore(root)
        meta = ImageMeta(
            job_id=job_id,
            index=index,  # type: ignore[arg-type]
            prompt=prompt,
            seed=1,
            workflow="demo",
            created_at=created,
        )

        async def write() -> None:
            await store.start()
            try:
                stored = await store.put_image(PNG, meta)
            except InvalidKey:
                return
            except StorageError as exc:
                failed: str | None = str(exc)
            else:
                failed = None
            if failed is not None:
                # A prompt PNG text cannot hold (never a path problem).
                assert "image" in failed
                return
            assert_contained("", stored.key)
            assert (root / stored.key).read_bytes().startswith(PNG[:8])

        asyncio.run(write())
        written = _files(base)
        assert all(root in path.parents for path in written), written
