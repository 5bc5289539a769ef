"""The HTTP API over real sockets: a real broker (the in-process one and RabbitMQ), the
S3 server, the demo renderer. Submit, follow the job over Server-Sent Events, fetch the
image; idempotency, cancel, quotas, keys, tenants, bad input, readiness, metrics."""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image
from pydantic import SecretStr, ValidationError

from api.events import frame, parse_last_event_id
from api.settings import ApiSettings
from tests.api_rig import ADMIN_KEY, ApiRig, parse_sse, start_api_rig
from tests.fixtures.pipeline import Rig

pytestmark = pytest.mark.s3

PROBLEM = "application/problem+json"


@pytest.fixture
async def api(rig: Rig, tmp_path: Path) -> AsyncIterator[ApiRig]:
    async with aiohttp.ClientSession() as http:
        yield await start_api_rig(rig, http, tmp_path / "ledger.db")


async def depth(api: ApiRig) -> int:
    topology = api.rig.topology
    return sum([await api.bus.broker.depth(topology.lane_queue(lane)) for lane in topology.lanes])


async def test_a_job_submitted_streams_to_its_end_and_its_image_downloads(api: ApiRig) -> None:
    await api.rig.renderer(demo_step_seconds=0.02)
    key = await api.new_key("acme")

    status, headers, ticket = await api.submit(
        key, prompt="a red fox", steps=8, width=128, height=96
    )

    assert status == 202, ticket
    job_id = ticket["job_id"]
    assert ticket["status_url"] == headers["Location"] == f"/v1/jobs/{job_id}"
    assert ticket["events_url"] == f"/v1/jobs/{job_id}/events"
    read = await api.stream(key, job_id)
    assert read.status == 200
    assert read.headers["Content-Type"].startswith("text/event-stream")
    assert read.retry == 3000
    kinds = [event.event for event in read.events]
    assert kinds[0] == "state" and read.events[0].data["job_id"] == job_id
    assert kinds[-1] == "succeeded" and read.events[-1].id == "end"
    assert kinds.count("succeeded") == 1
    steps = [e.data["step"] for e in read.events if e.event == "progress"]
    assert steps == sorted(steps) and steps[-1] == 8
    previews = [e.data for e in read.events if e.event == "preview"]
    assert previews and all(p["image"].startswith("data:image/") for p in previews)
    ids = [e.id for e in read.events if e.event in ("accepted", "progress", "preview")]
    assert all(re.fullmatch(r"\d+-\d+", i or "") for i in ids)
    (output,) = read.events[-1].data["outputs"]
    async with api.http.get(output["url"]) as response:  # the bucket's presigned URL
        assert response.status == 200
        image = Image.open(io.BytesIO(await response.read()))
    assert image.size == (128, 96) and image.info["prompt"] == "a red fox"

    status, _, job = await api.call("GET", f"/v1/jobs/{job_id}", key)
    assert status == 200
    assert job["status"] == "succeeded" and job["position"] is None
    assert job["outputs"][0]["key"] == output["key"] and job["params"]["width"] == 128
    assert {"render", "upload", "queued"} <= set(job["timings"])

    status, _, listed = await api.call("GET", "/v1/jobs?status=succeeded", key)
    assert status == 200 and [j["job_id"] for j in listed["jobs"]] == [job_id]

    status, headers, text = await api.call("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    for series in (
        'brigade_api_admissions_total{lane="fast",workflow="demo"} 1.0',
        'brigade_job_phase_seconds_count{phase="render"} 1.0',
        'brigade_job_phase_seconds_count{phase="queued"} 1.0',
        'brigade_job_phase_seconds_count{phase="upload"} 1.0',
        'brigade_queue_depth{lane="fast"} 0.0',
        'brigade_jobs_finished_total{reason="",status="succeeded"} 1.0',
        "brigade_previews_received_total",
        "brigade_previews_sent_total",
        "brigade_stream_events_dropped_total",
        "brigade_broker_up 1.0",
        'brigade_worker_info{backend="demo"',
        "brigade_comfyui_restarts_total{worker=",
    ):
        assert series in text, series


async def test_a_late_stream_gets_the_state_then_the_end_and_last_event_id_is_honoured(
    api: ApiRig,
) -> None:
    await api.rig.renderer()
    key = await api.new_key("acme")
    _, _, ticket = await api.submit(key, steps=4, width=64, height=64)
    job_id = ticket["job_id"]
    await api.stream(key, job_id)  # until its end

    late = await api.stream(key, job_id)
    assert [e.event for e in late.events] == ["state", "succeeded"]
    assert late.events[0].data["status"] == "succeeded"

    resumed = await api.stream(key, job_id, last_event_id="1-3")
    assert [e.event for e in resumed.events] == ["state", "succeeded"]

    done = await api.stream(key, job_id, last_event_id="end")
    assert done.status == 204  # an EventSource stops reconnecting


async def test_a_queued_job_streams_its_position_and_can_be_cancelled(api: ApiRig) -> None:
    key = await api.new_key("acme")  # no renderer: the job waits
    _, _, ticket = await api.submit(key, steps=4, width=64, height=64)
    job_id = ticket["job_id"]

    status, _, job = await api.call("GET", f"/v1/jobs/{job_id}", key)
    assert status == 200 and job["status"] == "queued" and job["position"] == 1
    streaming = asyncio.create_task(api.stream(key, job_id))
    await asyncio.sleep(1.2)  # heartbeat comments go by meanwhile
    status, _, cancelled = await api.call("DELETE", f"/v1/jobs/{job_id}", key)
    read = await streaming

    assert status == 200
    assert cancelled["status"] == "failed" and cancelled["failure"]["reason"] == "cancelled"
    assert read.events[0].event == "state" and read.events[0].data["position"] == 1
    assert read.events[-1].event == "failed" and read.events[-1].data["reason"] == "cancelled"
    assert "keep-alive" in read.comments
    status, headers, problem = await api.call("DELETE", f"/v1/jobs/{job_id}", key)
    assert status == 409 and headers["Content-Type"].startswith(PROBLEM)
    assert problem["type"] == "urn:brigade:problem:job-finished"


async def test_a_retried_submit_returns_the_same_job(api: ApiRig) -> None:
    key = await api.new_key("acme")

    first = await api.submit(key, "order-42", steps=4, width=64, height=64)
    again = await api.submit(key, "order-42", steps=4, width=64, height=64)
    other = await api.submit(key, "order-42", steps=5, width=64, height=64)
    missing = await api.call("POST", "/v1/jobs", key, body={"workflow": "demo", "prompt": "x"})

    assert first[0] == 202 and again[0] == 200
    assert again[2]["job_id"] == first[2]["job_id"]
    assert again[1]["Idempotent-Replayed"] == "true"
    assert await depth(api) == 1
    assert other[0] == 422 and other[2]["type"] == "urn:brigade:problem:idempotency-key-reused"
    assert missing[0] == 400
    assert missing[2]["errors"][0]["field"] == "Idempotency-Key"
    # Another tenant's same key is another job: keys are scoped to the tenant.
    stranger = await api.submit(await api.new_key("globex"), "order-42", steps=4)
    assert stranger[0] == 202 and stranger[2]["job_id"] != first[2]["job_id"]


async def test_a_quota_reached_is_429_naming_the_limit(api: ApiRig) -> None:
    key = await api.new_key("small")
    status, _, quota = await api.call(
        "PATCH", "/v1/admin/tenants/small/quota", ADMIN_KEY, body={"images_per_day": 1}
    )
    assert status == 200 and quota["limits"]["images_per_day"] == 1

    assert (await api.submit(key, steps=4, width=64, height=64))[0] == 202
    status, headers, problem = await api.submit(key, steps=4, width=64, height=64)

    assert status == 429 and headers["Content-Type"].startswith(PROBLEM)
    assert problem["type"] == "urn:brigade:problem:quota-exceeded"
    assert problem["limit"] == "images_per_day" and problem["status"] == 429
    assert problem["errors"][0]["field"] == "images_per_day"
    assert int(headers["Retry-After"]) > 0
    assert "<t:" not in problem["detail"]
    assert await depth(api) == 1
    status, _, usage = await api.call("GET", "/v1/quota", key)
    assert status == 200 and usage["tenant_images_left"] == 0


@pytest.mark.parametrize(
    ("body", "field", "allowed"),
    [
        ({"width": 513}, "width", "allowed: 64 to 1024, a multiple of 8"),
        ({"workflow": "no-such-flow"}, "workflow", "available: demo"),
        ({"prompt": ["a", "list"]}, "prompt", "must be a string"),
        ({"steps": 0}, "steps", "allowed: 1 to 50"),
        ({"colour": "red"}, "colour", "allowed: workflow, prompt"),
    ],
)
async def test_bad_input_is_422_naming_the_field_and_nothing_is_queued(
    api: ApiRig, body: dict[str, Any], field: str, allowed: str
) -> None:
    key = await api.new_key("acme")

    status, headers, problem = await api.submit(key, **body)

    assert status == 422 and headers["Content-Type"].startswith(PROBLEM)
    assert problem["title"] and problem["instance"] == "/v1/jobs"
    assert [e["field"] for e in problem["errors"]] == [field]
    assert allowed in problem["errors"][0]["message"]
    assert await depth(api) == 0
    assert (await api.call("GET", "/v1/jobs", key))[2]["jobs"] == []


async def test_keys_tenants_and_admin(api: ApiRig) -> None:
    acme, globex = await api.new_key("acme"), await api.new_key("globex")
    _, _, ticket = await api.submit(acme, steps=4, width=64, height=64)
    job_id = ticket["job_id"]

    for method, path in (
        ("GET", f"/v1/jobs/{job_id}"),
        ("DELETE", f"/v1/jobs/{job_id}"),
        ("GET", f"/v1/jobs/{job_id}/events"),
    ):
        status, _, problem = await api.call(method, path, globex)
        assert status == 404 and problem["type"] == "urn:brigade:problem:not-found", path
    assert (await api.call("GET", "/v1/jobs/no-such-job", acme))[0] == 404

    assert (await api.call("GET", "/v1/queue"))[0] == 401
    status, headers, problem = await api.call("GET", "/v1/queue", "brg_000000000000_" + "x" * 43)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert problem["status"] == 401 and headers["Content-Type"].startswith(PROBLEM)
    assert (await api.call("GET", "/v1/queue", ADMIN_KEY))[0] == 403
    assert (await api.call("GET", "/v1/admin/keys", acme))[0] == 403
    assert (await api.call("GET", "/v1/admin/keys", "wrong"))[0] == 401

    status, _, keys = await api.call("GET", "/v1/admin/keys?tenant=acme", ADMIN_KEY)
    assert status == 200 and len(keys["keys"]) == 1 and "key" not in keys["keys"][0]
    key_id = keys["keys"][0]["key_id"]
    assert acme.startswith(f"brg_{key_id}_")
    rows = await api.services.db.run(lambda db: list(db.table("api_keys").rows))
    assert all(acme not in str(row.values()) for row in rows)  # hashed at rest
    status, _, revoked = await api.call("DELETE", f"/v1/admin/keys/{key_id}", ADMIN_KEY)
    assert status == 200 and revoked["revoked_at"] is not None
    assert (await api.call("GET", "/v1/queue", acme))[0] == 401
    assert (await api.call("DELETE", "/v1/admin/keys/ffffffffffff", ADMIN_KEY))[0] == 404


async def test_workflows_queue_and_workers(api: ApiRig) -> None:
    await api.rig.renderer(worker_id="w-gpu0")
    key = await api.new_key("acme")

    _, _, listed = await api.call("GET", "/v1/workflows", key)
    demo = next(w for w in listed["workflows"] if w["name"] == "demo")
    assert demo["params"]["width"]["min"] == 64 and demo["params"]["width"]["max"] == 1024
    assert demo["params"]["width"]["multiple_of"] == 8
    _, _, queue = await api.call("GET", "/v1/queue", key)
    assert queue == {"lanes": [{"name": "fast", "depth": 0, "queued": 0, "running": 0}]}
    async with asyncio.timeout(10):
        while not (await api.call("GET", "/v1/workers", key))[2]["workers"]:
            await asyncio.sleep(0.1)
    _, _, workers = await api.call("GET", "/v1/workers", key)
    (worker,) = workers["workers"]
    assert worker["worker_id"] == "w-gpu0" and worker["backend"] == "demo"


async def test_health_readiness_and_a_closed_broker(api: ApiRig) -> None:
    assert (await api.call("GET", "/healthz"))[0] == 200
    status, _, ready = await api.call("GET", "/readyz")
    assert status == 200 and ready["checks"] == {"broker": "ok", "ledger": "ok", "store": "ok"}

    await api.bus.broker.close()

    status, _, ready = await api.call("GET", "/readyz")
    assert status == 503 and ready["status"] == "unavailable"
    assert ready["checks"]["broker"] != "ok" and ready["checks"]["ledger"] == "ok"
    key = await api.new_key("acme")
    status, headers, problem = await api.call("GET", "/v1/queue", key)
    assert status == 503 and problem["status"] == 503 and "Retry-After" in headers
    assert "brigade_broker_up 0.0" in (await api.call("GET", "/metrics"))[2]


async def test_unknown_routes_and_methods_are_problems(api: ApiRig) -> None:
    status, headers, problem = await api.call("GET", "/v2/nothing")
    assert status == 404 and headers["Content-Type"].startswith(PROBLEM)
    assert problem == {
        "type": "about:blank",
        "title": "Not Found",
        "status": 404,
        "instance": "/v2/nothing",
    }
    status, headers, _ = await api.call("PUT", "/v1/jobs")
    assert status == 405 and "POST" in headers["Allow"]
    async with api.http.post(
        api.url + "/v1/jobs",
        data=b"x" * 70_000,
        headers={**api.auth(await api.new_key("acme")), "Idempotency-Key": "big"},
    ) as response:
        assert response.status == 413


def test_the_admin_key_is_a_secret_and_long_enough() -> None:
    settings = ApiSettings(_env_file=None, admin_key=SecretStr(ADMIN_KEY))
    assert ADMIN_KEY not in repr(settings) and ADMIN_KEY not in str(settings.model_dump())
    with pytest.raises(ValidationError, match="at least 16"):
        ApiSettings(_env_file=None, admin_key=SecretStr("short"))


def test_sse_frames_are_one_line_of_json_each() -> None:
    data = frame("progress", {"text": "two\nlines"}, "1-2").decode()
    assert data == 'id: 1-2\nevent: progress\ndata: {"text":"two\\nlines"}\n\n'
    assert parse_sse(data).events[0].data == {"text": "two\nlines"}
    assert parse_last_event_id("2-7") == (2, 7)
    assert parse_last_event_id("end") == "end"
    assert parse_last_event_id("garbage") is None
