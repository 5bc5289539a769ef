"""Object keys: the layout of an image's key, and the keys a store refuses."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from storage.exceptions import InvalidKey
from storage.keys import check_key, image_key, normalize_prefix

JOB = "3f2b8c1e-9a4d-4e6f-8b7a-0c1d2e3f4a5b"
WHEN = datetime(2024, 7, 5, 12, 30, tzinfo=UTC)


def test_key_layout_is_prefix_date_job_index() -> None:
    assert image_key("images", JOB, 3, WHEN) == f"images/2024/07/05/{JOB}/3.png"


def test_date_parts_are_taken_in_utc() -> None:
    # 01:30 on 1 March at UTC+5 is still 29 February (a leap day) in UTC.
    created = datetime(2024, 3, 1, 1, 30, tzinfo=timezone(timedelta(hours=5)))
    assert image_key("p", JOB, 0, created) == f"p/2024/02/29/{JOB}/0.png"


def test_naive_datetime_is_taken_as_utc() -> None:
    assert image_key("p", JOB, 0, datetime(2023, 12, 31, 23, 59)) == f"p/2023/12/31/{JOB}/0.png"


def test_empty_prefix_gives_no_leading_slash() -> None:
    assert image_key("", JOB, 0, WHEN) == f"2024/07/05/{JOB}/0.png"
    assert image_key("/", JOB, 0, WHEN) == f"2024/07/05/{JOB}/0.png"


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [("/images/", "images"), ("a/b.c/d_e-f", "a/b.c/d_e-f"), ("//deep/er//", "deep/er")],
)
def test_prefix_is_stripped_of_slashes(prefix: str, expected: str) -> None:
    assert normalize_prefix(prefix) == expected
    assert image_key(prefix, JOB, 999, WHEN).startswith(f"{expected}/2024/")


@pytest.mark.parametrize(
    "job_id",
    [
        "not-a-uuid",
        "",
        JOB.upper(),
        JOB.replace("-", ""),
        "{" + JOB + "}",
        f"urn:uuid:{JOB}",
        "../" + JOB,
    ],
)
def test_refuses_job_ids_that_are_not_canonical_uuids(job_id: str) -> None:
    with pytest.raises(InvalidKey, match="job id"):
        image_key("images", job_id, 0, WHEN)


def test_accepts_any_canonical_uuid() -> None:
    job = str(uuid.uuid4())
    assert f"/{job}/0.png" in image_key("images", job, 0, WHEN)


@pytest.mark.parametrize(
    "prefix", ["../images", "images/../../etc", "a/./b", "a//b", "a b", "a\\b", "é", "a\x00b"]
)
def test_refuses_prefixes_that_are_not_plain_paths(prefix: str) -> None:
    with pytest.raises(InvalidKey, match="prefix"):
        image_key(prefix, JOB, 0, WHEN)


@pytest.mark.parametrize("index", [-1, 1000, 10**6])
def test_refuses_index_out_of_range(index: int) -> None:
    with pytest.raises(InvalidKey, match="index"):
        image_key("images", JOB, index, WHEN)


@pytest.mark.parametrize("index", [True, 1.0, "1"])
def test_refuses_index_that_is_not_an_int(index: object) -> None:
    with pytest.raises(InvalidKey, match="index"):
        image_key("images", JOB, index, WHEN)  # type: ignore[arg-type]


def test_check_key_accepts_keys_under_the_prefix() -> None:
    key = image_key("images", JOB, 1, WHEN)
    assert check_key("images", key) == key
    assert check_key("/images/", key) == key
    assert check_key("", key) == key


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("", "non-empty"),
        ("images/../secrets.txt", r"'\.\.'"),
        ("../images/x.png", r"'\.\.'"),
        ("images/./x.png", r"'\.\.'"),
        ("/etc/passwd", "absolute"),
        ("images\\..\\x.png", "backslash"),
        ("images/x\x00.png", "NUL"),
        ("images//x.png", "segments"),
        ("other/2024/x.png", "outside"),
        ("imagesX/x.png", "outside"),
        ("images", "outside"),
    ],
)
def test_check_key_refuses_keys_that_escape_the_prefix(key: str, reason: str) -> None:
    with pytest.raises(InvalidKey, match=reason):
        check_key("images", key)


def test_check_key_without_prefix_still_refuses_escapes() -> None:
    for key in ("../x.png", "/x.png", "a/../../x.png", "C:\\x.png"):
        with pytest.raises(InvalidKey):
            check_key("", key)
