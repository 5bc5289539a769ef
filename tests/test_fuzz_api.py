"""Hypothesis over the HTTP API's inputs (issue 7), on a real socket: JSON bodies of the
job and admin routes, raw bodies (NaN and Infinity tokens, duplicate keys, huge
numbers, deep nesting, invalid UTF-8), wrong content types, query parameters, path
segments and headers. Never a 5xx; every 4xx is problem+json, and every 400, 422 and
429 lists the fields at fault, each message starting with its field's path.

schemathesis (``tests/test_api_schema.py``) covers what the OpenAPI document
describes; these strategies go after what it does not.

The examples of a test share one API (starting one per example would cost seconds
each): Hypothesis runs an async test's examples on pytest-asyncio's loop, one after
the other, so the fixture's server is served while each example awaits its call. No
example depends on a fresh server, hence the suppressed ``function_scoped_fixture``
health check.

Budgets are small for the suite; ``BRIGADE_HYPOTHESIS_PROFILE=thorough`` runs 20 times
as many examples by hand."""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from api.keys import TENANT_PATTERN
from api.models import QuotaChange
from api.server import start_api
from brigade.app import api_services, frontend
from jobs.bus import JobBus
from jobs.memory import MemoryBroker, MemoryHub
from jobs.models import JobRequest
from jobs.topology import build_topology
from storage import LocalStore
from tests.api_rig import ADMIN_KEY, api_settings
from workflows import Catalog

THOROUGH = os.environ.get("BRIGADE_HYPOTHESIS_PROFILE") == "thorough"
PROBLEM = "application/problem+json"


def budget(examples: int) -> settings:
    """``examples`` in the suite, twenty times as many in the thorough profile; no
    deadline (the machine is shared), no example database in the working tree, and the
    API shared by the examples (see the module's docstring)."""
    return settings(
        max_examples=examples * 20 if THOROUGH else examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )


@dataclass
class Api:
    url: str
    http: aiohttp.ClientSession
    key: str
    tenant: str

    async def send(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, str, Any]:
        async with self.http.request(
            method, self.url + path, data=body, headers=headers or {}
        ) as response:
            text = await response.text()
            content = json.loads(text) if "json" in response.content_type and text else text
            return response.status, response.content_type, content


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    """The API on the in-process broker and a local image folder, with no renderer: an
    admitted job just waits in its queue."""
    topology = build_topology(("fast", "relax"), prefix=f"fuzz{uuid.uuid4().hex[:8]}")
    hub = MemoryHub()
    async with AsyncExitStack() as stack:
        broker = MemoryBroker(hub, topology)
        await broker.connect()
        stack.push_async_callback(broker.close)
        await broker.declare()
        bus = JobBus(broker)
        ledger = tmp_path / "ledger.db"
        front = await frontend(stack, bus, Catalog.load(), ledger, "fuzz", backends=["demo"])
        store = LocalStore(tmp_path / "images")
        await store.start()
        services = await api_services(stack, front, bus, ledger, store)
        server = await start_api(stack, services, api_settings())
        created = await services.keys.create("acme", "fuzz")
        async with aiohttp.ClientSession() as http:
            yield Api(server.url, http, created.key, "acme")


def assert_answer(status: int, content_type: str, body: Any) -> None:
    """Never a 5xx; a 4xx is a problem document, naming its fields where it has any."""
    assert status < 500, (status, body)
    if status < 400:
        return
    assert content_type == PROBLEM, (status, content_type, body)
    assert isinstance(body, dict) and body["status"] == status, body
    assert body["type"] and body["title"], body
    if status in (400, 422, 429):
        errors = body.get("errors")
        assert errors, body
        for error in errors:
            assert error["field"], error
            # "width: ...", or for the pixel rule, which names two fields, "width x height: ..."
            assert error["message"].startswith(error["field"]), error


# -- values -----------------------------------------------------------------------------

NUMBERS = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([2**53, 2**63, 2**64, -(2**63) - 1, 10**30]),
    st.floats(allow_nan=False, allow_infinity=False),
)
#: Text with lone surrogates too: JSON can carry them as ``\ud800`` escapes.
TEXT = st.text(alphabet=st.characters() | st.characters(categories=["Cs"]), max_size=20)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT, st.text(min_size=1500, max_size=2100))
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)
JOB_FIELDS = [
    "workflow",
    "prompt",
    "negative",
    "seed",
    "steps",
    "cfg",
    "width",
    "height",
    "count",
    "checkpoint",
    "lane",
    "params",
]
VALID_JOB: dict[str, Any] = {"workflow": "demo", "prompt": "a lighthouse", "steps": 4}


@st.composite
def near(draw: st.DrawFn, valid: dict[str, Any], fields: list[str]) -> Any:
    """A body near ``valid``: fields changed to any JSON, removed, or added; or any JSON."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON_VALUES)
    body = dict(valid)
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(fields) | TEXT)
        if draw(st.booleans()) and name in body:
            del body[name]
        else:
            body[name] = draw(JSON_VALUES)
    return body


def _dumps(value: Any, *, ascii_only: bool = True) -> bytes:
    """JSON bytes; a lone surrogate is an escape, or (not ``ascii_only``) invalid UTF-8."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def raw_bodies(draw: st.DrawFn, valid: dict[str, Any], fields: list[str]) -> bytes:
    """Bytes a client could send: JSON, JSON with Python's non-standard tokens, a key
    twice, numbers no parser should take, deep nesting, or bytes that are not UTF-8."""
    kind = draw(
        st.sampled_from(["json", "token", "duplicate", "huge", "deep", "bytes", "latin1", "empty"])
    )
    body = draw(near(valid, fields))
    if kind == "token":
        name = draw(st.sampled_from(fields))
        token = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-0", "1E400"]))
        text = json.dumps({**valid, name: "__TOKEN__"})
        return text.replace('"__TOKEN__"', token).encode()
    if kind == "duplicate":
        name = draw(st.sampled_from(fields))
        first = json.dumps({**valid, name: draw(JSON_VALUES)})
        second = json.dumps(draw(JSON_VALUES))
        return (first[:-1] + f", {json.dumps(name)}: {second}}}").encode()
    if kind == "huge":
        name = draw(st.sampled_from(fields))
        digits = "9" * draw(st.integers(300, 6000))
        return json.dumps({**valid, name: "__TOKEN__"}).replace('"__TOKEN__"', digits).encode()
    if kind == "deep":
        depth = draw(st.integers(10, 50_000))
        return ("[" * depth + "]" * depth).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "latin1":
        return json.dumps({**valid, "prompt": "café"}, ensure_ascii=False).encode("latin-1")
    if kind == "empty":
        return b""
    return _dumps(body, ascii_only=draw(st.booleans()))


CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "application/json",
        "application/json; charset=utf-8",
        "application/json; charset=latin-1",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/problem+json",
        "application/octet-stream",
        "",
    ]
)
#: Header values aiohttp's client will send (no CR, LF or NUL, Latin-1).
HEADER_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"),
    max_size=140,
)


def _headers(key: str, content_type: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {key}", **(extra or {})}
    if content_type:
        headers["Content-Type"] = content_type
    return headers


# -- the tests --------------------------------------------------------------------------


@given(
    body=raw_bodies(VALID_JOB, JOB_FIELDS),
    content_type=CONTENT_TYPES,
    idempotency=st.one_of(st.uuids().map(str), HEADER_TEXT, st.none()),
)
@example(
    body=b'{"workflow": "demo", "prompt": "x", "cfg": NaN}',
    content_type="application/json",
    idempotency="a",
)
@example(
    body=b'{"workflow": "demo", "prompt": "x", "seed": 1e999}',
    content_type="application/json",
    idempotency="b",
)
@example(
    body=b'{"workflow": "demo", "prompt": "\\ud800"}',
    content_type="application/json",
    idempotency="c",
)
@example(
    body=b'{"workflow": "demo", "prompt": "x", "params": {"\\ud800": 1}}',
    content_type="application/json",
    idempotency="d",
)
@example(body=b"\xff\xfe{}", content_type="application/json", idempotency="e")
@example(
    body=b'{"workflow": "demo", "prompt": "' + b"x" * 70_000 + b'"}',
    content_type="application/json",
    idempotency="f",
)
@budget(150)
async def test_submitting_any_body_is_answered_without_a_server_error(
    api: Api, body: bytes, content_type: str, idempotency: str | None
) -> None:
    extra = {} if idempotency is None else {"Idempotency-Key": idempotency}
    status, kind, answer = await api.send(
        "POST", "/v1/jobs", body=body, headers=_headers(api.key, content_type, extra)
    )
    assert_answer(status, kind, answer)
    if status in (200, 202):
        assert uuid.UUID(answer["job_id"])


#: What a quota change takes, and one name it does not.
QUOTA_FIELDS = [*QuotaChange.model_fields, "paused"]
TENANTS = st.one_of(
    st.just("acme"),
    st.text(max_size=70),
    st.sampled_from(["..", ".", "a/b", "a%2Fb", "acme\n", " ", "*", "x" * 65]),
)


@given(
    body=raw_bodies({"images_per_day": 10}, QUOTA_FIELDS),
    content_type=CONTENT_TYPES,
    tenant=TENANTS,
)
@example(
    body=b'{"images_per_day": 99999999999999999999999}',
    content_type="application/json",
    tenant="acme",
)
@example(body=b'{"max_pixels": 1e300}', content_type="application/json", tenant="acme")
@example(body=b'{"images_per_day": 1}', content_type="application/json", tenant="acme\n")
@example(body=b'{"banned_words": ["\\ud800"]}', content_type="application/json", tenant="acme")
@budget(120)
async def test_changing_a_quota_is_answered_without_a_server_error(
    api: Api, body: bytes, content_type: str, tenant: str
) -> None:
    path = f"/v1/admin/tenants/{quote(tenant, safe='')}/quota"
    status, kind, answer = await api.send(
        "PATCH", path, body=body, headers=_headers(ADMIN_KEY, content_type)
    )
    assert_answer(status, kind, answer)
    if status == 200:
        assert re.fullmatch(TENANT_PATTERN, answer["tenant"]), answer["tenant"]
    status, kind, answer = await api.send("GET", path, headers=_headers(ADMIN_KEY, ""))
    assert_answer(status, kind, answer)
    # Whatever the tenant's quota became, its next job is admitted or refused by name.
    headers = _headers(api.key, "application/json", {"Idempotency-Key": str(uuid.uuid4())})
    status, kind, answer = await api.send(
        "POST", "/v1/jobs", body=_dumps(VALID_JOB), headers=headers
    )
    assert_answer(status, kind, answer)


@given(
    body=raw_bodies({"tenant": "acme", "name": "ci"}, ["tenant", "name"]),
    content_type=CONTENT_TYPES,
)
@example(body=b'{"tenant": "acme\\n"}', content_type="application/json")
@budget(80)
async def test_creating_a_key_is_answered_without_a_server_error(
    api: Api, body: bytes, content_type: str
) -> None:
    status, kind, answer = await api.send(
        "POST", "/v1/admin/keys", body=body, headers=_headers(ADMIN_KEY, content_type)
    )
    assert_answer(status, kind, answer)
    if status == 201:
        assert answer["key"] and answer["tenant"] == json.loads(body)["tenant"]


RULES = st.fixed_dictionaries(
    {},
    optional={
        "max_steps": st.integers(1, 60),
        "max_pixels": st.integers(1, 2**21),
        "max_count": st.integers(1, 5),
        "images_per_user_per_day": st.integers(0, 3),
        "workflows": st.lists(st.sampled_from(["demo", "sd15-txt2img", "none"]), max_size=2),
        "lanes": st.lists(st.sampled_from(["fast", "relax"]), max_size=2),
        "banned_words": st.lists(st.sampled_from(["fox", "Lighthouse", "é"]), max_size=2),
        "nsfw_workflows": st.lists(st.just("demo"), max_size=1),
    },
)
JOBS = st.fixed_dictionaries(
    {
        "workflow": st.sampled_from(["demo", "sd15-txt2img"]),
        "prompt": st.sampled_from(["a fox", "a lighthouse", "é"]),
    },
    optional={
        "steps": st.integers(1, 60),
        "width": st.sampled_from([64, 512, 1024, 2048]),
        "height": st.sampled_from([64, 512, 1024]),
        "count": st.integers(0, 6),
        "lane": st.sampled_from(["fast", "relax"]),
        "seed": st.integers(-1, 2**53),
    },
)
NO_RULES = {name: None for name in QUOTA_FIELDS if name != "paused"}


@given(rules=RULES, job=JOBS)
@example(rules={"max_count": 2}, job={"workflow": "demo", "prompt": "a fox", "count": 3})
@example(rules={}, job={"workflow": "demo", "prompt": "a fox", "count": 0})
@budget(80)
async def test_a_refused_job_names_the_fields_it_was_sent_with(
    api: Api, rules: dict[str, Any], job: dict[str, Any]
) -> None:
    """A job refused by the workflow or by its tenant's rules names fields of the
    request (``count``, not the workflow's ``batch``), or, over a counted limit, the
    limit."""
    path = f"/v1/admin/tenants/{api.tenant}/quota"
    headers = _headers(ADMIN_KEY, "application/json")
    status, _, answer = await api.send(
        "PATCH", path, body=_dumps({**NO_RULES, **rules}), headers=headers
    )
    assert status == 200, answer
    headers = _headers(api.key, "application/json", {"Idempotency-Key": str(uuid.uuid4())})
    status, kind, answer = await api.send("POST", "/v1/jobs", body=_dumps(job), headers=headers)
    assert_answer(status, kind, answer)
    if status == 422:
        for error in answer["errors"]:
            # A field the client sent, or one it left to the workflow's default.
            assert error["field"] in JobRequest.model_fields, (error, job)
    elif status == 429:
        assert [error["field"] for error in answer["errors"]] == [answer["limit"]]
    else:
        assert status == 202, answer


QUERY = st.dictionaries(
    st.sampled_from(["limit", "status", "tenant", "x"]) | st.text(max_size=6),
    st.one_of(HEADER_TEXT, NUMBERS.map(str), st.sampled_from(["0", "-1", "101", "1e3", "queued"])),
    max_size=3,
)
SEGMENTS = st.one_of(
    st.uuids().map(str),
    st.text(max_size=60),
    st.sampled_from(["..", "%2e%2e", "../admin/keys", "x" * 600, "\x00"]),
)


@given(
    route=st.sampled_from(
        [
            ("GET", "/v1/jobs", "tenant"),
            ("GET", "/v1/jobs/{}", "tenant"),
            ("DELETE", "/v1/jobs/{}", "tenant"),
            ("GET", "/v1/jobs/{}/events", "tenant"),
            ("GET", "/v1/admin/keys", "admin"),
            ("DELETE", "/v1/admin/keys/{}", "admin"),
            ("GET", "/v1/queue", "tenant"),
            ("GET", "/v1/quota", "tenant"),
            ("GET", "/images/{}", "none"),
            ("POST", "/v1/workflows", "tenant"),
        ]
    ),
    segment=SEGMENTS,
    query=QUERY,
    authorization=st.one_of(st.none(), HEADER_TEXT, st.just("the key")),
)
@example(
    route=("GET", "/v1/jobs", "tenant"),
    segment="",
    query={"limit": "1" * 5000},
    authorization="the key",
)
@example(route=("GET", "/images/{}", "none"), segment="../ledger.db", query={}, authorization=None)
@budget(150)
async def test_paths_queries_and_keys_are_answered_without_a_server_error(
    api: Api,
    route: tuple[str, str, str],
    segment: str,
    query: dict[str, str],
    authorization: str | None,
) -> None:
    method, template, who = route
    path = template.format(quote(segment, safe=""))
    if query:
        path += "?" + "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in query.items())
    headers: dict[str, str] = {}
    if authorization == "the key":
        headers["Authorization"] = f"Bearer {ADMIN_KEY if who == 'admin' else api.key}"
    elif authorization is not None:
        headers["Authorization"] = authorization
    if template.endswith("/events"):
        printable = [c for c in segment if " " <= c <= "\xff" and c != "\x7f"]
        headers["Last-Event-ID"] = "".join(printable)[:40]
    status, kind, answer = await api.send(method, path, headers=headers)
    assert_answer(status, kind, answer)
